"""The ``suder`` command: thin commands, each calling one public function; rendering with rich.

Errors that suder raises on purpose (``SuderError``) are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import SuderError


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr)


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_console(),
        transient=False,
    )


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
    console = _console(stderr=False)
    console.print(table)
    for r in rows:  # one unwrapped line each, so the whole error can be read and searched
        if r["error"] is not None:
            console.print(
                f"[red]Skipped plugin[/] '{r['plugin']}' ({r['distribution']} {r['version']}): {r['error']}".strip(),
                highlight=False,
                soft_wrap=True,
            )


def cmd_world_export(args) -> None:
    from .worlds import shapes

    pairs = shapes.export(args.num, args.seed, args.out)
    _console().print(f"Wrote {len(pairs)} images and captions.jsonl to {args.out}")


def cmd_pretrain(args) -> None:
    from .pretrain import pretrain

    with _progress() as bar:
        task = bar.add_task("pretrain", total=args.steps, info="")
        result = pretrain(
            args.backbone,
            out=args.out,
            steps=args.steps,
            seed=args.seed,
            callback=lambda m: bar.update(task, completed=m["step"], info=f"loss {m['loss']:.3f}"),
        )
    _console().print(f"Saved to {args.out} ({result.seconds:.0f} s, final loss {result.losses[-1]:.3f})")


def cmd_generate(args) -> None:
    """Sample images for a benchmark's prompt file and write the folder its scorer reads (``suder.exports``)."""
    import torch

    from . import exports

    n = args.num_samples or exports.DEFAULT_SAMPLES.get(args.layout, 4)
    exports.check_layout(args.layout, n)
    items = exports.read_items(args.layout, args.prompts)
    model = _load(args)
    out = Path(args.out)
    size = None
    with _progress() as bar:
        task = bar.add_task("generate", total=len(items), info="")
        for i, item in enumerate(items):
            gen = torch.Generator().manual_seed(exports.item_seed(args.seed, i))
            images = model.sample_image(
                [item.prompt], num_samples=n, generator=gen, guidance_scale=args.guidance_scale
            ).images
            exports.write_item(args.layout, out, i, item, images)
            size = images[0].size[0]
            bar.update(task, advance=1)
    scorer = exports.SCORERS[args.layout].format(out=out.resolve(), resolution=size)
    _console().print(f"Wrote {len(items)} x {n} images to {out} ({args.layout} layout). Score with: {scorer}")


def cmd_caption(args) -> None:
    import torch

    from .data import list_images, load_image

    files = list_images(args.images)
    images = [load_image(f) for f in files]
    model = _load(args)
    gen = torch.Generator().manual_seed(args.seed)
    temperature = 0.0 if args.temperature is None else args.temperature
    lines = []
    with _progress() as bar:
        task = bar.add_task("caption", total=len(files), info="")
        for i in range(0, len(files), args.batch_size):
            texts = model.sample_text(images[i : i + args.batch_size], generator=gen, temperature=temperature).texts
            lines += [
                json.dumps({"image": f.name, "caption": t}) for f, t in zip(files[i : i + args.batch_size], texts)
            ]
            bar.update(task, advance=len(texts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    _console().print(f"Wrote {len(lines)} captions to {args.out}")


def cmd_eval(args) -> None:
    from .evaluate import evaluate

    model = _load(args)
    result = evaluate(model, num=args.num, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    _console(stderr=False).print(results_table([("model", result)]))


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
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for label, res in rows:
        cells = []
        for group, key in cols:
            v = res.get(group, {}).get(key)
            cells.append("-" if v is None else f"{100 * v:.1f}")
        table.add_row(label, *cells)
    return table


def cmd_run(args, extra: list[str]) -> None:
    from .config import parse_value
    from .errors import ConfigError
    from .trainer import train

    flags: dict[str, Any] = {}
    for key in ("backbone", "model", "algo", "strategy", "prompts", "images", "output_dir"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    if args.resume:
        flags["resume"] = True
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ConfigError(f"Unexpected argument '{token}'; options look like --key value.")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"Option '{token}' needs a value.")
            raw, i = extra[i + 1], i + 2
        flags[key] = parse_value(key, raw)
    console = _console()
    from .config import resolve

    resolve(args.config, flags)  # fail on a bad option before any expensive work
    if args.backbone in (None, "toy") and not flags.get("model") and not args.config:
        from .pretrain import cache_dir, ensure_toy_base

        console.print(f"[bold]suder run[/]: the embedded default (toy backbone on ShapesWorld); cache: {cache_dir()}")
        with _progress() as bar:  # the pre-trained base is built once, on first use
            task = bar.add_task("pretrain base (first use)", total=None, info="", visible=False)
            flags["model"] = str(
                ensure_toy_base(
                    callback=lambda m: bar.update(
                        task, total=m["total_steps"], completed=m["step"], info=f"loss {m['loss']:.3f}", visible=True
                    )
                )
            )
    with _progress() as bar:
        task = bar.add_task("dsr", total=None, info="")

        def on_step(m: dict) -> None:
            parts = [f"{k.split('/')[0]} r={m[k]:.2f}" for k in ("gen/reward_mean", "und/reward_mean") if k in m]
            for k in ("gen/judge_acc", "und/judge_acc"):
                if k in m:
                    parts.append(f"{k.split('/')[0]} judge={100 * m[k]:.0f}%")
            bar.update(task, total=m["total_steps"], completed=m["step"], info="  ".join(parts))

        result = train(flags.pop("backbone", "toy"), config_file=args.config, flags=flags, callback=on_step)
    if result.before or result.after:
        _console(stderr=False).print(results_table([("before", result.before), ("after", result.after)]))
    console.print(f"Run folder: {result.output_dir}  final model: {result.final_model}")


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suder", description="Self-improve unified multimodal models with dual self-rewards."
    )
    sub = p.add_subparsers(dest="command")

    b = sub.add_parser("backbones", help="list installed backbones")
    b.add_argument("--json", action="store_true", help="machine-readable output")

    w = sub.add_parser("world", help="ShapesWorld utilities")
    wsub = w.add_subparsers(dest="world_command")
    we = wsub.add_parser("export", help="write N rendered scenes and their true captions")
    we.add_argument("--num", type=int, default=100)
    we.add_argument("--seed", type=int, default=0)
    we.add_argument("--out", required=True)

    pt = sub.add_parser("pretrain", help="supervised pre-training on paired ShapesWorld")
    pt.add_argument("--backbone", default="toy")
    pt.add_argument("--out", required=True)
    pt.add_argument("--steps", type=int, default=500)
    pt.add_argument("--seed", type=int, default=0)

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
    g.add_argument("--guidance-scale", type=float, default=None, help="default: the scale stored with the model")
    g.add_argument("--out", required=True)

    c = sub.add_parser("caption", help="caption every image of a folder (greedy unless --temperature)")
    c.add_argument("--backbone", required=True)
    c.add_argument("--model")
    c.add_argument("--images", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--out", required=True)

    e = sub.add_parser("eval", help="judged ShapesWorld accuracy (T2I per family, captions)")
    e.add_argument("--backbone", default="toy")
    e.add_argument("--model", required=True)
    e.add_argument("--num", type=int, default=400)
    e.add_argument("--seed", type=int, default=999)
    e.add_argument("--json", action="store_true")

    r = sub.add_parser(
        "run",
        help="self-improve with dual self-rewards (no arguments: the embedded ShapesWorld default)",
        epilog="Any config field is also an option: --lr 1e-5 --group-size 8 ... (see docs/configuration.md)",
    )
    r.add_argument("--backbone")
    r.add_argument("--model")
    r.add_argument("--algo", choices=("simpo", "grpo"))
    r.add_argument("--strategy", choices=("unified", "gen", "und", "separate"))
    r.add_argument("--prompts")
    r.add_argument("--images")
    r.add_argument("--output-dir", dest="output_dir")
    r.add_argument("--config", help="YAML file of config fields (flags override it)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Plugin warnings as one line; anything else as Python would show it."""
    from .plugins import SuderPluginWarning

    if issubclass(category, SuderPluginWarning):
        _console().print(f"[yellow]Warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "run":
            cmd_run(args, extra)
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
            }[args.command](args)
    except SuderError as exc:
        _console().print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
