"""The ShapesWorld tasks' functions (lmms-eval imports them by the ``!function utils.NAME`` lines of the YAML files).

``scenes/`` (``suder world export``) holds the images and ``captions.jsonl``, one ``{"image", "caption"}`` a line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from PIL import Image

from suder.worlds import shapes

SCENES = Path(__file__).resolve().parent / "scenes"


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(SCENES / doc["image"]) as image:
        return [image.convert("RGB")]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``exact_match``: the canonical caption word for word; ``judge``: ``shapes.satisfies`` on the image."""
    caption = " ".join(results[0].split())
    scene = shapes.parse_image(doc_to_visual(doc)[0])
    return {"exact_match": float(caption == doc["caption"]), "judge": float(shapes.satisfies(scene, caption))}


@functools.cache
def all_captions() -> tuple[str, ...]:
    """Every distinct caption of the exported set, sorted: the choices of ``shapes_choice``."""
    lines = (SCENES / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(sorted({json.loads(line)["caption"] for line in lines if line.strip()}))


def doc_to_choice(doc: dict) -> list[str]:
    return list(all_captions())


def doc_to_target(doc: dict) -> int:
    return all_captions().index(doc["caption"])
