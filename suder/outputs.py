"""What a run writes to ``--output-dir``, and how it resumes.

::

    config.yaml              the resolved config (re-runnable with --config)
    metrics.jsonl            one JSON object per step
    samples/step-000050-gen.png, -und.png   prompts with their images; images with their captions
    checkpoints/step-000100/ model/ (save_pretrained; gen/ and und/ for the separate strategy) and state/
                             (accelerate's optimizer, scheduler and RNG state), written then renamed
    final/                   save_pretrained folder(s) of the trained model
    run.json                 {"base_model", "final_model", "before", "after", ...}
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from .trainer import TrainResult, atomic_replace, dump_json


class RunWriter:
    def __init__(self, out: Path, main: bool):
        self.out, self.main = Path(out), main
        self.best: float | None = None
        self.bad_evals = 0

    # ------------------------------------------------------------------ config and metrics
    def write_config(self, cfg: Any, extra: dict[str, Any]) -> None:
        import yaml

        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.extra = extra

    def log(self, metrics: dict[str, Any]) -> None:
        if self.main:
            clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(clean, default=float) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _save_models(self, trainer: Any, folder: Path) -> None:
        keys = ["gen", "und"] if trainer.cfg.strategy == "separate" else ["policy"]
        for key in keys:
            target = folder if key == "policy" else folder / key
            trainer.unwrapped(key).save_pretrained(str(target))

    def checkpoint(self, trainer: Any, step: int) -> Path:
        acc = trainer.acc
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
            acc.save_state(str(tmp / "state"))
        finally:
            quiet.setLevel(level)
        if self.main:
            self._save_models(trainer, tmp / "model")
            (tmp / "step.json").write_text(json.dumps({"step": step}))
            atomic_replace(tmp, final)
        acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step-*"))
        return found[-1] if found else None

    def restore(self, trainer: Any) -> int:
        """Load the last checkpoint's optimizer/scheduler/model state; returns the step to continue from."""
        last = self.latest_checkpoint()
        if last is None:
            return 0
        trainer.acc.load_state(str(last / "state"))
        step = json.loads((last / "step.json").read_text())["step"]
        log = self.out / "metrics.jsonl"
        if self.main and log.exists():
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            log.write_text("".join(line + "\n" for line in kept))
        return step

    def save_final(self, trainer: Any) -> Path:
        final = self.out / "final"
        tmp = self.out / ".final.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            self._save_models(trainer, tmp)
            atomic_replace(tmp, final)
        trainer.acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ monitoring
    def early_stop(self, trainer: Any, step: int) -> bool:
        """Judge a small held-out slice; True after ``early_stopping_patience`` evaluations without a gain."""
        from .evaluate import evaluate, headline

        cfg = trainer.cfg
        if not self.main:
            return False
        models = ("gen", "und") if cfg.strategy == "separate" else ("policy", "policy")
        t2i = evaluate(trainer.unwrapped(models[0]), num=cfg.early_stopping_num, seed=4242, what=("t2i",))
        cap = evaluate(trainer.unwrapped(models[1]), num=cfg.early_stopping_num, seed=4242, what=("caption",))
        h = headline(t2i | cap)
        score = (h["t2i"] if "gen" in cfg.directions else 0) + (h["caption_greedy"] if "und" in cfg.directions else 0)
        self.log({"step": step, "heldout/t2i": h["t2i"], "heldout/caption_greedy": h["caption_greedy"]})
        if self.best is None or score > self.best:
            self.best, self.bad_evals = score, 0
            return False
        self.bad_evals += 1
        return bool(cfg.early_stopping_patience) and self.bad_evals >= cfg.early_stopping_patience

    def sample_grids(self, step: int, rollouts: list[Any]) -> None:
        if not self.main:
            return
        folder = self.out / "samples"
        folder.mkdir(exist_ok=True)
        for r in rollouts:
            path = folder / f"step-{step:06d}-{r.direction}.png"
            if path.exists():
                continue
            grid = image_grid(r) if r.direction == "gen" else caption_grid(r)
            grid.save(path)

    # ------------------------------------------------------------------ the end
    def finish(self, trainer, before, after, history, final, stopped) -> TrainResult:
        cfg = trainer.cfg
        result = TrainResult(
            output_dir=str(self.out),
            base_model=trainer.base_path,
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
                    "steps": len(history),
                    "stopped_early": stopped,
                    "algo": cfg.algo,
                    "strategy": cfg.strategy,
                    "cfg_policy": cfg.cfg_policy,
                    "guidance_scale": cfg.guidance_scale,
                    **getattr(self, "extra", {}),
                },
            )
        return result


# ---------------------------------------------------------------------------------------------- grids
def _draw_text(draw, xy, text, width_chars: int = 28) -> None:
    lines = [text[i : i + width_chars] for i in range(0, len(text), width_chars)][:3]
    draw.multiline_text(xy, "\n".join(lines), fill=(230, 230, 230))


def image_grid(r: Any, groups: int = 4, scale: int = 2):
    """One row per prompt: the prompt, then its G images."""
    from PIL import Image, ImageDraw

    G = r.group_size
    images = r.samples.images[: groups * G]
    size = images[0].size[0] * scale
    label_w = 180
    canvas = Image.new("RGB", (label_w + G * (size + 2), (len(images) // G) * (size + 4)), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        row, col = divmod(i, G)
        if col == 0:
            _draw_text(draw, (4, row * (size + 4) + 4), r.samples.prompts[i])
        canvas.paste(im.resize((size, size), Image.NEAREST), (label_w + col * (size + 2), row * (size + 4)))
    return canvas


def caption_grid(r: Any, groups: int = 4, scale: int = 2):
    """One row per image: the image, then its G captions with their rewards."""
    from PIL import Image, ImageDraw

    G = r.group_size
    images = r.samples.images
    size = images[0].size[0] * scale
    line_h = 12
    row_h = max(size, G * line_h) + 6
    n = min(groups, len(images) // G)
    canvas = Image.new("RGB", (size + 420, n * row_h), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for g in range(n):
        canvas.paste(images[g * G].resize((size, size), Image.NEAREST), (0, g * row_h))
        for j in range(G):
            i = g * G + j
            text = f"{r.rewards[i].item():8.2f}  {r.samples.texts[i]}"
            draw.text((size + 8, g * row_h + j * line_h), text, fill=(230, 230, 230))
    return canvas

