"""Benchmark-ready folders: the exact layouts the GenEval, DPG-Bench and T2I-CompBench scorers read.

Pure functions (no model): ``read_items`` reads a benchmark's own prompt files, ``image_paths`` names the files
a prompt's samples go to, ``write_item`` saves them. ``suder generate --layout ...`` samples and calls them.

* GenEval (djghosh13/geneval, README "Image generation"): prompts from ``evaluation_metadata.jsonl`` (one JSON
  object a line); ``OUT/00000/metadata.jsonl`` holds that prompt's line unchanged, ``OUT/00000/samples/0000.png``
  ... its samples (4 by default). ``evaluation/evaluate_images.py OUT`` scores it.
* DPG-Bench (TencentQQGYLab/ELLA, ``dpg_bench/``): prompts from the ``prompts/`` folder (``<item_id>.txt``, one
  prompt each) or from ``dpg_bench.csv`` (columns ``item_id`` and ``text``); ``OUT/<item_id>.png`` is a 2x2 grid
  of 4 samples, row-major, because ``compute_dpg_bench.py`` crops the tiles at (0, 0), (r, 0), (0, r), (r, r) for
  ``--resolution r`` and looks the questions up by the file name. OUT holds nothing else (the scorer lists it).
* T2I-CompBench (Karine-Huang/T2I-CompBench): prompts from its ``examples/dataset/*.txt`` files (one a line, the
  first tab-separated field, as its ``inference_eval.py`` reads them); ``OUT/samples/<prompt>_<NNNNNN>.png``, 10
  per prompt, numbered by one counter over the whole file: the scorers take the prompt as the file name's text
  before the first ``_`` and sort by the number after the last one.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, closest

LAYOUTS = ("geneval", "dpg-bench", "t2i-compbench")
DEFAULT_SAMPLES = {"geneval": 4, "dpg-bench": 4, "t2i-compbench": 10}


@dataclass
class Item:
    """One benchmark prompt: ``key`` names its files (DPG-Bench's item id), ``line`` is GenEval's metadata line."""

    key: str
    prompt: str
    line: str = ""
    record: dict[str, Any] = field(default_factory=dict)


def check_layout(layout: str, num_samples: int) -> None:
    if layout not in LAYOUTS:
        hint = closest(layout, LAYOUTS)
        extra = f" Did you mean '{hint}'?" if hint else ""
        raise DataError(f"Unknown layout '{layout}'. Available: {', '.join(LAYOUTS)}.{extra}")
    if layout == "dpg-bench" and num_samples != 4:
        raise DataError(
            f"DPG-Bench scores a 2x2 grid of 4 samples per prompt; pass --num-samples 4, not {num_samples}."
        )
    if num_samples < 1:
        raise DataError(f"--num-samples must be >= 1, got {num_samples}.")


# ------------------------------------------------------------------------------------------- prompts
def read_items(layout: str, path: str | Path) -> list[Item]:
    """The prompts of a benchmark file or folder, in the benchmark's own format (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"Prompt file or folder '{p}' does not exist.")
    reader = {"geneval": _geneval, "dpg-bench": _dpg_bench, "t2i-compbench": _t2i_compbench}[layout]
    try:
        items = reader(p)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Prompt file '{p}' is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)."
        ) from exc
    if not items:
        raise DataError(f"'{p}' has no prompts.")
    return items


def _geneval(p: Path) -> list[Item]:
    if p.is_dir():
        raise DataError(f"GenEval prompts are one file (evaluation_metadata.jsonl); '{p}' is a folder.")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":  # a plain prompt list still gets the folder layout
            items.append(Item(f"{len(items):05d}", line.strip(), json.dumps({"prompt": line.strip()})))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n} is not valid JSON: {exc.msg}.") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise DataError(f"{p}:{n} has no string 'prompt' field (GenEval's evaluation_metadata.jsonl has one).")
        items.append(Item(f"{len(items):05d}", rec["prompt"], line.strip(), rec))
    return items


def _natural(key: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


def _dpg_bench(p: Path) -> list[Item]:
    if p.is_dir():
        files = sorted(p.glob("*.txt"), key=lambda f: _natural(f.stem))
        return [Item(f.stem, f.read_text(encoding="utf-8").strip()) for f in files if f.read_text().strip()]
    if p.suffix != ".csv":
        raise DataError(f"DPG-Bench prompts are a folder of <item_id>.txt files or dpg_bench.csv; got '{p}'.")
    items: dict[str, Item] = {}
    with open(p, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        if not {"item_id", "text"} <= set(rows.fieldnames or ()):
            raise DataError(f"{p} has no 'item_id' and 'text' columns (dpg_bench.csv has both).")
        for row in rows:  # one row per question; the prompt repeats on each
            items.setdefault(row["item_id"], Item(row["item_id"], row["text"].strip()))
    return list(items.values())


def _t2i_compbench(p: Path) -> list[Item]:
    if p.is_dir():
        raise DataError(f"T2I-CompBench prompts are one .txt file (e.g. color_val.txt); '{p}' is a folder.")
    prompts = [line.split("\t")[0].strip() for line in p.read_text(encoding="utf-8").splitlines()]
    items = []
    for n, prompt in enumerate(prompts, 1):
        if not prompt:
            continue
        if "_" in prompt or "/" in prompt or len(prompt.encode()) > 240:
            raise DataError(
                f"{p}:{n}: T2I-CompBench names files '<prompt>_<number>.png', so a prompt must have no '_' or '/' "
                "and at most 240 bytes; edit that line."
            )
        items.append(Item(f"{len(items):05d}", prompt))
    return items


# ------------------------------------------------------------------------------------------- files
def image_paths(layout: str, index: int, item: Item, num_samples: int) -> list[str]:
    """Where the samples of prompt number ``index`` go, relative to the output folder (DPG-Bench: one grid)."""
    if layout == "geneval":
        return [f"{index:05d}/samples/{j:04d}.png" for j in range(num_samples)]
    if layout == "dpg-bench":
        return [f"{item.key}.png"]
    return [f"samples/{item.prompt}_{index * num_samples + j:06d}.png" for j in range(num_samples)]


def grid_2x2(images: list[Any]):
    """Four equally sized images as one 2x2 grid, row-major (DPG-Bench's crop order)."""
    from PIL import Image

    assert len(images) == 4, f"a DPG-Bench grid needs 4 images, got {len(images)}"
    w, h = images[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % 2) * w, (i // 2) * h))
    return grid


def write_item(layout: str, out: str | Path, index: int, item: Item, images: list[Any]) -> list[Path]:
    """Save one prompt's samples (and GenEval's metadata.jsonl) under ``out``; returns the image files. Each file
    is written under a temporary name and renamed, so an interrupted run never leaves a truncated image."""
    out = Path(out)
    paths = [out / rel for rel in image_paths(layout, index, item, len(images))]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    if layout == "geneval":
        (out / f"{index:05d}" / "metadata.jsonl").write_text(item.line + "\n", encoding="utf-8")
    pictures = [grid_2x2(images)] if layout == "dpg-bench" else images
    for path, image in zip(paths, pictures):
        tmp = path.with_name(path.name + ".tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    return paths


def is_written(layout: str, out: str | Path, index: int, item: Item, num_samples: int) -> bool:
    """Whether every file of prompt ``index`` is already there (``suder generate --resume`` skips it)."""
    out = Path(out)
    files = [out / rel for rel in image_paths(layout, index, item, num_samples)]
    if layout == "geneval":
        files.append(out / f"{index:05d}" / "metadata.jsonl")
    return all(f.is_file() for f in files)


def item_seed(seed: int, index: int) -> int:
    """A per-prompt seed, so a prompt's samples do not depend on the prompts before it."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % 2**63


SCORERS = {
    "geneval": "python evaluation/evaluate_images.py {out} --outfile results.jsonl --model-path <DETECTOR_FOLDER>",
    "dpg-bench": "bash dpg_bench/dist_eval.sh {out} {resolution}",
    "t2i-compbench": "cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={out}/",
}
