"""The ``suder`` command: thin commands, each calling one public function; rendering with rich.

Errors that suder raises on purpose (``SuderError``) are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from . import console as term
from .errors import SuderError
from .run_options import parse_run


def _at_least(flag: str, value: int | float | None, minimum: int, counts: str) -> None:
    """A count option below its minimum is a one-line ``ConfigError`` (argparse accepts any int)."""
    if value is not None and value < minimum:
        from .errors import ConfigError

        raise ConfigError(
            f"{flag} is {value:g}, but it counts {counts} and must be at least {minimum}; "
            f"pass {flag} {minimum} or more."
        )


def _known_backbone(name: str) -> None:
    """An unknown backbone name is the first thing to hear about (``Unknown backbone 'x'. Available: ...``)."""
    from .registry import get_backbone_spec

    get_backbone_spec(name)


def _load(args) -> Any:
    from .registry import load_backbone

    options = {"model": args.model} if getattr(args, "model", None) else {}
    if args.backbone == "toy" and not options:
        from .errors import BackboneError

        raise BackboneError("Pass --model PATH (a folder from `suder pretrain` or `suder run`) for the toy backbone.")
    return load_backbone(args.backbone, **options)


# ------------------------------------------------------------------------------------------- commands
def cmd_backbones(args) -> None:
    """Installed backbones, then the plugins that were skipped (each with its one-line error)."""
    from .plugins import failures, plugin_info
    from .registry import list_backbones, rewards

    specs = list_backbones()
    rewards()  # a plugin whose reward hook raises is a failing plugin too
    rows = [
        {
            "name": s.name,
            "summary": s.summary,
            "plugin": s.plugin,
            "distribution": s.distribution,
            "version": plugin_info(s.plugin).version,
            "error": None,
        }
        for s in specs
    ]
    rows += [
        dict(name=None, summary="", plugin=f.plugin, distribution=f.distribution, version=f.version, error=f.error)
        for f in failures()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="suder backbones")
    for col in ("name", "summary", "plugin", "distribution"):
        table.add_column(col)
    for r in rows:
        if r["error"] is None:
            table.add_row(r["name"], r["summary"], r["plugin"], f"{r['distribution']} {r['version']}".strip())
    console = term.console(stderr=False)
    console.print(table)
    for r in rows:  # one unwrapped line each, so the whole error can be read and searched
        if r["error"] is not None:
            console.print(
                f"[red]Skipped plugin[/] '{r['plugin']}' ({r['distribution']} {r['version']}): {r['error']}".strip(),
                highlight=False,
                soft_wrap=True,
            )


def cmd_world_export(args) -> None:
    from .data import ensure_writable_dir
    from .worlds import shapes

    _at_least("--num", args.num, 1, "the scenes to write")
    ensure_writable_dir(args.out, "--out folder", create=False)
    pairs = shapes.export(args.num, args.seed, args.out)
    term.console().print(f"Wrote {len(pairs)} images and captions.jsonl to {args.out}")


def cmd_pretrain(args) -> None:
    from .data import ensure_writable_dir
    from .pretrain import pretrain

    _at_least("--steps", args.steps, 1, "optimizer steps")
    _known_backbone(args.backbone)
    ensure_writable_dir(args.out, "--out folder", create=False)
    with term.progress() as bar:
        task = bar.add_task("pretrain", total=args.steps, info="")
        result = pretrain(
            args.backbone,
            out=args.out,
            steps=args.steps,
            seed=args.seed,
            callback=lambda m: bar.update(task, total=m["total_steps"], completed=m["step"], info=term.loss_info(m)),
        )
    term.console().print(f"Saved to {args.out} ({result.seconds:.0f} s, final loss {result.losses[-1]:.3f})")


def cmd_generate(args) -> None:
    """Sample images for a benchmark's prompt file and write the folder its scorer reads (``suder.exports``)."""
    from .data import ensure_writable_dir

    _at_least("--num-samples", args.num_samples, 1, "the images drawn per prompt")
    _known_backbone(args.backbone)
    ensure_writable_dir(args.out, "--out folder", create=False)
    import torch

    from . import exports

    n = args.num_samples or exports.DEFAULT_SAMPLES.get(args.layout, 4)
    exports.check_layout(args.layout, n)
    items = exports.read_items(args.layout, args.prompts)
    model = _load(args)
    out = Path(args.out)
    size = None
    with term.progress() as bar:
        task = bar.add_task("generate", total=len(items), info="")
        for i, item in enumerate(items):
            if args.resume and exports.is_written(args.layout, out, i, item, n):
                bar.update(task, advance=1)
                continue
            gen = torch.Generator().manual_seed(exports.item_seed(args.seed, i))
            images = model.sample_image(
                [item.prompt], num_samples=n, generator=gen, guidance_scale=args.guidance_scale
            ).images
            exports.write_item(args.layout, out, i, item, images)
            size = images[0].size[0]
            bar.update(task, advance=1)
    scorer = exports.SCORERS[args.layout].format(out=out.resolve(), resolution=size or "<SAMPLE_SIZE>")
    term.console().print(f"Wrote {len(items)} x {n} images to {out} ({args.layout} layout). Score with: {scorer}")


def cmd_caption(args) -> None:
    import torch

    from .data import ensure_writable_dir, list_images, load_image
    from .errors import ConfigError, DataError

    _at_least("--batch-size", args.batch_size, 1, "the images captioned at once")
    if args.temperature is not None and args.temperature < 0:
        raise ConfigError(f"--temperature is {args.temperature:g}, but it must be >= 0 (0 is greedy); pass 0 or more.")
    _known_backbone(args.backbone)
    if Path(args.out).is_dir():
        raise DataError(f"--out '{args.out}' is a folder; pass the path of the .jsonl file to write.")
    ensure_writable_dir(Path(args.out).parent, "folder of --out", create=False)
    files = list_images(args.images)
    images = [load_image(f) for f in files]
    model = _load(args)
    gen = torch.Generator().manual_seed(args.seed)
    temperature = 0.0 if args.temperature is None else args.temperature
    lines = []
    with term.progress() as bar:
        task = bar.add_task("caption", total=len(files), info="")
        for i in range(0, len(files), args.batch_size):
            texts = model.sample_text(images[i : i + args.batch_size], generator=gen, temperature=temperature).texts
            lines += [
                json.dumps({"image": f.name, "caption": t}) for f, t in zip(files[i : i + args.batch_size], texts)
            ]
            bar.update(task, advance=len(texts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    term.console().print(f"Wrote {len(lines)} captions to {args.out}")


def cmd_eval(args) -> None:
    from .evaluate import evaluate

    _at_least("--num", args.num, 1, "the prompts and scenes judged")
    _known_backbone(args.backbone)
    model = _load(args)
    result = evaluate(model, num=args.num, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    term.console(stderr=False).print(results_table([("model", result)]))


def cmd_report(args) -> None:
    from .report import watch, write_report

    if args.watch:
        term.console().print(f"Rewriting the report every {args.watch} s until the run finishes (Ctrl-C stops)")
        out = watch(args.run_dirs, args.out, args.watch, max_grids=args.max_grids)
    else:
        out = write_report(args.run_dirs, args.out, max_grids=args.max_grids)
    term.console().print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained: open it in any browser)")


def cmd_push(args) -> None:
    """Upload a run's final model (or a checkpoint's) with its model card to the Hugging Face Hub."""
    from .hub import push_run

    url = push_run(
        args.run_dir,
        args.repo_id,
        checkpoint=args.checkpoint,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
    )
    term.console().print(f"Pushed to https://huggingface.co/{args.repo_id} ({url})", highlight=False, soft_wrap=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("suder")
    except PackageNotFoundError:
        return "unknown"


def environment() -> dict[str, str]:
    """What ``suder env`` prints: versions, devices and the installed backbones with their distributions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .plugins import plugin_info
    from .registry import list_backbones

    info = {"suder": _version(), "Python": platform.python_version(), "Platform": platform.platform()}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "peft", "diffusers", "trl", "tyro"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["Devices"] = f"{len(names)} x CUDA: " + ", ".join(names)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["Devices"] = "MPS"
    else:
        info["Devices"] = f"CPU only ({os.cpu_count()} cores)"
    info["Backbones"] = ", ".join(
        f"{s.name} ({s.distribution} {plugin_info(s.plugin).version})".replace(" )", ")") for s in list_backbones()
    )
    return info


def cmd_env(args) -> None:
    """Like ``accelerate env``: one ``- key: value`` line each, to paste into an issue."""
    print("Copy-and-paste the text below in your GitHub issue\n")
    for key, value in environment().items():
        print(f"- {key}: {value}")


def results_table(rows: list[tuple[str, dict]], title: str = "ShapesWorld judge accuracy (%)"):
    from rich.table import Table

    cols = [
        ("t2i", "single"),
        ("t2i", "pair"),
        ("t2i", "count"),
        ("t2i", "relation"),
        ("t2i", "overall"),
        ("caption", "overall"),
        ("caption_greedy", "overall"),
    ]
    names = ["T2I single", "pair", "count", "relation", "T2I all", "caption T=1", "caption greedy"]
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for n in names:
        table.add_column(n, justify="right")
    for label, res in rows:
        cells = []
        for group, key in cols:
            v = res.get(group, {}).get(key)
            cells.append("-" if v is None else f"{100 * v:.1f}")
        table.add_row(label, *cells)
    return table


def cmd_run(argv: list[str]) -> None:
    """``suder run``: the options are generated from ``TrainConfig`` (``run_options``); the flags given are the
    flags layer of ``suder.config.resolve``."""
    from .config import resolve
    from .outputs import resume_config
    from .trainer import preflight, train

    config_file, flags = parse_run(argv)
    console = term.console()
    # fail on a bad option, data file or output folder before any expensive work
    cfg = resume_config(resolve(config_file, flags))
    preflight(cfg)
    if cfg.model is None and (cfg.backbone == "toy" or cfg.shapes_world):
        from .pretrain import cache_dir, ensure_base, shipped_base

        shipped = None if cfg.rebuild_base else shipped_base(cfg.backbone)
        where = f"base: {shipped}" if shipped else f"cache: {cache_dir()}"
        console.print(f"[bold]suder run[/]: the embedded default ({cfg.backbone} backbone on ShapesWorld); {where}")
        # the shipped base is checked here; one built here is built once, on first use, with a progress bar; the
        # run then finds it (its config keeps `model: null`, the embedded default, as the user asked; run.json names
        # the base)
        with term.progress() as bar:
            task = bar.add_task("pretrain base (first use)", total=None, info="", visible=False)
            ensure_base(
                cfg.backbone,
                rebuild=cfg.rebuild_base,
                callback=lambda m: bar.update(
                    task, total=m["total_steps"], completed=m["step"], info=term.loss_info(m), visible=True
                ),
            )
    start_plan(cfg, console)  # the table, and on a GPU too small for it a one-line error, before weights load
    with term.progress() as bar:
        task = bar.add_task("dsr", total=None, info="")

        def on_step(m: dict) -> None:
            parts = [f"{k.split('/')[0]} r={m[k]:.2f}" for k in ("gen/reward_mean", "und/reward_mean") if k in m]
            for k in ("gen/judge_acc", "und/judge_acc"):
                if k in m:
                    parts.append(f"{k.split('/')[0]} judge={100 * m[k]:.0f}%")
            bar.update(task, total=m["total_steps"], completed=m["step"], info="  ".join(parts))

        result = train(config_file=config_file, flags=flags, callback=on_step)
    if result.before or result.after:
        from .report import judge_rows

        term.console(stderr=False).print(results_table(judge_rows(result.before, result.after)))
    console.print(f"Run folder: {result.output_dir}  final model: {result.final_model}")
    if line := selfeval_line(Path(result.output_dir)):
        console.print(line, highlight=False, soft_wrap=True)
    if result.hub_url:
        console.print(f"Pushed to the Hub: {result.hub_url}", highlight=False, soft_wrap=True)


PLAN_HELP = (
    "The memory plan of a run, per process and phase, from configs alone (no weights load); takes every `suder "
    "run` option (`suder run --help`) plus these."
)


def _plan_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="suder plan", description=PLAN_HELP, allow_abbrev=False)
    p.add_argument("--device-memory", metavar="SIZE", help="plan for a device of this memory (80GiB, 24GB); default: "
                   "this machine's GPU, or no fit check on CPU")
    p.add_argument("--engine", choices=("ddp", "zero2", "zero3", "fsdp2"), help="default: what accelerate launch set")
    p.add_argument("--processes", type=int, help="processes sharing the work (default: WORLD_SIZE, else 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def cmd_plan(argv: list[str]) -> None:
    """``suder plan [run options]``: the memory plan's table (or JSON), and whether it fits the device."""
    from . import memory
    from .config import resolve
    from .outputs import resume_config

    args, rest = _plan_parser().parse_known_args(argv)
    _at_least("--processes", args.processes, 1, "the processes that share the work")
    config_file, flags = parse_run(rest)
    cfg = resume_config(resolve(config_file, flags))
    engine, processes = memory.launched()
    engine, processes = args.engine or engine, args.processes or processes
    name, total = memory.device_memory()
    if args.device_memory:
        name, total = f"a {args.device_memory} device", memory.parse_bytes(args.device_memory)
    device = "cpu" if total is None else "cuda"
    p = memory.plan(cfg, engine=engine, processes=processes, device=device)
    if args.json:
        fits = None if total is None else p.peak <= total * memory.FIT_MARGIN
        print(json.dumps(p.to_dict() | {"device": name, "device_bytes": total, "fits": fits}, indent=2))
        return
    out = term.console(stderr=False)
    out.print(memory.plan_table(p))
    if total is None:
        out.print("On CPU: no fit check (pass --device-memory 80GiB to plan for a GPU).")
        return
    try:
        memory.check_fits(p, cfg, total, name)
    except SuderError as exc:
        out.print(f"[bold red]Does not fit:[/] {exc}", highlight=False)
        return
    out.print(f"Fits {name} ({total / memory.GiB:.1f} GiB): peak {p.peak / memory.GiB:.1f} GiB ({p.peak_phase}).")


def selfeval_line(run: Path) -> str | None:
    """The end of ``suder run`` with a held-out self-evaluation: which step ``final/`` holds, the best and last
    self-scores, and what the guard did (``run.json``'s ``selfeval``); None without one."""
    try:
        record = json.loads((run / "run.json").read_text()).get("selfeval")
    except (OSError, ValueError):
        return None
    if not record:
        return None
    parts = [f"Self-evaluation: final/ holds step {record['final_step']} (select_final: {record['select_final']})"]
    if record.get("best_score") is not None:
        parts.append(f"best held-out self-score {record['best_score']:+.3f} at step {record['best_step']}, "
                     f"last {record['last_score']:+.3f}")
    if record["final_step"] != record["last_step"]:
        parts.append(f"the last step's weights are in {record['last_model']}")
    if record.get("rollbacks"):
        parts.append(f"{record['rollbacks']} rollback(s)")
    if record.get("stopped_at"):
        parts.append(f"the guard stopped the run at step {record['stopped_at']}")
    return "; ".join(parts) + "."


def start_plan(cfg: Any, console: Any) -> None:
    """The start of ``suder run``: the plan's table (main process), and on a CUDA device smaller than the plan a
    one-line ``ConfigError`` naming what would fit, before any weights load. A backbone without memory facts, or a
    model whose config cannot be read (``BackboneError``: the load that follows reports it in its one line), gets
    no plan and no note (``suder plan`` says why); any other failure to plan is a note, never a stop."""
    from . import memory
    from .errors import BackboneError

    engine, processes = memory.launched()
    name, total = memory.device_memory()
    try:
        p = memory.plan(cfg, engine=engine, processes=processes, device="cpu" if total is None else "cuda")
    except BackboneError:
        return
    except Exception as exc:  # a plan that cannot be made (an unusual config file) never blocks a run that can start
        console.print(f"No memory plan: {type(exc).__name__}: {exc}", highlight=False)
        return
    chunk = memory.auto_chunk(cfg, total, facts=p.facts, engine=engine, processes=processes) if total else None
    if chunk is not None:  # rollout_chunk_size auto: the trainer starts from the same chunk (Trainer.__init__)
        p = memory.plan(cfg, p.facts, engine=engine, processes=processes, chunk=chunk)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(memory.plan_table(p))
        if total is None:
            console.print("On CPU: no fit check.")
        elif chunk is not None:
            console.print(f"rollout_chunk_size auto: {chunk} samples per call, the largest whose plan fits {name}.",
                          highlight=False)
    if total is not None:
        memory.check_fits(p, cfg, total, name)


# ------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one ``Error:`` line (exit code 2) like every other error."""

    def error(self, message: str):
        line = f"[bold red]Error:[/] {message}; see `{self.prog} --help`."
        term.console().print(line, highlight=False, soft_wrap=True)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="suder", description="Self-improve unified multimodal models with dual self-rewards."
    )
    p.add_argument("--version", action="version", version=f"suder {_version()}")
    sub = p.add_subparsers(dest="command")

    b = sub.add_parser("backbones", help="list installed backbones")
    b.add_argument("--json", action="store_true", help="machine-readable output")

    w = sub.add_parser("world", help="ShapesWorld utilities")
    wsub = w.add_subparsers(dest="world_command")
    we = wsub.add_parser("export", help="write N rendered scenes and their true captions")
    we.add_argument("--num", type=int, default=100)
    we.add_argument("--seed", type=int, default=0)
    we.add_argument("--output-dir", "--out", dest="out", required=True, help="the folder to write")

    pt = sub.add_parser("pretrain", help="supervised pre-training on paired ShapesWorld")
    pt.add_argument("--backbone", default="toy")
    pt.add_argument("--output-dir", "--out", dest="out", required=True, help="the folder to write")
    pt.add_argument("--steps", type=int, default=None, help="default: the backbone's recipe (toy: 500)")
    pt.add_argument("--seed", type=int, default=None, help="default: the backbone's recipe (0 unless it names one)")

    g = sub.add_parser("generate", help="sample images for a benchmark's prompts, in the folder its scorer reads")
    g.add_argument("--backbone", required=True)
    g.add_argument("--model")
    g.add_argument(
        "--prompts",
        required=True,
        help="geneval: evaluation_metadata.jsonl (or .txt); dpg-bench: its prompts/ folder or dpg_bench.csv; "
        "t2i-compbench: one of its .txt files",
    )
    g.add_argument("--layout", choices=("geneval", "dpg-bench", "t2i-compbench"), default="geneval")
    g.add_argument("--num-samples", type=int, default=None, help="per prompt (default: geneval 4, dpg-bench 4, t2i 10)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--resume", action="store_true", help="skip prompts whose files are all in --out (each prompt has its own seed)"
    )
    g.add_argument("--guidance-scale", type=float, default=None, help="default: the scale stored with the model")
    g.add_argument("--output-dir", "--out", dest="out", required=True, help="the folder to write")

    c = sub.add_parser("caption", help="caption every image of a folder (greedy unless --temperature)")
    c.add_argument("--backbone", required=True)
    c.add_argument("--model")
    c.add_argument("--images", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--output-dir", "--out", dest="out", required=True, help="the .jsonl file to write")

    e = sub.add_parser("eval", help="judged ShapesWorld accuracy (T2I per family, captions)")
    e.add_argument("--backbone", default="toy")
    e.add_argument("--model", required=True)
    e.add_argument("--num", type=int, default=400)
    e.add_argument("--seed", type=int, default=999)
    e.add_argument("--json", action="store_true")

    rp = sub.add_parser(
        "report", help="one self-contained HTML page of a run (config, judge table, curves, samples) or of several"
    )
    rp.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR",
        help="the --output-dir of a `suder run` (finished or still training); several: their curves overlaid",
    )
    rp.add_argument(
        "--output-dir", "--out", dest="out",
        help="HTML file to write (default: RUN_DIR/report.html; several runs: compare.html here)",
    )
    rp.add_argument("--max-grids", type=int, default=12, help="sample-grid steps shown, evenly spaced (default 12)")
    rp.add_argument(
        "--watch", type=int, metavar="SECONDS", help="rewrite every SECONDS until the run ends; the page reloads"
    )

    pu = sub.add_parser("push", help="upload a run's final model (or a checkpoint) and its model card to the Hub")
    pu.add_argument("run_dir", help="the --output-dir of a finished `suder run`")
    pu.add_argument(
        "--repo-id", required=True, help="the Hub model repository: NAME or OWNER/NAME (created if missing)",
    )
    pu.add_argument("--checkpoint", metavar="step-N", help="push checkpoints/step-N/model instead of final/")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--revision", "--branch", dest="revision", help="the branch to push to (created if missing)")
    pu.add_argument("--commit-message", help="default: 'suder: final model of RUN' (or the checkpoint's step)")
    pu.add_argument("--token", help="a Hugging Face token with write access (default: HF_TOKEN or `hf auth login`)")

    # parsed by ``parse_run`` (options generated from the config); listed here for `suder --help`
    sub.add_parser(
        "run",
        help="self-improve with dual self-rewards (no arguments: the embedded ShapesWorld default; "
        "`suder run --help` lists every setting)",
        add_help=False,
    )
    sub.add_parser("plan", help="the memory plan of a run (takes `suder run`'s options; no weights load)",
                   add_help=False)
    sub.add_parser("env", help="versions, devices and installed backbones, to paste into a bug report")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Plugin and drift warnings as one line; anything else as Python would show it."""
    from .monitors import DriftWarning
    from .plugins import SuderPluginWarning

    if issubclass(category, (SuderPluginWarning, DriftWarning)):
        term.console().print(f"[yellow]Warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    finally:
        several = _end_process_group()  # also when _main raised: the group ends, the traceback is Python's
    if several:
        # One of several processes (torchrun / accelerate launch), its work done, outputs closed and the group
        # ended: leave without the interpreter's teardown, where threads of torch.distributed still running can
        # abort the process ("terminate called without an active exception") and fail a finished job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv[:1] == ["run"]:
            cmd_run(argv[1:])
            return 0
        if argv[:1] == ["plan"]:
            cmd_plan(argv[1:])
            return 0
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "env":
            cmd_env(args)
        elif args.command == "world":
            if args.world_command != "export":
                parser.parse_args(["world", "--help"])
            cmd_world_export(args)
        else:
            {
                "backbones": cmd_backbones,
                "pretrain": cmd_pretrain,
                "generate": cmd_generate,
                "caption": cmd_caption,
                "eval": cmd_eval,
                "report": cmd_report,
                "push": cmd_push,
            }[args.command](args)
    except SuderError as exc:
        term.console().print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _end_process_group() -> bool:
    """Under torchrun / accelerate launch, end the process group before exit (a gloo group left to interpreter
    shutdown can abort a process); True if it spanned several processes (a one-process group, as accelerate
    may set up, is only ended)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        several = torch.distributed.get_world_size() > 1
        torch.distributed.destroy_process_group()
        return several
    return False


if __name__ == "__main__":
    sys.exit(main())
