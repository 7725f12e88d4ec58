"""What a run writes to ``--output-dir``, how it survives a crash, and how it resumes.

::

    config.yaml              the resolved config, with the layer that set each value (``sources:``) and the
                             settings changed on resume (``history:``); re-runnable with --config
    metrics.jsonl            one JSON object per training step (held-out scores merged into their step)
    before.json              the judge's scores of the base model (kept for --resume)
    samples/step-000050-gen.png, -und.png   the sampled images (gen: a row per prompt; und: the images captioned)
    samples/step-000050-gen.json, -und.json the prompts / captions of those rows with each sample's reward
    checkpoints/step-000100/ model/ (save_pretrained; gen/ and und/ for the separate strategy; its model card),
                             state/ (accelerate's optimizer, scheduler and RNG state) and step.json
    final/                   save_pretrained folder(s) of the trained model, README.md (its model card in the Hub's
                             format, ``suder.hub``) and samples.png (the last sample grids), ready for ``suder push``
    run.json                 {"base_model", "final_model", "before", "after", "steps", "selfeval", ...}
    selfeval.json            the frozen base's own held-out self-evaluation (the baseline; kept for --resume)
    best/                    the weights of the best held-out self-score so far (select_final best, or guard
                             rollback) with selfeval.json ({"step", "score"}); at the end, with select_final best,
                             it becomes final/ and the last weights go to last/
    logs/                    experiment-tracker files when report_to is set (TensorBoard: logs/suder/)

Crash safety (``kill -9`` at any moment): every folder is written under a temporary name and renamed into place;
``final/`` is swapped with the new one atomically (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere a rename
pair that the next start repairs), so the last complete checkpoint and the previous ``final/`` stay loadable.
A torn last line of ``metrics.jsonl`` is dropped on resume, and lines after the checkpoint's step are cut, so
each step is logged once. A full disk is a ``TrainingError`` that keeps the last complete checkpoint.

Resume (``resume_config``): the run's saved ``config.yaml`` is the resumed run's config. What the new command sets
may change only what leaves the run's maths alone (``MAY_CHANGE_ON_RESUME``: length, logging, sample/save/eval
cadence), and each such change is recorded in ``config.yaml``'s ``history:``; any other difference (``--model``,
``--group-size``, ...) is a one-line ``ConfigError`` naming the settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, TrainingError
from .hf_save import no_deepspeed_probe

if TYPE_CHECKING:
    from .config import TrainConfig

RUN_FILES = ("metrics.jsonl", "run.json", "before.json", "selfeval.json")
RUN_DIRS = ("checkpoints", "samples", "final", "logs", "best", "last")
# what a resumed run may change: how long it runs, what it logs and how often it samples, saves and evaluates
MAY_CHANGE_ON_RESUME = (
    "steps", "epochs", "report_to", "sample_every", "save_every", "save_total_limit", "eval_every", "eval_num",
    "early_stopping_patience", "early_stopping_num", "gradient_checkpointing", "push_to_hub", "hub_repo_id",
    "hub_private", "select_final", "guard_drop", "guard_action", "guard_lr_factor",
)
RUN_CONTROL = ("resume", "overwrite", "output_dir")  # how the command treats the folder, not run settings


@dataclass
class TrainResult:
    """What a run produced: paths and numbers (also in ``run.json``)."""

    output_dir: str
    base_model: str | None
    final_model: str
    before: dict[str, Any]
    after: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    hub_url: str | None = None  # the commit that push_to_hub made


@dataclass
class ModelsToSave:
    """What a checkpoint or the final folder saves: ``views`` maps each trained model's subfolder (``""`` for the
    one model of a run, ``gen``/``und`` for the separate strategy) to its whole-weights view (entered by every
    process; sharded weights need them all); ``marker``: the ShapesWorld marker's fields
    (``suder.pretrain.write_marker``), ``None`` to write none."""

    views: dict[str, Callable[[], AbstractContextManager[Any]]]
    marker: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- files
def dump_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_replace(tmp: Path, final: Path) -> None:
    """Put the fully written folder ``tmp`` at ``final``; at no moment is ``final`` missing or half written
    (where the platform can swap atomically), and if the swap is interrupted, ``recover`` restores the old one."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the old folder
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(folder: Path) -> None:
    """Repair a swap interrupted between its two renames (non-Linux fallback of ``atomic_replace``)."""
    for old in folder.glob(".*.old"):
        final = old.with_name(old.name[1 : -len(".old")])
        if not final.exists():
            os.replace(old, final)


def read_metrics(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The step lines of ``metrics.jsonl`` (at most ``upto``), skipping a line torn by a crash."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (upto is None or row.get("step", 0) <= upto):
            rows.append(row)
    return rows


def check_writable(folder: Path) -> None:
    """A one-line ``ConfigError`` unless ``folder`` exists as a writable folder or can be created."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"Cannot create output folder '{folder}': '{probe}' is a file; choose another --output-dir.")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot create output folder '{folder}': '{probe}' is not writable; choose another one.")


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class RunWriter:
    """The run folder: decides fresh start or resume, writes metrics, checkpoints and the final model. It is given
    records (the config, metrics, the models to save as ``ModelsToSave``, the accelerator whose state a checkpoint
    holds), never the trainer."""

    def __init__(self, out: Path, main: bool):
        self.out, self.main = Path(out), main
        self.best: float | None = None
        self.bad_evals = 0
        self.extra: dict[str, Any] = {}
        self.tracking: Any = None  # tracking.Tracking when report_to is set
        self.selfeval: dict[str, Any] | None = None  # the self-evaluation's state (selfeval.Tracker), per checkpoint

    # ------------------------------------------------------------------ start
    def holds_run(self) -> list[str]:
        """What a previous run left in the folder (empty: nothing)."""
        found = [n for n in RUN_FILES if (self.out / n).exists()]
        found += [n + "/" for n in RUN_DIRS if (self.out / n).is_dir() and any((self.out / n).iterdir())]
        return found

    def plan_start(self, cfg: TrainConfig) -> Path | None:
        """The checkpoint to resume from, or None for a fresh start; a one-line ``ConfigError`` when the folder
        and ``resume``/``overwrite`` disagree. Reads only; safe to call before any expensive work."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"Output folder '{self.out}' is a file; choose another --output-dir.")
        if self.out.is_dir():
            recover(self.out)
            if (self.out / "checkpoints").is_dir():
                recover(self.out / "checkpoints")
        last = self.latest_checkpoint()
        if cfg.resume:
            if last is not None:
                return last
            if cfg.resume is True:
                raise ConfigError(
                    f"Nothing to resume in '{self.out}': it has no complete checkpoint. Run without --resume "
                    "to start fresh, or pass --resume auto to resume when possible."
                )
        elif self.holds_run() and not cfg.overwrite:
            raise ConfigError(
                f"Output folder '{self.out}' already holds a run ({', '.join(self.holds_run())}); pass --resume to "
                "continue it, --overwrite to replace it, or choose another --output-dir."
            )
        if cfg.push_to_hub:  # a repo id, the network and a token, known before the run rather than after it
            from .hub import check_push

            check_push(cfg.hub_repo_id)
        return None

    def start(self, cfg: TrainConfig, extra: dict[str, Any], resume_from: Path | None) -> None:
        """Clear a replaced run (fresh start) and write ``config.yaml``."""
        self.extra = extra
        if not self.main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"Cannot create output folder '{self.out}': {exc.strerror}.") from exc
        if resume_from is None:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(self.out / name, ignore_errors=True)
        (self.out / "config.yaml").write_text(config_yaml(cfg))

    # ------------------------------------------------------------------ metrics
    def log(self, metrics: dict[str, Any]) -> None:
        if self.main:
            clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(clean, default=float) + "\n")
            if self.tracking:
                self.tracking.log(metrics)

    def save_record(self, name: str, record: dict[str, Any]) -> None:
        """A JSON record of the run, kept for a resume (``before.json``: the judge before training;
        ``selfeval.json``: the base's held-out self-evaluation); main process only."""
        if self.main:
            dump_json(self.out / name, record)

    def load_record(self, name: str) -> dict[str, Any] | None:
        """The record ``save_record`` wrote, or None."""
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ checkpoints
    def save_models(self, models: ModelsToSave, folder: Path) -> None:
        """``save_pretrained`` of each trained model (main process), from a view with whole weights: called by
        every process, since gathering sharded weights (ZeRO-3, FSDP) needs them all."""
        for sub, view in models.views.items():
            target = folder / sub if sub else folder
            with view() as backbone:
                if self.main:
                    with no_deepspeed_probe():
                        backbone.save_pretrained(str(target))
                    if models.marker is not None:  # still a ShapesWorld model
                        from .pretrain import write_marker

                        write_marker(target, models.marker | {"run": str(self.out)})

    def _guarded(self, what: str, tmp: Path, write) -> None:
        """Run ``write``; on a full disk remove the partial ``tmp`` and raise a ``TrainingError``."""
        try:
            write()
        except OSError as exc:
            if not _disk_full(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest_checkpoint()
            kept = f"the last complete checkpoint '{last}' is kept" if last else "no checkpoint was complete yet"
            raise TrainingError(
                f"No space left on the device while writing {what}; {kept}. Free space, then run again with "
                "--resume."
            ) from exc

    def checkpoint(self, acc: Any, models: ModelsToSave, step: int, save_total_limit: int) -> Path:
        """``checkpoints/step-N/``: the accelerator's state (``acc.save_state``), ``models`` and ``step.json``;
        every process calls it."""
        final = self.out / "checkpoints" / f"step-{step:06d}"
        tmp = self.out / "checkpoints" / f".step-{step:06d}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # accelerate warns that tied weights (the toy's lm_head = embed_tokens) are stored once; loading re-ties
        # them, and the resume test proves it. Quieten that one logger while saving.
        quiet = logging.getLogger("accelerate.utils.other")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self._guarded(f"checkpoint {step}", tmp, lambda: acc.save_state(str(tmp / "state")))
        finally:
            quiet.setLevel(level)
        self._guarded(f"checkpoint {step}", tmp, lambda: self.save_models(models, tmp / "model"))
        acc.wait_for_everyone()  # every process has written its part (its RNG state) before the folder is renamed
        if self.main:
            state = {"step": step, "best": self.best, "bad_evals": self.bad_evals, "selfeval": self.selfeval}

            def write() -> None:
                from .hub import write_card

                write_card(self.out, tmp / "model", step=step)
                (tmp / "step.json").write_text(json.dumps(state))
                atomic_replace(tmp, final)

            self._guarded(f"checkpoint {step}", tmp, write)
            self.prune(save_total_limit)
        acc.wait_for_everyone()
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (``step.json`` is written last), oldest first."""
        folder = self.out / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("step-*") if (p / "step.json").is_file())

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def prune(self, limit: int) -> None:
        """Keep the last ``limit`` checkpoints (0: keep all)."""
        if limit > 0:
            for old in self.checkpoints()[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, acc: Any, last: Path) -> tuple[int, list[dict[str, Any]]]:
        """Load ``last``'s model/optimizer/scheduler/RNG state; returns the step to continue from and the metrics
        logged up to it (later lines, from after the checkpoint, are cut so that each step is logged once)."""
        acc.load_state(str(last / "state"))
        state = json.loads((last / "step.json").read_text())
        step = int(state["step"])
        self.best, self.bad_evals = state.get("best"), int(state.get("bad_evals", 0))
        self.selfeval = state.get("selfeval")
        log = self.out / "metrics.jsonl"
        kept = read_metrics(log, upto=step)
        if self.main:
            tmp = log.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, log)
        acc.wait_for_everyone()
        return step, kept

    def save_final(self, acc: Any, models: ModelsToSave, select_best: bool = False) -> Path:
        """``final/``: the last weights; with ``select_best`` (and a ``best/``), the best weights become ``final/``
        and the last ones are written to ``last/``. Every process calls it."""
        best = self.out / "best"
        keep_best = select_best and (best / "selfeval.json").is_file()
        final = self.out / ("last" if keep_best else "final")
        tmp = self.out / f".{final.name}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._guarded("the final model", tmp, lambda: self.save_models(models, tmp))
        if self.main:
            self._guarded("the final model", tmp, lambda: atomic_replace(tmp, final))
            if keep_best:
                atomic_replace(best, self.out / "final")  # best/ is moved, not copied: final/ is now the best
        acc.wait_for_everyone()
        return self.out / "final"

    def save_best(self, acc: Any, models: ModelsToSave, step: int, score: float) -> Path:
        """``best/``: ``models`` and ``selfeval.json`` (``{"step", "score"}``), replacing the previous best
        atomically. Every process calls it."""
        best, tmp = self.out / "best", self.out / ".best.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._guarded("the best model", tmp, lambda: self.save_models(models, tmp))
        if self.main:
            def write() -> None:
                dump_json(tmp / "selfeval.json", {"step": step, "score": score})
                atomic_replace(tmp, best)

            self._guarded("the best model", tmp, write)
        acc.wait_for_everyone()
        return best

    def best_marker(self) -> dict[str, Any] | None:
        """``best/selfeval.json``: the step and score of the weights kept in ``best/`` (None: none kept)."""
        path = self.out / "best" / "selfeval.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ monitoring
    def heldout(self, cfg: TrainConfig, gen_model: Any, und_model: Any) -> tuple[dict[str, float], float]:
        """Judge a small held-out slice (``gen_model`` draws, ``und_model`` captions): the metrics and the score
        early stopping watches."""
        from .evaluate import evaluate, headline

        t2i = evaluate(gen_model, num=cfg.early_stopping_num, seed=4242, what=("t2i",))
        cap = evaluate(und_model, num=cfg.early_stopping_num, seed=4242, what=("caption",))
        h = headline(t2i | cap)
        score = (h["t2i"] if "gen" in cfg.directions else 0) + (h["caption_greedy"] if "und" in cfg.directions else 0)
        return {"heldout/t2i": h["t2i"], "heldout/caption_greedy": h["caption_greedy"]}, score

    def should_stop(self, score: float, patience: int) -> bool:
        """True after ``patience`` evaluations without a gain (0: never)."""
        if self.best is None or score > self.best:
            self.best, self.bad_evals = score, 0
            return False
        self.bad_evals += 1
        return bool(patience) and self.bad_evals >= patience

    def sample_grids(self, step: int, rollouts: list[Any]) -> None:
        if not self.main:
            return
        folder = self.out / "samples"
        folder.mkdir(exist_ok=True)
        for r in rollouts:
            path = folder / f"step-{step:06d}-{r.direction}.png"
            grid, record = sample_record(r)
            dump_json(path.with_suffix(".json"), record)  # the text and rewards beside the images
            tmp = path.with_suffix(".tmp.png")
            grid.save(tmp)
            os.replace(tmp, path)
            if self.tracking:
                self.tracking.log_images(step, {f"samples/{r.direction}": grid})

    # ------------------------------------------------------------------ the end
    def finish(
        self,
        cfg: TrainConfig,
        before: dict[str, Any],
        after: dict[str, Any],
        history: list[dict[str, Any]],
        final: Path,
        stopped: bool,
    ) -> TrainResult:
        """``run.json`` and the ``TrainResult``; ``base_model`` is the one ``start`` was given."""
        result = TrainResult(
            output_dir=str(self.out),
            base_model=self.extra.get("base_model"),
            final_model=str(final),
            before=before,
            after=after,
            metrics=history,
            config=cfg.to_dict(),
            stopped_early=stopped,
        )
        if self.main:
            dump_json(
                self.out / "run.json",
                {
                    "base_model": result.base_model,
                    "final_model": result.final_model,
                    "before": before,
                    "after": after,
                    "steps": history[-1]["step"] if history else 0,
                    "stopped_early": stopped,
                    "algo": cfg.algo,
                    "gen_algo": cfg.algo_for("gen"),
                    "und_algo": cfg.algo_for("und"),
                    "strategy": cfg.strategy,
                    "cfg_policy": cfg.cfg_policy,
                    "guidance_scale": cfg.guidance_scale,
                    **self.extra,
                },
            )
            from .hub import write_card

            write_card(self.out, final, repo_id=cfg.hub_repo_id if cfg.push_to_hub else None)
        if self.tracking:
            self.tracking.end(before, after, history[-1]["step"] if history else 0)
        if self.main and cfg.push_to_hub:  # last: a refused upload leaves every file of the run written
            result.hub_url = self._push(cfg, final, history[-1]["step"] if history else 0)
        return result

    def _push(self, cfg: TrainConfig, final: Path, steps: int) -> str:
        """push_to_hub: upload ``final/``; a failure says that the run is saved and how to push it later."""
        from .errors import HubError
        from .hub import push_folder

        try:
            return push_folder(final, cfg.hub_repo_id, private=cfg.hub_private,
                               commit_message=f"suder: final model after {steps} steps")
        except HubError as exc:
            raise HubError(
                f"{str(exc).rstrip('.')}; the run is saved in '{self.out}': push it with `suder push {self.out} "
                f"--repo-id {cfg.hub_repo_id}`."
            ) from None


# ---------------------------------------------------------------------------------------------- grids
def _cells(images: list[Any], min_size: int = 64) -> list[Any]:
    """Pixel-art images scaled up by a whole factor (nearest neighbour) to at least ``min_size`` px."""
    from PIL import Image

    k = max(1, math.ceil(min_size / images[0].size[0]))
    return [im.convert("RGB").resize((im.size[0] * k, im.size[1] * k), Image.NEAREST) for im in images]


def sample_record(r: Any, groups: int = 4) -> tuple[Any, dict[str, Any]]:
    """The sample grid of a rollout and its text: images only (``diffusers.utils.make_image_grid``, one row per
    group; gen: the G images of a prompt, und: the image captioned), and ``{"direction", "rows", "cols",
    "groups": [{"prompt" | "captions", "rewards", "judge"}]}`` for ``step-N-<direction>.json``, so that
    ``suder report`` shows prompts, captions and rewards as text beside each image."""
    from diffusers.utils import make_image_grid

    G = r.group_size
    n = min(groups, len(r.samples.images) // G)
    rewards = [round(float(x), 4) for x in r.rewards.flatten().tolist()]
    judge = None if r.judge is None else [int(x) for x in r.judge.flatten().tolist()]
    rows = []
    for g in range(n):
        one = slice(g * G, (g + 1) * G)
        row = {"rewards": rewards[one], "judge": None if judge is None else judge[one]}
        if r.direction == "gen":
            row["prompt"] = r.samples.prompts[g * G]
        else:
            row["captions"] = list(r.samples.texts[one])
        rows.append(row)
    if r.direction == "gen":
        grid, cols = make_image_grid(_cells(r.samples.images[: n * G]), rows=n, cols=G), G
    else:
        grid, cols = make_image_grid(_cells([r.samples.images[g * G] for g in range(n)]), rows=n, cols=1), 1
    record = {"direction": r.direction, "group_size": G, "rows": n, "cols": cols, "groups": rows}
    record["greedy_first"] = bool(getattr(r, "greedy_first", False))
    return grid, record


# ---------------------------------------------------------------------------------------------- config.yaml
CONFIG_HEADER = """\
# The resolved settings of this run. `sources` says which layer set each one (default < preset < config <
# flags < keywords; docs/configuration.md); `history` lists the settings changed when the run was resumed.
# Re-run it with: suder run --config config.yaml --output-dir NEW_FOLDER (flags given then override it).
"""


def config_yaml(cfg: TrainConfig) -> str:
    """``config.yaml``: the resolved values (sections nested), the preset, ``sources`` and ``history``."""
    import yaml

    data = cfg.to_dict()
    data["preset"] = getattr(cfg, "preset", None)
    data["sources"] = dict(getattr(cfg, "sources", {}))
    data["history"] = list(getattr(cfg, "history", []))
    return CONFIG_HEADER + yaml.safe_dump(data, sort_keys=False)


def resume_config(cfg: TrainConfig) -> TrainConfig:
    """The config a ``--resume`` continues with: the run's saved ``config.yaml``, with the changes the new command
    asks for that ``MAY_CHANGE_ON_RESUME`` allows (recorded in ``history``); ``cfg`` itself when there is nothing
    to resume (``plan_start`` then decides). A change to any other setting is a one-line ``ConfigError``."""
    import yaml

    from .config import DIRECTIONS, KEYS, USER_LAYERS, TrainConfig, flatten

    out = Path(cfg.output_dir)
    saved_file = out / "config.yaml"
    if not cfg.resume or not saved_file.is_file() or RunWriter(out, False).latest_checkpoint() is None:
        return cfg
    try:
        data = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"Cannot resume '{out}': its config.yaml is not valid YAML ({reason}).") from None
    sources = dict(data.pop("sources", None) or {})
    history = list(data.pop("history", None) or [])
    preset = data.pop("preset", None)
    saved = flatten(data, str(saved_file))
    if not sources:  # a config.yaml of an earlier version: flat keys, every value resolved
        sources = {k: "config" for k in saved}
    given = {k for k, layer in getattr(cfg, "sources", {}).items() if layer in USER_LAYERS} - set(RUN_CONTROL)
    new = cfg.to_flat_dict()
    changed = {k: (saved.get(k), new[k]) for k in sorted(given) if k in saved and saved[k] != new[k]}
    refused = [k for k in changed if k not in MAY_CHANGE_ON_RESUME]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        raise ConfigError(
            f"Cannot resume '{out}' with different settings: {shown} would change the run's maths; leave them out "
            "to continue it as it was started, or start a new run in another --output-dir."
        )
    values = {**saved, **{k: new[k] for k in changed}, **{k: new[k] for k in RUN_CONTROL}}
    nested: dict[str, Any] = {d: {} for d in DIRECTIONS}
    for key in KEYS:
        if key in values:
            section, _, name = key.rpartition(".")
            (nested[section] if section else nested)[name] = values[key]
    resumed = TrainConfig(**nested)
    resumed.sources = {**{k: sources.get(k, "config") for k in KEYS}, **{k: cfg.sources[k] for k in changed}}
    resumed.preset = preset
    step = RunWriter(out, False).latest_checkpoint().name
    if changed:
        history.append({"resumed_from": step, "changed": {k: {"from": a, "to": b} for k, (a, b) in changed.items()}})
    resumed.history = history
    return resumed
