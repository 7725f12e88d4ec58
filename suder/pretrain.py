"""Supervised pre-training on paired ShapesWorld data, one mechanism for every backbone.

The loss is ``-(log p(image | prompt) + log p(caption | image))`` per token, through the protocol's two log-prob
methods, so any backbone that implements ``UnifiedLMM`` pre-trains the same way. The condition is dropped (empty
prompt) for ``cond_dropout`` of the text-to-image rows, which is what classifier-free guidance needs.

**ShapesWorld base recipes.** What differs between backbones is how the untrained ShapesWorld-sized model is built
(its size, its own image tokenizer, trained first) and the hyper-parameters. A backbone package, built-in or
third-party, opts in when it registers the backbone: ``register(name, factory, summary=..., shapes_recipe=recipe)``
(``suder.hookspecs.register_backbones``), where ``recipe`` is a ``ShapesRecipe`` (exported as
``suder.ShapesRecipe``) or a callable with no arguments returning one, called when first needed so that the
recipe's module (and what it imports) stays out of ``suder backbones``. Its fields:

- ``build(seed=, callback=, **options)``: the untrained model at ShapesWorld scale, its image tokenizer already
  trained (``callback`` receives ``{"step", "total_steps", "loss"}`` of that phase); ``options`` are the
  ``backbone_options`` of ``pretrain`` (tests pass tiny sizes). None: ``load_backbone(name, **options)`` (the
  toy's factory builds a ShapesWorld model by default);
- ``version``: part of the cache folder's name; bump it when the recipe changes;
- ``pretrain``: defaults of ``pretrain``'s keywords (``PRETRAIN_KEYS``: ``steps``, ``seed``, ``batch_size``,
  ``caption_batch_size``, ``lr``, ``warmup_steps``, ``cond_dropout``) over ``PRETRAIN_DEFAULTS``;
- ``image_logp_options(rng)``: optional keyword arguments of ``logp_image_given_text`` per step (Show-o: a random
  mask ratio, its mask-token-prediction objective);
- ``preset``: the run defaults ``suder run`` uses on this base over the paper's defaults (``suder.config``): the
  name of a preset shipped with suder (``suder/presets/NAME.yaml``) or the path of a YAML file the package ships;
- ``shipped``: the folder of a base the package ships (written by ``suder pretrain``: the model, its
  ``pretrain.json`` and its ``SHA256SUMS``), or None. When its ``pretrain.json`` names this recipe's version, steps
  and seed, runs start from it after checking every file's SHA-256, on every machine the same weights; otherwise
  (or with ``rebuild=True``, the run setting ``rebuild_base``) the base is pre-trained here and cached.

The recipes: the toy's in ``suder/backbones/toy.py``, Show-o's in ``suder/backbones/show_o/shapes_world.py``,
Janus-Pro's in ``suder/backbones/janus_pro/shapes_world.py``; ``suder.testing.check_shapes_recipe`` is the
conformance check. ``ensure_base(backbone)`` builds a backbone's base once and caches it under ``cache_dir()`` as
``{backbone}-base-{version}-steps{steps}-seed{seed}``, unless the recipe ships that base (``shipped``; suder's
own are under ``suder/bases/``); ``suder run --backbone NAME`` with no ``--model``, ``--prompts`` or ``--images``
uses it.

The toy's defaults (500 steps, batch 48 + 48, AdamW lr 1e-3 with 100 warm-up steps, then cosine) aim at a base
with basic but imperfect alignment: self-rewards need a competent reverse direction as the judge, and room to
improve (shorter and longer bases gained less; docs/results.md).
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .hf_save import no_deepspeed_probe

BASE_VERSION = "v1"
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    steps=500, seed=0, batch_size=48, lr=1e-3, warmup_steps=100, cond_dropout=0.1
)


@dataclass
class PretrainResult:
    model: Any
    out: str | None
    seconds: float
    losses: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


PRETRAIN_KEYS = (*PRETRAIN_DEFAULTS, "caption_batch_size")


@dataclass
class ShapesRecipe:
    """How a backbone builds and pre-trains its ShapesWorld base, and the run defaults on it (the fields are
    described in the module docstring); a package declares it with ``register(..., shapes_recipe=...)``."""

    build: Callable[..., Any] | None = None  # None: ``load_backbone(name, **options)``
    version: str = BASE_VERSION
    pretrain: dict[str, Any] = field(default_factory=dict)
    image_logp_options: Callable[[random.Random], dict[str, Any]] | None = None
    preset: str | os.PathLike | None = None
    shipped: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        from .errors import BackboneError, closest

        for key in self.pretrain:
            if key not in PRETRAIN_KEYS:
                hint = closest(key, PRETRAIN_KEYS)
                raise BackboneError(
                    f"ShapesRecipe.pretrain has an unknown key '{key}'"
                    + (f" (did you mean '{hint}'?)" if hint else "")
                    + f"; use {', '.join(PRETRAIN_KEYS)}."
                )
        if not (isinstance(self.version, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.version)):
            raise BackboneError(
                f"ShapesRecipe.version must be letters, digits, '.', '_' or '-' (it names the cache folder), got "
                f"{self.version!r}."
            )
        if isinstance(self.preset, os.PathLike):
            self.preset = os.fspath(self.preset)
        if self.shipped is not None:
            if not isinstance(self.shipped, (str, os.PathLike)) or not os.fspath(self.shipped):
                raise BackboneError(f"ShapesRecipe.shipped must be the path of a folder, got {self.shipped!r}.")
            self.shipped = os.fspath(self.shipped)
        if self.preset is not None and not (isinstance(self.preset, str) and self.preset):
            raise BackboneError(
                f"ShapesRecipe.preset must be a preset name or the path of a YAML file, got {self.preset!r}."
            )
        if self.preset is not None and os.sep in self.preset and not self.preset.endswith((".yaml", ".yml")):
            raise BackboneError(f"ShapesRecipe.preset '{self.preset}' is a path; name a .yaml or .yml file.")


def shapes_recipe(backbone: str) -> ShapesRecipe | None:
    """The ShapesWorld recipe a registered backbone declared (``register(..., shapes_recipe=...)``), None when it
    has none (or the name is unknown)."""
    from .errors import BackboneError, SuderError
    from .registry import get_backbone_spec

    try:
        spec = get_backbone_spec(backbone)
    except SuderError:
        return None
    if spec.shapes_recipe is None:
        return None
    recipe = spec.shapes_recipe() if callable(spec.shapes_recipe) else spec.shapes_recipe
    if not isinstance(recipe, ShapesRecipe):
        raise BackboneError(
            f"The {backbone} backbone (plugin '{spec.plugin}') declares a shapes_recipe that gives "
            f"{type(recipe).__name__}, not a suder.ShapesRecipe; return one from it."
        )
    return recipe


def pretrain(
    model: Any = "toy",
    *,
    out: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    caption_batch_size: int | None = None,
    lr: float | None = None,
    warmup_steps: int | None = None,
    cond_dropout: float | None = None,
    callback: Callable[[dict], None] | None = None,
    **backbone_options: Any,
) -> PretrainResult:
    """Pre-train ``model`` (a backbone name or object) for ``steps`` AdamW steps; deterministic for a seed.

    A name with a ShapesWorld recipe is built by the recipe (image tokenizer training included: ``callback``
    counts its steps first) and takes the recipe's hyper-parameters where a keyword is None; others fall back to
    ``PRETRAIN_DEFAULTS`` (the toy's)."""
    from .errors import BackboneError
    from .registry import load_backbone
    from .worlds import shapes

    start, cpu_start = time.perf_counter(), time.process_time()
    recipe = shapes_recipe(model) if isinstance(model, str) else None
    model_name = model
    given = dict(
        steps=steps, seed=seed, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, cond_dropout=cond_dropout
    )
    hp = {**PRETRAIN_DEFAULTS, **(recipe.pretrain if recipe else {})}
    hp.update({k: v for k, v in given.items() if v is not None})
    steps, seed, batch_size, lr, warmup_steps = (hp[k] for k in ("steps", "seed", "batch_size", "lr", "warmup_steps"))
    caption_batch_size = caption_batch_size or hp.get("caption_batch_size") or batch_size
    offset = [0]  # steps reported by the recipe's build (image tokenizer training), before ours

    def report(m: dict) -> None:
        if callback:
            offset[0] = m["total_steps"]
            callback({**m, "total_steps": m["total_steps"] + steps, "phase": "tokenizer"})

    torch.manual_seed(seed)
    if isinstance(model, str):
        if recipe is not None and recipe.build is not None:
            model = recipe.build(seed=seed, callback=report, **backbone_options)
        elif recipe is None and not backbone_options:
            raise BackboneError(
                f"The {model} backbone has no ShapesWorld recipe to pre-train from scratch; pass a model object "
                "to suder.pretrain.pretrain, or fine-tune a released checkpoint with `suder run --model`."
            )
        else:
            model = load_backbone(model, **backbone_options)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(seed)
    option_rng = random.Random(seed + 7919)  # its own stream: the data stream stays the toy's
    losses: list[float] = []
    for step in range(steps):
        pairs = shapes.t2i_pairs(batch_size, seed=rng.randrange(2**31))
        prompts = ["" if rng.random() < hp["cond_dropout"] else p for p, _ in pairs]
        t2i_images = [shapes.render(s) for _, s in pairs]
        caps = shapes.caption_pairs(caption_batch_size, seed=rng.randrange(2**31))
        cap_images = [shapes.render(s) for s, _ in caps]
        options = recipe.image_logp_options(option_rng) if recipe and recipe.image_logp_options else {}
        img = model.logp_image_given_text(t2i_images, prompts, policy="cond", **options)
        txt = model.logp_text_given_image([c for _, c in caps], cap_images)
        loss = -(img.sum().sum() / img.mask.sum() + txt.sum().sum() / txt.mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback:
            total = offset[0] + steps
            callback({"step": offset[0] + step + 1, "total_steps": total, "loss": losses[-1], "phase": "model"})
    model.eval()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if out:
        with no_deepspeed_probe():
            model.save_pretrained(out)
        name = model_name if isinstance(model_name, str) else getattr(model, "name", None)
        info = {"backbone": name, "steps": steps, "seed": seed, "seconds": seconds, "cpu_seconds": cpu}
        info |= {"final_loss": losses[-1] if losses else None, "version": recipe.version if recipe else None}
        info["built_with"] = {"torch": torch.__version__, "cpu": _cpu_name(), "threads": torch.get_num_threads()}
        write_marker(out, info)
        write_checksums(out)
    return PretrainResult(model, out, seconds, losses, cpu)


MARKER = "pretrain.json"


def _cpu_name() -> str:
    """The CPU's model name (a base depends on the CPU that builds it: docs/results.md)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_marker(folder: str | Path, info: dict[str, Any]) -> None:
    """Mark a saved model as a ShapesWorld base (``pretrain.json``): ``suder run --model FOLDER`` without data
    trains and judges it on ShapesWorld, where a released checkpoint asks for --prompts and --images."""
    import json

    (Path(folder) / MARKER).write_text(json.dumps(info))


def is_shapes_base(folder: str | Path) -> bool:
    """A model folder written by ``suder pretrain`` (or a run trained from one), i.e. one carrying the marker."""
    return (Path(folder) / MARKER).is_file()


CHECKSUMS = "SHA256SUMS"
SHIPPED = Path(__file__).resolve().parent / "bases"  # the ShapesWorld bases shipped with suder


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != CHECKSUMS and "__pycache__" not in p.parts
    )


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: str | Path) -> Path:
    """Write ``SHA256SUMS`` for every file of a base folder, in ``sha256sum``'s format (``sha256sum -c
    SHA256SUMS`` checks it too); a package that ships a base ships this file with it."""
    folder = Path(folder)
    lines = [f"{_sha256(folder / name)}  {name}\n" for name in _files(folder)]
    (folder / CHECKSUMS).write_text("".join(lines))
    return folder / CHECKSUMS


def verify_checksums(folder: str | Path) -> str:
    """Check a base folder against its ``SHA256SUMS``: every listed file present with its digest, no file
    unlisted. Gives the SHA-256 of ``SHA256SUMS`` itself (one digest naming the whole base); a mismatch is a
    one-line ``BackboneError``."""
    from .errors import BackboneError

    folder = Path(folder)
    sums = folder / CHECKSUMS
    fix = "reinstall suder (or the package that ships it), or set rebuild_base (--rebuild-base) to pre-train one"
    if not sums.is_file():
        raise BackboneError(f"The base at {folder} has no {CHECKSUMS} to verify it against; {fix}.")
    listed: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if line.strip():
            listed[name.strip()] = digest.strip()
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise BackboneError(f"The base at {folder} is missing {name} (listed in its {CHECKSUMS}); {fix}.")
        if _sha256(path) != digest:
            raise BackboneError(f"The base at {folder} fails its checksum: {name} differs from {CHECKSUMS}; {fix}.")
    extra = [name for name in _files(folder) if name not in listed]
    if extra:
        raise BackboneError(f"The base at {folder} has a file its {CHECKSUMS} does not list ({extra[0]}); {fix}.")
    return _sha256(sums)


def base_digest(folder: str | Path | None) -> str | None:
    """The SHA-256 of a base folder's ``SHA256SUMS`` (one digest naming the whole base), None without one."""
    sums = Path(folder) / CHECKSUMS if folder else None
    return _sha256(sums) if sums is not None and sums.is_file() else None


def shipped_base(backbone: str, steps: int | None = None, seed: int | None = None) -> Path | None:
    """The base a backbone's recipe ships (``ShapesRecipe.shipped``) when it is the recipe's (version, steps,
    seed), else None; its files are not checked here (``verify_checksums``)."""
    import json

    recipe = shapes_recipe(backbone)
    if recipe is None or recipe.shipped is None:
        return None
    steps = steps or recipe.pretrain.get("steps", PRETRAIN_DEFAULTS["steps"])
    seed = recipe.pretrain.get("seed", PRETRAIN_DEFAULTS["seed"]) if seed is None else seed
    folder = Path(recipe.shipped)
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    wanted = {"backbone": backbone, "version": recipe.version, "steps": steps, "seed": seed}
    return folder if all(info.get(k) == v for k, v in wanted.items()) else None


def cache_dir() -> Path:
    """``$SUDER_CACHE``, else ``$XDG_CACHE_HOME/suder``, else ``~/.cache/suder``."""
    if os.environ.get("SUDER_CACHE"):
        return Path(os.environ["SUDER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "suder"


def ensure_base(
    backbone: str = "toy",
    steps: int | None = None,
    seed: int | None = None,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
) -> Path:
    """The pre-trained ShapesWorld base of a backbone (its recipe's steps and seed unless given): the one its
    package ships, checked against its ``SHA256SUMS``, else (or with ``rebuild``) the one built here on first use
    and cached; ``callback`` sees the steps of a build (image tokenizer first, then the model)."""
    from .errors import BackboneError

    recipe = shapes_recipe(backbone)
    if recipe is None:
        raise BackboneError(
            f"The {backbone} backbone has no ShapesWorld default; pass --model (a checkpoint) with --prompts FILE "
            "and --images DIR."
        )
    steps = steps or recipe.pretrain.get("steps", PRETRAIN_DEFAULTS["steps"])
    seed = recipe.pretrain.get("seed", PRETRAIN_DEFAULTS["seed"]) if seed is None else seed
    version = recipe.version
    shipped = None if rebuild else shipped_base(backbone, steps, seed)
    if shipped is not None:
        verify_checksums(shipped)
        return shipped
    target = cache_dir() / f"{backbone}-base-{version}-steps{steps}-seed{seed}"
    if is_shapes_base(target) or (target / "model.safetensors").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    result = pretrain(backbone, out=str(tmp), steps=steps, seed=seed, callback=callback)
    import json

    info = json.loads((tmp / MARKER).read_text()) if (tmp / MARKER).is_file() else {}  # pretrain's: how it was built
    info |= {"steps": steps, "seed": seed, "seconds": result.seconds, "final_loss": result.losses[-1]}
    info |= {"cpu_seconds": result.cpu_seconds, "backbone": backbone, "version": version}
    write_marker(tmp, info)
    write_checksums(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_toy_base(
    steps: int = 500, seed: int = 0, callback: Callable[[dict], None] | None = None, rebuild: bool = False
) -> Path:
    """The toy base of the embedded default (``ensure_base("toy", ...)``: the shipped one at the recipe's steps and
    seed, else built on first use, about 4 minutes, and cached)."""
    return ensure_base("toy", steps, seed, callback, rebuild)


# ------------------------------------------------------------------------------------------ image tokenizers
def image_patches(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 3, S, S) pixels -> (B h w, 3 stride^2) patches, one per code of a stride-``stride`` image tokenizer,
    in the codes' row-major order. Public, for plugins' recipes (docs/writing-a-plugin.md)."""
    return torch.nn.functional.unfold(x, stride, stride=stride).transpose(1, 2).reshape(-1, 3 * stride * stride)


def reconstruction_accuracy(
    encode: Callable[[list[Any]], torch.Tensor], decode: Callable[[torch.Tensor], list[Any]], num: int = 400,
    seed: int = 999,
) -> dict[str, float]:
    """How often the judge (``shapes.parse_image``) reads a held-out scene, encoded to codes by ``encode`` (PIL
    images -> a code tensor) and drawn back by ``decode`` (codes -> PIL images), as the scene itself:
    ``{"scenes": fraction, "codes_used": distinct codes seen}``. The check of an image tokenizer that every
    ShapesWorld recipe runs (each passes its own encode/decode). Public, for plugins' recipes."""
    from .worlds import shapes

    scenes = shapes.sample_scenes(num, seed=seed)
    codes = encode([shapes.render(s) for s in scenes])
    hits = [shapes.parse_image(im) == s for im, s in zip(decode(codes), scenes, strict=True)]
    return {"scenes": sum(hits) / num, "codes_used": int(codes.unique().numel())}


def patch_clusters(num: int, stride: int, seed: int = 0, scenes: int = 512, iters: int = 10) -> torch.Tensor:
    """(k, 3 stride^2) centres, k <= ``num``, of the pixel patches (in [-1, 1]) of ``scenes`` rendered ShapesWorld
    scenes, one patch per code: the distinct patches themselves when there are at most ``num`` (at stride 8 there
    are 73: empty, or a quarter of one of 18 objects), else weighted k-means from farthest-point seeds
    (deterministic). The ShapesWorld image tokenizers (Show-o's MAGVIT-v2, Janus-Pro's VQ, the Emu3 plugin's VQ-VAE)
    make these their codes: each backbone trains its encoder to pick a patch's cluster and its decoder to draw the
    clusters. Public, with ``image_patches``, for plugins' recipes (docs/writing-a-plugin.md)."""
    import numpy as np

    from .worlds import shapes

    arrays = np.stack([shapes.render_array(s) for s in shapes.sample_scenes(scenes, seed=seed)]).astype(np.float32)
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1
    distinct, counts = torch.unique(image_patches(x, stride), dim=0, return_counts=True)
    if len(distinct) <= num:
        return distinct
    picks = [int(counts.argmax())]
    dist = ((distinct - distinct[picks[0]]) ** 2).sum(-1)
    for _ in range(num - 1):
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, ((distinct - distinct[picks[-1]]) ** 2).sum(-1))
    centres, weights = distinct[picks].clone(), counts.float()[:, None]
    for _ in range(iters):
        assign = torch.cdist(distinct, centres).argmin(-1)
        for k in assign.unique():
            members = assign == k
            centres[k] = (distinct[members] * weights[members]).sum(0) / weights[members].sum()
    return centres
