"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases, Trackio, MLflow, ... through accelerate.

accelerate owns the trackers (``Accelerator(log_with=..., project_dir=...)``, ``init_trackers``, ``log``,
``end_training``); this module only decides what goes to them:

* the resolved config as hyper-parameters (flattened to scalars: lists and dicts as JSON, ``None`` as ``"None"``,
  because TensorBoard's hparams accept only bool, int, float and str);
* every line of ``metrics.jsonl`` at its ``step`` (NaN and non-numeric values are left out);
* each sample grid (``samples/step-*-{gen,und}.png``) as an image ``samples/gen`` / ``samples/und`` at its step,
  through the tracker's own image call (accelerate has no tracker-independent one);
* at the end, the judged before/after numbers of ``run.json`` as ``judge_before/*`` and ``judge_after/*`` at
  the last step (trackers such as W&B drop steps lower than one already logged, so no point goes back to step 0).

Files land under ``OUTPUT_DIR/logs`` for trackers that write locally (TensorBoard: ``OUTPUT_DIR/logs/suder``); the
project is ``suder`` and the run is named after the output folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError, closest

PROJECT = "suder"
# accelerate's tracker names -> the module that must be importable (pip package in PIP when it differs)
TRACKERS: dict[str, str] = {
    "aim": "aim",
    "clearml": "clearml",
    "comet_ml": "comet_ml",
    "dvclive": "dvclive",
    "mlflow": "mlflow",
    "swanlab": "swanlab",
    "tensorboard": "tensorboard",
    "trackio": "trackio",
    "wandb": "wandb",
}
PIP = {"comet_ml": "comet-ml", "tensorboard": "tensorboard (or: pip install 'suder[tracking]')"}


def parse_report_to(value: Any) -> list[str]:
    """``"tensorboard,wandb"``, ``["tensorboard"]``, ``"none"`` or ``None`` -> a list of known tracker names."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in v.split(",")]
    else:
        raise ConfigError(f"report_to must be a tracker name, a comma-separated string or a list, got {value!r}.")
    names: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name or name == "none" or name in names:
            continue
        if name not in TRACKERS:
            hint = closest(name, TRACKERS)
            extra = f" Did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"Unknown tracker '{name}' in report_to. Available: {', '.join(TRACKERS)}, none.{extra}")
        names.append(name)
    return names


def check_installed(names: list[str]) -> None:
    """accelerate silently skips a tracker whose package is missing; we say so before the run starts."""
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            pip = PIP.get(name, name)
            raise ConfigError(f"report_to '{name}' needs the {name} package, which is not installed: pip install {pip}")


def accelerator_kwargs(cfg: Any) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs to know about the trackers of ``cfg``."""
    if not cfg.report_to:
        return {}
    return {"log_with": list(cfg.report_to), "project_dir": str(Path(cfg.output_dir) / "logs")}


def hparams(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The config as scalar hyper-parameters."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif value is None:
            out[key] = "None"
        else:
            out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line, without its ``step``."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracking:
    """The run's trackers; every method is a no-op when ``report_to`` is empty or off the main process."""

    def __init__(self, acc: Any, cfg: Any):
        self.acc = acc
        self.on = bool(cfg.report_to)
        if not self.on:
            return
        run = Path(cfg.output_dir).resolve().name
        names = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "swanlab": "experiment_name"}
        init = {tracker: {key: run} for tracker, key in names.items() if tracker in cfg.report_to}
        acc.init_trackers(PROJECT, config=hparams(cfg.to_flat_dict()), init_kwargs=init)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.on:
            self.acc.log(scalars(metrics), step=int(metrics["step"]))

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """``{"samples/gen": PIL.Image, ...}`` at ``step``, through each tracker's own image call."""
        if not (self.on and images and self.acc.is_main_process):
            return
        for tracker in self.acc.trackers:
            _log_images(tracker, step, images)

    def end(self, before: dict[str, Any], after: dict[str, Any], step: int) -> None:
        if not self.on:
            return
        from .evaluate import headline

        judged = {}
        for when, result in (("before", before), ("after", after)):
            if result:
                judged |= {f"judge_{when}/{k}": v for k, v in headline(result).items()}
        if judged:
            self.acc.log(scalars(judged), step=step)
        self.acc.end_training()


def _log_images(tracker: Any, step: int, images: dict[str, Any]) -> None:
    import numpy as np

    name = tracker.name
    if name == "tensorboard":
        for key, image in images.items():
            tracker.writer.add_image(key, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
        tracker.writer.flush()
    elif name == "trackio":
        import trackio

        tracker.run.log({key: trackio.Image(image) for key, image in images.items()}, step=step)
    elif name == "mlflow":
        import mlflow

        for key, image in images.items():
            mlflow.log_image(image, key=key.replace("/", "_"), step=step)
    elif name == "comet_ml":
        for key, image in images.items():
            tracker.tracker.log_image(image, name=key, step=step)
    elif hasattr(tracker, "log_images"):  # wandb, aim, clearml, swanlab: {key: [images]}
        tracker.log_images({key: [image] for key, image in images.items()}, step=step)
