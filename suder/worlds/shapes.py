"""ShapesWorld v1: renderer, prompt grammar, judge and datasets of the built-in compositional world.

Normative spec: the "Specification (v1)" part of ``docs/shapes-world.md`` (its section names are cited as
"spec, <section>"). Data distributions: its "Data distributions" part ("Captions", "Pre-training data",
"Evaluation").

Choices the spec leaves open, fixed here so every caller agrees:

- Grammar strictness: a text is in the grammar only when it equals a template word for word, separated by
  single spaces (no leading, trailing or double spaces, no capitals, no final period). ``pair`` and
  ``relation`` need two different objects (identical ones are the ``count`` template's job); an ``and``-chain
  (family ``"chain"``, spec "Prompt grammar", captions paragraph) has 3 or 4 phrases (a scene has at most 4
  objects) that are not all identical.
- Parsing ties (spec, "Matching rules"): the palette color that comes first in ``COLORS`` and the template
  that comes first in ``SHAPES`` win. An unreadable quadrant is stored as ``None`` in ``Scene.objects`` and
  its index in ``Scene.unreadable``.
- Sampling: everything draws from one ``random.Random(seed)``; the same seed gives the same output.

Why not a library: the world is a few masks and a word grammar; a rendering or grammar library would add a
dependency without removing code. Only numpy, Pillow and the standard library are used (no torch).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = [
    "SIZE", "COLORS", "SHAPES", "COUNT_WORDS", "RELATIONS", "FAMILIES", "VOCAB_WORDS",
    "Obj", "Scene", "Prompt",
    "render_array", "render", "shape_mask", "parse_image",
    "parse_prompt", "phrase", "relation_holds", "satisfies", "true_caption", "sample_caption", "scene_kind",
    "sample_prompts", "scene_for_prompt", "sample_scenes", "t2i_pairs", "caption_pairs",
    "t2i_accuracy", "caption_accuracy", "export",
]

# --------------------------------------------------------------------------------------------- constants
SIZE = 32
QUAD = 16  # quadrant side (spec, "Canvas and layout")
BOX = 12  # object box side, drawn from (ox + 2, oy + 2) (spec, "Objects")
MARGIN = 2
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (255, 0, 255),
    "white": (255, 255, 255),
}
SHAPES = ("square", "circle", "triangle")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
FAMILIES = ("single", "pair", "count", "relation")
# Fixed order (token ids of the toy backbone depend on it): articles/conjunction, colors, shapes, plurals,
# count words, then the relation words in first-appearance order.
VOCAB_WORDS: tuple[str, ...] = (
    ("a", "and")
    + tuple(COLORS)
    + SHAPES
    + tuple(s + "s" for s in SHAPES)
    + tuple(COUNT_WORDS.values())
    + ("to", "the", "left", "right", "of", "above", "below")
)
INK_LEVEL = 128  # a pixel is ink when its largest channel is >= this (spec, "Matching rules")
MIN_INK = 24  # fewer ink pixels than this: the quadrant is empty
MIN_IOU = 0.5  # best template IoU below this: the quadrant is unreadable

_NUMBERS = {w: n for n, w in COUNT_WORDS.items()}
_PLURALS = {s + "s": s for s in SHAPES}
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (6, 3)


# --------------------------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class Obj:
    """One object: a palette color name and a shape name (spec, "Objects")."""

    color: str
    shape: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise DataError(f"Unknown color '{self.color}'. Available: {', '.join(COLORS)}.")
        if self.shape not in SHAPES:
            raise DataError(f"Unknown shape '{self.shape}'. Available: {', '.join(SHAPES)}.")


ALL_OBJECTS: tuple[Obj, ...] = tuple(Obj(c, s) for c in COLORS for s in SHAPES)  # the 18 objects


@dataclass(frozen=True)
class Scene:
    """What is in each quadrant 0..3 (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right).

    ``unreadable`` holds the quadrants ``parse_image`` saw ink in but could not match to a template; those
    quadrants are ``None`` in ``objects`` and make every prompt fail (spec, "Matching rules").
    """

    objects: tuple[Obj | None, Obj | None, Obj | None, Obj | None]
    unreadable: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if len(self.objects) != 4:
            raise DataError(f"A scene has 4 quadrants, got {len(self.objects)} entries: {self.objects!r}.")
        if not set(self.unreadable) <= {0, 1, 2, 3}:
            raise DataError(f"Unreadable quadrants must be in 0..3, got {sorted(self.unreadable)}.")

    def items(self) -> list[tuple[int, Obj]]:
        """Occupied quadrants in quadrant order, as ``(quadrant, object)``."""
        return [(q, o) for q, o in enumerate(self.objects) if o is not None]

    @staticmethod
    def from_items(items: dict[int, Obj]) -> Scene:
        """A scene from ``{quadrant: object}``; quadrants not named are empty."""
        bad = [q for q in items if q not in range(4)]
        if bad:
            raise DataError(f"Quadrants must be in 0..3, got {bad}.")
        return Scene(tuple(items.get(q) for q in range(4)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Prompt:
    """A parsed grammar text: ``family`` is one of ``FAMILIES`` or ``"chain"``; ``objects`` in text order
    (a count prompt repeats its object); ``relation`` is set only for the relation family."""

    text: str
    family: str
    objects: tuple[Obj, ...]
    relation: str | None = None


# --------------------------------------------------------------------------------------------- rendering
def _origin(q: int) -> tuple[int, int]:
    """Quadrant q's top-left pixel (ox, oy) (spec, "Canvas and layout")."""
    return QUAD * (q % 2), QUAD * (q // 2)


def _build_masks() -> dict[str, np.ndarray]:
    """The three (16, 16) quadrant-local templates, from the spec's pixel-centre formulas ("Objects")."""
    centres = np.arange(BOX) + 0.5  # u (and v) of each column (row) of the box
    u, v = centres[None, :], centres[:, None]
    boxes = {
        "square": np.ones((BOX, BOX), dtype=bool),
        "circle": (u - 6) ** 2 + (v - 6) ** 2 <= 36,
        "triangle": np.abs(u - 6) <= v / 2,
    }
    out = {}
    for shape, box in boxes.items():
        mask = np.zeros((QUAD, QUAD), dtype=bool)
        mask[MARGIN : MARGIN + BOX, MARGIN : MARGIN + BOX] = box
        mask.flags.writeable = False  # shared by every call; shape_mask hands out copies
        out[shape] = mask
    return out


_MASKS = _build_masks()


def shape_mask(shape: str) -> np.ndarray:
    """(16, 16) bool template of ``shape`` inside a quadrant, box at (2, 2) (spec, "Objects"). A copy."""
    if shape not in _MASKS:
        raise DataError(f"Unknown shape '{shape}'. Available: {', '.join(SHAPES)}.")
    return _MASKS[shape].copy()


def render_array(scene: Scene) -> np.ndarray:
    """(32, 32, 3) uint8 image of ``scene``: black background, no anti-aliasing (spec, "Objects")."""
    canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for q, obj in scene.items():
        ox, oy = _origin(q)
        canvas[oy : oy + QUAD, ox : ox + QUAD][_MASKS[obj.shape]] = COLORS[obj.color]
    return canvas


def render(scene: Scene) -> Image.Image:
    """``render_array`` as a 32x32 RGB PIL image."""
    return Image.fromarray(render_array(scene))  # (H, W, 3) uint8 is RGB


# --------------------------------------------------------------------------------------------- image parsing
def _majority_color(pixels: np.ndarray) -> str:
    """The palette color most of ``pixels`` (K, 3) are nearest to, Euclidean RGB (spec, "Matching rules")."""
    dist = ((pixels[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(axis=2)  # (K, 6)
    votes = np.bincount(dist.argmin(axis=1), minlength=len(COLORS))
    return list(COLORS)[int(votes.argmax())]  # argmax keeps the first on ties: COLORS order


def _best_template(ink: np.ndarray) -> tuple[str, float]:
    """The template with the highest IoU against the (16, 16) ink mask, and that IoU; SHAPES order on ties."""
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        mask = _MASKS[shape]
        iou = float((ink & mask).sum()) / float((ink | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def parse_image(image) -> Scene:
    """Read a scene back from a PIL image or a (32, 32, 3) array with values 0..255 (spec, "Matching rules").

    Per quadrant: ink = largest channel >= 128; under 24 ink pixels is empty; else the color is the palette
    color most ink pixels are nearest to and the shape the best-IoU template; best IoU < 0.5 is unreadable.
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.float64)
    if arr.shape != (SIZE, SIZE, 3):
        raise DataError(f"ShapesWorld images are (32, 32, 3) RGB; got an array of shape {arr.shape}.")
    ink = arr.max(axis=2) >= INK_LEVEL
    objects: list[Obj | None] = []
    unreadable = set()
    for q in range(4):
        ox, oy = _origin(q)
        local = ink[oy : oy + QUAD, ox : ox + QUAD]
        if int(local.sum()) < MIN_INK:
            objects.append(None)
            continue
        shape, iou = _best_template(local)
        if iou < MIN_IOU:
            objects.append(None)
            unreadable.add(q)
            continue
        color = _majority_color(arr[oy : oy + QUAD, ox : ox + QUAD][local])
        objects.append(Obj(color, shape))
    return Scene(tuple(objects), frozenset(unreadable))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- grammar
def phrase(obj: Obj) -> str:
    """The grammar's phrase of one object: ``a {color} {shape}``."""
    return f"a {obj.color} {obj.shape}"


def _read_phrase(words: list[str]) -> Obj | None:
    """``["a", color, shape]`` -> Obj, else None."""
    if len(words) == 3 and words[0] == "a" and words[1] in COLORS and words[2] in SHAPES:
        return Obj(words[1], words[2])
    return None


def _parse_relation(text: str, words: list[str]) -> Prompt | None:
    """``a c1 s1 {rel} a c2 s2`` with different objects (spec, "Prompt grammar")."""
    for rel in RELATIONS:
        r = rel.split(" ")
        if len(words) == 6 + len(r) and words[3 : 3 + len(r)] == r:
            a, b = _read_phrase(words[:3]), _read_phrase(words[3 + len(r) :])
            if a is not None and b is not None and a != b:
                return Prompt(text, "relation", (a, b), rel)
    return None


def _parse_and_list(text: str, words: list[str]) -> Prompt | None:
    """``a c s and a c s [and ...]``: 2 different objects is a pair; 3-4 not all identical is a chain."""
    k = (len(words) + 1) // 4
    if k not in (2, 3, 4) or len(words) != 4 * k - 1 or any(w != "and" for w in words[3::4]):
        return None
    objects = tuple(_read_phrase(words[4 * i : 4 * i + 3]) for i in range(k))
    if any(o is None for o in objects) or len(set(objects)) == 1:
        return None
    return Prompt(text, "pair" if k == 2 else "chain", objects)  # type: ignore[arg-type]


def parse_prompt(text: str) -> Prompt | None:
    """Parse ``text`` under the grammar (spec, "Prompt grammar"), or None when it is not in it.

    Strict: single spaces only, every word in place; identical objects in a pair or relation, a count on a
    singular noun ("two red square") and anything extra are off-grammar.
    """
    if not isinstance(text, str):
        return None
    words = text.split(" ")
    if "" in words:  # leading, trailing or double spaces
        return None
    if len(words) == 3:
        obj = _read_phrase(words)
        if obj is not None:
            return Prompt(text, "single", (obj,))
        if words[0] in _NUMBERS and words[1] in COLORS and words[2] in _PLURALS:
            obj = Obj(words[1], _PLURALS[words[2]])
            return Prompt(text, "count", (obj,) * _NUMBERS[words[0]])
        return None
    if "and" in words:
        return _parse_and_list(text, words)
    return _parse_relation(text, words)


def _off_grammar(text) -> DataError:
    return DataError(f"Prompt {text!r} is not in the ShapesWorld grammar; see docs/shapes-world.md.")


def relation_holds(relation: str, qa: int, qb: int) -> bool:
    """Quadrant geometry of ``A {relation} B`` (spec, "Matching rules"): column = q % 2, row = q // 2."""
    if relation == "to the left of":
        return qa % 2 < qb % 2
    if relation == "to the right of":
        return qa % 2 > qb % 2
    if relation == "above":
        return qa // 2 < qb // 2
    if relation == "below":
        return qa // 2 > qb // 2
    raise DataError(f"Unknown relation '{relation}'. Available: {', '.join(RELATIONS)}.")


def satisfies(scene: Scene, prompt: str | Prompt) -> bool:
    """The judge (spec, "Matching rules"): same multiset of objects, and the relation's geometry holds.

    An off-grammar prompt or any unreadable quadrant fails.
    """
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if p is None or scene.unreadable:
        return False
    items = scene.items()
    if Counter(o for _, o in items) != Counter(p.objects):
        return False
    if p.relation is None:
        return True
    # Relation objects differ and the multisets are equal, so each appears in exactly one quadrant.
    where = {o: q for q, o in items}
    return relation_holds(p.relation, where[p.objects[0]], where[p.objects[1]])


# --------------------------------------------------------------------------------------------- captions
def _objects_of(scene: Scene) -> list[Obj]:
    objs = [o for _, o in scene.items()]
    if not objs:
        raise DataError("The scene is empty; a ShapesWorld scene has 1 to 4 objects.")
    return objs


def scene_kind(scene: Scene) -> str:
    """``"one"``, ``"two"`` (2 different objects), ``"count"`` (2-4 identical) or ``"many"`` (3-4, not all
    identical)."""
    objs = _objects_of(scene)
    if len(objs) == 1:
        return "one"
    if len(set(objs)) == 1:
        return "count"
    return "two" if len(objs) == 2 else "many"


def true_caption(scene: Scene) -> str:
    """The canonical caption (spec, "Prompt grammar"): single, count, pair in quadrant order, else an
    ``and``-chain of ``a {color} {shape}`` in quadrant order."""
    objs = _objects_of(scene)
    kind = scene_kind(scene)
    if kind == "one":
        return phrase(objs[0])
    if kind == "count":
        return f"{COUNT_WORDS[len(objs)]} {objs[0].color} {objs[0].shape}s"
    return " and ".join(phrase(o) for o in objs)


def sample_caption(scene: Scene, rng: random.Random) -> str:
    """A pre-training caption (docs/shapes-world.md, "Captions"): ``true_caption``, except that two different
    objects get a pair in random order (40%) or a geometrically valid relation (60%; random subject, random
    relation among the valid ones)."""
    if scene_kind(scene) != "two":
        return true_caption(scene)
    items = scene.items()
    if rng.random() < 0.4:
        rng.shuffle(items)
        return " and ".join(phrase(o) for _, o in items)
    (qa, a), (qb, b) = items if rng.random() < 0.5 else items[::-1]
    valid = [r for r in RELATIONS if relation_holds(r, qa, qb)]
    return f"{phrase(a)} {rng.choice(valid)} {phrase(b)}"


# --------------------------------------------------------------------------------------------- sampling
def _random_prompt(family: str, rng: random.Random) -> str:
    """A prompt uniform over the family's distinct texts ("chain": 3-4 objects, not all identical)."""
    if family == "single":
        return phrase(rng.choice(ALL_OBJECTS))
    if family == "pair":
        a, b = rng.sample(ALL_OBJECTS, 2)
        return f"{phrase(a)} and {phrase(b)}"
    if family == "count":
        n, obj = rng.choice(tuple(COUNT_WORDS)), rng.choice(ALL_OBJECTS)
        return f"{COUNT_WORDS[n]} {obj.color} {obj.shape}s"
    if family == "relation":
        relation, (a, b) = rng.choice(RELATIONS), rng.sample(ALL_OBJECTS, 2)
        return f"{phrase(a)} {relation} {phrase(b)}"
    if family == "chain":
        return " and ".join(phrase(o) for o in _mixed_objects(rng.choice((3, 4)), rng))
    raise DataError(f"Unknown prompt family '{family}'. Available: {', '.join(FAMILIES)}, chain.")


def _mixed_objects(k: int, rng: random.Random) -> list[Obj]:
    """``k`` objects drawn independently, redrawn while all are identical (that would be a count)."""
    while True:
        objs = [rng.choice(ALL_OBJECTS) for _ in range(k)]
        if len(set(objs)) > 1:
            return objs


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` grammar prompts, families cycling single, pair, count, relation (so n // 4 each, the remainder
    going to the first families, and every prefix is balanced too); uniform within a family."""
    rng = random.Random(seed)
    return [_random_prompt(FAMILIES[i % len(FAMILIES)], rng) for i in range(n)]


def scene_for_prompt(prompt: str | Prompt, rng: random.Random) -> Scene:
    """A random scene satisfying ``prompt``: random quadrants, uniform over the valid placements."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if p is None:
        raise _off_grammar(prompt)
    if len(p.objects) > 4:
        raise DataError(f"'{p.text}' names {len(p.objects)} objects; a scene holds at most 4.")
    if p.relation is not None:
        pairs = [(qa, qb) for qa in range(4) for qb in range(4) if qa != qb]
        quadrants = rng.choice([(qa, qb) for qa, qb in pairs if relation_holds(p.relation, qa, qb)])
    else:
        quadrants = rng.sample(range(4), len(p.objects))
    return Scene.from_items(dict(zip(quadrants, p.objects, strict=True)))


def _random_scene(rng: random.Random, p_one: float, p_two: float, p_same: float = 0.3) -> Scene:
    """1 object with prob ``p_one``, 2 with ``p_two``, else 3 or 4 (even odds); a multi-object scene is
    ``p_same`` identical objects (a count scene), else 2 different or 3-4 not all identical objects."""
    r = rng.random()
    k = 1 if r < p_one else 2 if r < p_one + p_two else rng.choice((3, 4))
    if k == 1:
        objs = [rng.choice(ALL_OBJECTS)]
    elif rng.random() < p_same:
        objs = [rng.choice(ALL_OBJECTS)] * k
    elif k == 2:
        objs = rng.sample(ALL_OBJECTS, 2)
    else:
        objs = _mixed_objects(k, rng)
    return Scene.from_items(dict(zip(rng.sample(range(4), k), objs, strict=True)))


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """The evaluation scene distribution (docs/shapes-world.md, "Evaluation"): 40% one object, 40% two,
    20% three or four; 30% of multi-object scenes are identical objects. Drawn per scene."""
    rng = random.Random(seed)
    return [_random_scene(rng, 0.4, 0.4) for _ in range(n)]


def t2i_pairs(n: int, seed: int) -> list[tuple[str, Scene]]:
    """Pre-training text-to-image pairs (docs/shapes-world.md, "Pre-training data"): 15% ``and``-chains of
    3-4 objects, the rest grammar prompts with families balanced; each with a random scene satisfying it.

    The chain count is 0.15 n rounded up or down at random and the family cycle starts at a random family,
    so that small batches are balanced and many batches hit the fractions exactly on average.
    """
    rng = random.Random(seed)
    frac, whole = math.modf(0.15 * n)
    n_chain = int(whole) + (rng.random() < frac)
    start = rng.randrange(len(FAMILIES))
    prompts = [_random_prompt(FAMILIES[(start + i) % len(FAMILIES)], rng) for i in range(n - n_chain)]
    prompts += [_random_prompt("chain", rng) for _ in range(n_chain)]
    rng.shuffle(prompts)
    return [(p, scene_for_prompt(p, rng)) for p in prompts]


def caption_pairs(n: int, seed: int) -> list[tuple[Scene, str]]:
    """Pre-training captioning pairs (docs/shapes-world.md, "Pre-training data"): mostly 1-2-object scenes
    (40% one, 45% two, 15% three or four; 30% of multi-object scenes identical); the caption is
    ``sample_caption``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = _random_scene(rng, 0.4, 0.45)
        out.append((scene, sample_caption(scene, rng)))
    return out


# --------------------------------------------------------------------------------------------- evaluation
def _tally(groups: list[str], hits: list[bool], order: tuple[str, ...]) -> dict[str, float]:
    """Accuracy per group present (in ``order``, then any others), plus ``overall`` and ``n``."""
    out: dict[str, float] = {}
    for g in list(order) + sorted(set(groups) - set(order)):
        mine = [h for gg, h in zip(groups, hits, strict=True) if gg == g]
        if mine:
            out[g] = sum(mine) / len(mine)
    out["overall"] = sum(hits) / len(hits) if hits else float("nan")
    out["n"] = len(hits)
    return out


def t2i_accuracy(prompts: list[str], images: list) -> dict[str, float]:
    """Text-to-image accuracy: ``satisfies(parse_image(image), prompt)`` per family (spec, "Matching rules").

    Keys: the families present (``single``, ``pair``, ``count``, ``relation``, and ``chain`` if any), then
    ``overall`` and ``n``. Prompts must be in the grammar: they are the benchmark, not model output.
    """
    if len(prompts) != len(images):
        raise DataError(f"Got {len(prompts)} prompts but {len(images)} images; pass one image per prompt.")
    families, hits = [], []
    for text, image in zip(prompts, images, strict=True):
        p = parse_prompt(text)
        if p is None:
            raise _off_grammar(text)
        families.append(p.family)
        hits.append(satisfies(parse_image(image), p))
    return _tally(families, hits, FAMILIES)


def caption_accuracy(scenes: list[Scene], captions: list[str]) -> dict[str, float]:
    """Caption accuracy: ``satisfies(true scene, caption)`` (spec, "Matching rules", last paragraph).

    Keys: the scene kinds present (``one``, ``two``, ``count``, ``many``; see ``scene_kind``), then
    ``overall`` and ``n``.
    """
    if len(scenes) != len(captions):
        raise DataError(f"Got {len(scenes)} scenes but {len(captions)} captions; pass one caption per scene.")
    kinds = [scene_kind(s) for s in scenes]
    hits = [satisfies(s, c) for s, c in zip(scenes, captions, strict=True)]
    return _tally(kinds, hits, ("one", "two", "count", "many"))


def export(num: int, seed: int, out_dir) -> list[tuple[str, str]]:
    """Write ``sample_scenes(num, seed)`` as ``out_dir/00000.png ...`` plus ``out_dir/captions.jsonl``
    (one ``{"image": name, "caption": true_caption}`` per line); returns the ``(name, caption)`` pairs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, scene in enumerate(sample_scenes(num, seed)):
        name = f"{i:05d}.png"
        render(scene).save(out / name)
        pairs.append((name, true_caption(scene)))
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for name, caption in pairs:
            f.write(json.dumps({"image": name, "caption": caption}) + "\n")
    return pairs
