"""The conformance kit: what every backbone, built-in or third-party, guarantees, as checks it runs from its tests.

Two ways to use it (``docs/writing-a-plugin.md`` walks through both):

1. **One class, every check.** Subclass ``BackboneConformance`` in a test module, under a name pytest collects
   (``Test...``), and say how to build a small (random-weight) instance of your backbone::

       from suder.testing import BackboneConformance

       class TestMyBackboneConformance(BackboneConformance):
           backbone_name = "my-backbone"          # registered name: save_pretrained + load_backbone round trip
           prompts = ("a red circle", "two green triangles left of a blue square")  # different lengths
           guidance_scale = 3.0                    # a scale that guides (1.0, or 0.0 for Show-o, does not)

           def make_backbone(self):                # arguments name pytest fixtures, e.g. (self, tmp_path)
               return build_tiny_random_model()

   pytest then runs one test per check below (``test_group_layout``, ``test_left_padding``, ...) and one per
   trainer strategy and algorithm (``test_trainer_unified_simpo``, ...). Class attributes tune the inputs.

2. **Plain functions.** Each ``check_*`` function raises ``AssertionError`` with the offending values; call the ones
   you want from your own tests.

The contracts (tensor shapes as in ``suder.protocol``):

- **input-major groups**: row ``b * G + j`` of a sample call belongs to input ``b``; scoring that row alone, with
  input ``b`` alone, gives the log-probs recorded for it.
- **left-padding invariance**: a batch of prompts (or captions) of different lengths scores each row as it scores
  alone, within ``atol`` (1e-5 in float32).
- **sampled ``.logps`` are the teacher-forced log-probs** of the same tokens under the same policy, in float32:
  ``policy="cond"`` for samples drawn without guidance, ``policy="guided"`` with the sampling scale for guided ones
  (and the guided and conditional policies differ, so the check could fail). For ``estimate=True`` image
  log-probs (masked models), ``.logps`` equal the estimator's value.
- **temperature 0 is greedy** in both directions: the arg-max token at every step (after guidance, for images), so
  the result does not depend on the generator, every sample of a group is the same, and ``.logps`` are finite: the
  log-probs of the chosen tokens under the untempered (temperature 1) distribution of the same policy.
- **seeding reproduces**: the same generator seed gives the same tokens and log-probs; another seed other tokens.
- **save and load round-trip**: ``save_pretrained(path)`` then ``load_backbone(name, model=path)`` scores alike.
- **trainable parameters per direction**: non-empty parameters of the module; once only they require grad (as the
  trainer sets them), the direction's log-prob sends a gradient to each of them.
- **the trainer runs**: ``suder.train(model, ...)`` takes 2 steps in every strategy with both algorithms, with
  finite losses, changing some trainable parameter.
- **the ShapesWorld recipe works** (``check_shapes_recipe``, for a backbone that registers one): its preset loads,
  it builds and pre-trains a few steps, the saved base loads back scoring alike, and samples in both directions.

This module imports neither pytest nor transformers.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .protocol import DIRECTIONS, ImageSamples, TextSamples, repeat_interleave

ATOL = 1e-5  # float32 rounding between a KV-cached sampler and one teacher-forced pass
STRATEGIES = ("unified", "gen", "und", "separate")
ALGORITHMS = ("simpo", "grpo")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_finite(name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    v = values if mask is None else values[mask]
    bad = (~torch.isfinite(v)).sum().item()
    assert bad == 0, f"{name}: {bad} of {v.numel()} log-probs are not finite (e.g. {v[~torch.isfinite(v)][:4]})"


def _assert_rows_equal(name: str, tokens: torch.Tensor, group: int) -> None:
    rows = tokens.view(-1, group, *tokens.shape[1:])
    same = (rows == rows[:, :1]).flatten(2).all(-1)
    assert bool(same.all()), f"{name}: greedy samples of one group differ (rows equal to the first: {same.tolist()})"


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, atol: float) -> None:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shapes {tuple(got.shape)} and {tuple(want.shape)} differ"
    gap = (got - want).abs()[mask.cpu()]
    worst = gap.max().item() if gap.numel() else 0.0
    assert worst <= atol, f"{name}: differ by up to {worst:.3g} > {atol:g} ({(gap > atol).sum().item()} tokens)"


def _image_logps(model: Any, tokens: torch.Tensor, prompts: Sequence[str], **options: Any):
    with torch.no_grad():
        return model.logp_image_given_text(tokens, list(prompts), **options)


def _text_logps(model: Any, texts: Any, images: Any, **options: Any):
    with torch.no_grad():
        return model.logp_text_given_image(texts, images, **options)


# ------------------------------------------------------------------------------------------ checks
def check_group_layout(
    model: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    num_samples: int = 2,
    guidance_scale: float | None = None,
    atol: float = ATOL,
) -> None:
    """Rows ``b * G ... b * G + G - 1`` belong to input ``b`` in both directions: each sampled row, scored alone
    against input ``b`` alone, has the ``.logps`` recorded for it. Needs 2+ inputs the model tells apart."""
    assert len(prompts) >= 2 and len(images) >= 2, "check_group_layout needs at least 2 prompts and 2 images"
    G = num_samples
    with torch.no_grad():
        s = model.sample_image(list(prompts), num_samples=G, generator=_gen(0), guidance_scale=guidance_scale)
    n = len(prompts) * G
    assert len(s) == n and s.tokens.shape[0] == n, f"sample_image: {len(s)} rows for {len(prompts)} prompts x {G}"
    assert s.prompts == repeat_interleave(list(prompts), G), f"ImageSamples.prompts not input-major: {s.prompts}"
    assert s.num_samples == G, f"ImageSamples.num_samples is {s.num_samples}, not {G}"
    options = {"policy": "guided", "guidance_scale": s.guidance_scale, "temperature": s.temperature}
    for r in range(n):
        alone = _image_logps(model, s.tokens[r : r + 1], [prompts[r // G]], **options)
        _assert_close(f"sample_image row {r} (prompt {r // G}) scored alone vs its .logps", alone.values[0],
                      s.logps[r], alone.mask[0], atol)
    other = _image_logps(model, s.tokens[:1], [prompts[1]], **options).values[0]
    assert (other - s.logps[0].to(other.device)).abs().max().item() > atol, (
        "the log-probs of an image do not depend on its prompt, so the layout cannot be checked: make the test "
        "model's conditioning matter (e.g. scale up its output head)"
    )
    with torch.no_grad():
        t = model.sample_text(list(images), num_samples=G, generator=_gen(0))
    assert len(t) == n and t.tokens.shape[0] == n, f"sample_text: {len(t)} rows for {len(images)} images x {G}"
    assert t.num_samples == G, f"TextSamples.num_samples is {t.num_samples}, not {G}"
    for r in range(n):
        alone = _text_logps(model, t.select([r]), [images[r // G]], temperature=t.temperature or 1.0)
        width = int(alone.mask[0].sum())
        _assert_close(f"sample_text row {r} (image {r // G}) scored alone vs its .logps", alone.values[0, :width],
                      t.logps[r, :width], t.mask[r, :width], atol)
    other = _text_logps(model, t.select([0]), [images[1]], temperature=t.temperature or 1.0)
    assert (other.values[0][other.mask[0]] - t.logps[0][t.mask[0]].to(other.values.device)).abs().max() > atol, (
        "the log-probs of a caption do not depend on its image, so the layout cannot be checked: make the test "
        "model's conditioning matter"
    )


def check_left_padding(
    model: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    captions: Sequence[str] | None = None,
    atol: float = ATOL,
) -> None:
    """Prompts (and captions) of different lengths in one batch score each row as it scores alone, under both CFG
    policies; ``prompts`` must differ in length (in tokens)."""
    captions = list(prompts if captions is None else captions)
    with torch.no_grad():
        codes = model.sample_image(list(prompts), generator=_gen(1)).tokens
    for policy in ("cond", "guided"):
        both = _image_logps(model, codes, prompts, policy=policy)
        for i, p in enumerate(prompts):
            alone = _image_logps(model, codes[i : i + 1], [p], policy=policy)
            _assert_close(f"logp_image_given_text(policy={policy!r}) of prompt {i} in a batch vs alone",
                          both.values[i], alone.values[0], alone.mask[0], atol)
    rows = list(images)[: len(captions)]
    both = _text_logps(model, captions[: len(rows)], rows)
    lengths = both.lengths().tolist()
    assert len(set(lengths)) > 1, f"captions {captions} have the same token count {lengths}: padding is not checked"
    for i, c in enumerate(captions[: len(rows)]):
        alone = _text_logps(model, [c], rows[i : i + 1])
        w = alone.values.shape[1]
        _assert_close(f"logp_text_given_image of caption {i} in a batch vs alone", both.values[i, :w],
                      alone.values[0], alone.mask[0], atol)


def check_sampled_logps_match_teacher_forced(
    model: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    guidance_scale: float,
    unguided_scale: float = 1.0,
    temperature: float = 0.7,
    num_samples: int = 2,
    atol: float = ATOL,
) -> None:
    """``.logps`` recorded while sampling equal the teacher-forced log-probs of the same tokens (float32):
    images drawn at ``unguided_scale`` under ``policy="cond"``, at ``guidance_scale`` under ``policy="guided"``
    (at temperature 1 and ``temperature``), captions at both temperatures. Estimated image log-probs
    (``estimate=True``) must equal the estimator."""
    G = num_samples
    cases = [("cond", unguided_scale, 1.0), ("guided", guidance_scale, temperature)]
    scored = {}
    for policy, scale, temp in cases:
        with torch.no_grad():
            s = model.sample_image(list(prompts), num_samples=G, generator=_gen(2), guidance_scale=scale,
                                   temperature=temp)
        assert isinstance(s, ImageSamples), f"sample_image returned {type(s).__name__}, not ImageSamples"
        assert s.guidance_scale == scale, f"ImageSamples.guidance_scale is {s.guidance_scale}, sampled at {scale}"
        lp = _image_logps(model, s, s.prompts, policy=policy, guidance_scale=scale, temperature=temp)
        what = "the estimator" if lp.estimate else "teacher-forced"
        _assert_close(f"sample_image(guidance_scale={scale}, temperature={temp}).logps vs {what} policy={policy!r}",
                      s.logps, lp.values, lp.mask, atol)
        scored[policy] = (s, lp)
    s, guided = scored["guided"]
    cond = _image_logps(model, s, s.prompts, policy="cond", guidance_scale=guidance_scale, temperature=temperature)
    assert (cond.values - guided.values).abs().max().item() > atol, (
        f"policy='cond' and policy='guided' (scale {guidance_scale}) give the same log-probs: guidance is ignored"
    )
    for temp in (1.0, temperature):
        with torch.no_grad():
            t = model.sample_text(list(images), num_samples=G, generator=_gen(3), temperature=temp)
        assert isinstance(t, TextSamples), f"sample_text returned {type(t).__name__}, not TextSamples"
        assert bool((t.logps[~t.mask] == 0).all()), "TextSamples.logps are not 0 at padding"
        lp = _text_logps(model, t, t.images if t.images is not None else repeat_interleave(list(images), G),
                         temperature=temp)
        assert not lp.estimate, "logp_text_given_image is an estimate; captions are scored exactly"
        assert torch.equal(lp.mask.cpu(), t.mask.cpu()), "logp_text_given_image's mask is not TextSamples.mask"
        _assert_close(f"sample_text(temperature={temp}).logps vs teacher-forced", t.logps, lp.values, t.mask, atol)


def check_temperature_zero_is_greedy(
    model: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    num_samples: int = 2,
    guidance_scale: float | None = None,
) -> None:
    """Temperature 0 is greedy decoding in both directions (see the module docstring)."""
    with torch.no_grad():
        gens = [torch.Generator().manual_seed(s) for s in (0, 12345)]
        img = [
            model.sample_image(
                list(prompts), num_samples=num_samples, generator=g, guidance_scale=guidance_scale, temperature=0.0
            )
            for g in gens
        ]
        txt = [model.sample_text(list(images), num_samples=num_samples, generator=g, temperature=0.0) for g in gens]
    assert torch.equal(img[0].tokens, img[1].tokens), "sample_image(temperature=0) depends on the generator"
    _assert_rows_equal("sample_image(temperature=0)", img[0].tokens, num_samples)
    _assert_finite("sample_image(temperature=0).logps", img[0].logps)
    assert torch.equal(txt[0].tokens, txt[1].tokens), "sample_text(temperature=0) depends on the generator"
    assert txt[0].texts == txt[1].texts
    _assert_rows_equal("sample_text(temperature=0)", txt[0].tokens, num_samples)
    _assert_finite("sample_text(temperature=0).logps", txt[0].logps, txt[0].mask)


def check_generator_reproduces(model: Any, prompts: Sequence[str], images: Sequence[Any], *, num_samples: int = 2):
    """The same generator seed gives the same samples and ``.logps`` in both directions; another seed gives other
    samples (in at least one direction)."""
    def draw(seed: int):
        with torch.no_grad():
            s = model.sample_image(list(prompts), num_samples=num_samples, generator=_gen(seed))
            t = model.sample_text(list(images), num_samples=num_samples, generator=_gen(seed))
        return s, t

    (s1, t1), (s2, t2), (s3, t3) = draw(7), draw(7), draw(8)
    assert torch.equal(s1.tokens, s2.tokens), "sample_image with the same generator seed gives other tokens"
    assert torch.equal(s1.logps, s2.logps), "sample_image with the same generator seed gives other .logps"
    assert torch.equal(t1.tokens, t2.tokens) and t1.texts == t2.texts, "sample_text: same seed, other captions"
    assert torch.equal(t1.logps, t2.logps), "sample_text with the same generator seed gives other .logps"
    assert not (torch.equal(s1.tokens, s3.tokens) and t1.texts == t3.texts), (
        "another generator seed gives the same samples in both directions: is the generator used?"
    )


def check_save_load_round_trip(
    model: Any,
    name: str,
    path: str | os.PathLike,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    load_options: dict[str, Any] | None = None,
    atol: float = ATOL,
) -> Any:
    """``model.save_pretrained(path)`` then ``suder.load_backbone(name, model=path, **load_options)`` scores both
    directions as the saved model does; returns the loaded model."""
    from .registry import load_backbone

    with torch.no_grad():
        codes = model.sample_image(list(prompts), generator=_gen(4)).tokens
    want_i = _image_logps(model, codes, prompts)
    want_t = _text_logps(model, list(prompts), list(images)[: len(prompts)])
    model.save_pretrained(str(path))
    again = load_backbone(name, model=str(path), **(load_options or {}))
    assert again.name == model.name, f"loaded backbone is named {again.name!r}, saved {model.name!r}"
    _assert_close("logp_image_given_text after save/load", _image_logps(again, codes, prompts).values, want_i.values,
                  want_i.mask, atol)
    got_t = _text_logps(again, list(prompts), list(images)[: len(prompts)])
    _assert_close("logp_text_given_image after save/load", got_t.values, want_t.values, want_t.mask, atol)
    return again


def check_trainable_parameters(model: Any, prompts: Sequence[str], images: Sequence[Any]) -> None:
    """Per direction: ``trainable_parameters(direction)`` are non-empty parameters of the module; with only them
    requiring grad (as the trainer sets it), a gradient of the direction's log-prob reaches each of them."""
    mine = {id(p) for p in model.parameters()}
    with torch.no_grad():
        codes = model.sample_image(list(prompts), generator=_gen(5)).tokens
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for direction in DIRECTIONS:
            params = list(model.trainable_parameters(direction))
            assert params, f"trainable_parameters({direction!r}) is empty"
            assert all(id(p) in mine for p in params), f"trainable_parameters({direction!r}) are not the module's"
            trainable = {id(p) for p in params}
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable)
                p.grad = None
            model.train()
            if direction == "gen":
                loss = -model.logp_image_given_text(codes, list(prompts)).sum().sum()
            else:
                loss = -model.logp_text_given_image(list(prompts), list(images)[: len(prompts)]).sum().sum()
            assert loss.requires_grad, f"the {direction} log-prob has no gradient with its trainable parameters"
            loss.backward()
            names = {id(p): n for n, p in model.named_parameters()}
            missed = [names.get(id(p), "?") for p in params if p.grad is None or not bool(p.grad.abs().sum() > 0)]
            assert not missed, f"no gradient of the {direction} log-prob reaches {len(missed)} of {len(params)} " \
                f"trainable_parameters({direction!r}), e.g. {missed[:3]}"
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
        model.train(was_training)


def check_trainer_runs(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    strategy: str,
    algo: str,
    prompts_file: str | None = None,
    images_dir: str | None = None,
    name: str | None = None,
    load_options: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """``suder.train(model, ...)`` runs 2 tiny steps in ``strategy`` with ``algo``: finite losses, some trainable
    parameter changed, and (with ``name``) the final model loads with ``load_backbone``. Returns the result."""
    import suder

    directions = {"unified": DIRECTIONS, "separate": ("gen",)}.get(strategy, (strategy,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {id(p) for d in directions for p in model.trainable_parameters(d)}
    settings = dict(steps=2, group_size=2, gen_batch_size=2, und_batch_size=2, grad_accum=1, switch_every=1,
                    lr=1e-3, sample_every=1, save_every=0)
    data = {k: v for k, v in (("prompts", prompts_file), ("images", images_dir)) if v is not None}
    res = suder.train(model, algo=algo, strategy=strategy, output_dir=str(output_dir), **(settings | data | options))
    assert len(res.metrics) == 2, f"{len(res.metrics)} steps logged, not 2"
    losses = {k: v for m in res.metrics for k, v in m.items() if k.endswith("/loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), f"losses: {losses}"
    changed = [n for n, p in model.named_parameters() if id(p) in trained and not torch.equal(p, before[n])]
    assert changed, f"{strategy}/{algo}: no trainable parameter of {directions} changed in 2 steps"
    if name is not None:
        from .registry import load_backbone

        for sub in ("gen", "und") if strategy == "separate" else ("",):
            load_backbone(name, model=os.path.join(res.final_model, sub), **(load_options or {}))
    return res


# ------------------------------------------------------------------------------------------ the pytest class
def check_shapes_recipe(
    backbone_name: str,
    path: str | os.PathLike,
    *,
    steps: int = 2,
    batch_size: int = 2,
    num_samples: int = 2,
    atol: float = ATOL,
    **build_options: Any,
) -> Any:
    """The ShapesWorld recipe the backbone registers (``register(..., shapes_recipe=...)``) works end to end, at the
    size ``build_options`` give (they go to the recipe's ``build``; tests pass tiny sizes): its preset loads;
    ``suder.pretrain.pretrain`` builds the model and takes ``steps`` steps with finite losses; the folder it saves
    at ``path`` is marked as a ShapesWorld base and ``load_backbone(name, model=path)`` scores both directions as the
    trained model does; the loaded model samples ShapesWorld-sized images for prompts and captions for images, with
    finite ``.logps``. Returns the loaded model."""
    from .config import load_preset
    from .pretrain import MARKER, is_shapes_base, pretrain, shapes_recipe
    from .registry import load_backbone
    from .worlds import shapes

    recipe = shapes_recipe(backbone_name)
    assert recipe is not None, f"backbone {backbone_name!r} registers no shapes_recipe"
    if recipe.preset is not None:
        load_preset(recipe.preset)  # a missing file or an unknown setting raises ConfigError
    result = pretrain(backbone_name, out=str(path), steps=steps, seed=0, batch_size=batch_size, warmup_steps=1,
                      **build_options)
    losses = torch.tensor(result.losses)
    assert len(losses) == steps and bool(torch.isfinite(losses).all()), f"pre-training losses: {result.losses}"
    assert is_shapes_base(path), f"pretrain(out={str(path)!r}) wrote no {MARKER}: not marked as a ShapesWorld base"
    trained, pairs = result.model, shapes.t2i_pairs(2, seed=1)
    prompts, images = [p for p, _ in pairs], [shapes.render(scene) for _, scene in pairs]
    captions = [c for _, c in shapes.caption_pairs(2, seed=2)]
    with torch.no_grad():
        codes = trained.sample_image(prompts, generator=_gen(4)).tokens
    want_i, want_t = _image_logps(trained, codes, prompts), _text_logps(trained, captions, images)
    again = load_backbone(backbone_name, model=str(path))
    assert again.name == trained.name, f"loaded backbone is named {again.name!r}, trained {trained.name!r}"
    _assert_close("logp_image_given_text of the loaded base", _image_logps(again, codes, prompts).values,
                  want_i.values, want_i.mask, atol)
    got_t = _text_logps(again, captions, images)
    _assert_close("logp_text_given_image of the loaded base", got_t.values, want_t.values, want_t.mask, atol)
    with torch.no_grad():
        img = again.sample_image(prompts, num_samples=num_samples, generator=_gen(5))
        txt = again.sample_text(images, num_samples=num_samples, generator=_gen(6))
    _assert_finite("sample_image(...).logps of the loaded base", img.logps)
    _assert_finite("sample_text(...).logps of the loaded base", txt.logps, txt.mask)
    size = images[0].size
    sizes = [im.size for im in img.images]
    assert sizes == [size] * len(prompts) * num_samples, f"sampled images are {sizes}, ShapesWorld's are {size}"
    assert len(txt.texts) == len(images) * num_samples and all(isinstance(t, str) for t in txt.texts), txt.texts
    return again


def random_images(n: int, size: int = 32, seed: int = 0) -> list[Any]:
    """``n`` random RGB PIL images of ``size`` x ``size`` pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class BackboneConformance:
    """Every check of this module as pytest tests: subclass as ``Test<Name>Conformance`` and define
    ``make_backbone`` (its arguments, if any, name pytest fixtures). See the module docstring."""

    backbone_name: str | None = None  # registered name; None skips the round trip and the loading after training
    prompts: Sequence[str] = ("a red circle", "a green triangle left of a yellow square")  # different lengths
    captions: Sequence[str] | None = None  # for the caption padding check; default: the prompts
    guidance_scale: float = 3.0  # a scale that guides
    unguided_scale: float = 1.0  # the scale that does not (Show-o: 0)
    temperature: float = 0.7
    num_samples: int = 2
    atol: float = ATOL
    load_options: dict[str, Any] = {}  # for load_backbone(backbone_name, model=PATH, **load_options)
    train_options: dict[str, Any] = {}  # extra suder.train settings (e.g. max caption length)

    def make_backbone(self) -> Any:
        raise NotImplementedError("define make_backbone(self) returning a small instance of your backbone")

    def make_images(self, n: int) -> list[Any]:
        return random_images(n)

    # -------------------------------------------------------------- helpers
    def _backbone(self, request: Any) -> Any:
        wanted = list(inspect.signature(self.make_backbone).parameters)
        model = self.make_backbone(**{n: request.getfixturevalue(n) for n in wanted})
        return model.eval()

    def _inputs(self) -> tuple[list[str], list[Any]]:
        return list(self.prompts), self.make_images(len(self.prompts))

    def _data(self, root: Any) -> tuple[str, str]:
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        prompts = os.path.join(root, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("\n".join(list(self.prompts) * 2) + "\n")
        for i, image in enumerate(self.make_images(4)):
            image.save(os.path.join(root, "images", f"{i}.png"))
        return prompts, os.path.join(root, "images")

    # -------------------------------------------------------------- the checks as tests
    def test_group_layout(self, request):
        check_group_layout(self._backbone(request), *self._inputs(), num_samples=self.num_samples,
                           guidance_scale=self.guidance_scale, atol=self.atol)

    def test_left_padding(self, request):
        check_left_padding(self._backbone(request), *self._inputs(), captions=self.captions, atol=self.atol)

    def test_sampled_logps_match_teacher_forced(self, request):
        check_sampled_logps_match_teacher_forced(
            self._backbone(request), *self._inputs(), guidance_scale=self.guidance_scale,
            unguided_scale=self.unguided_scale, temperature=self.temperature, num_samples=self.num_samples,
            atol=self.atol,
        )

    def test_temperature_zero_is_greedy(self, request):
        check_temperature_zero_is_greedy(self._backbone(request), *self._inputs(), num_samples=self.num_samples,
                                         guidance_scale=self.guidance_scale)

    def test_generator_reproduces(self, request):
        check_generator_reproduces(self._backbone(request), *self._inputs(), num_samples=self.num_samples)

    def test_save_load_round_trip(self, request, tmp_path):
        if self.backbone_name is None:
            import pytest

            pytest.skip("set backbone_name to the registered name to check save_pretrained + load_backbone")
        check_save_load_round_trip(self._backbone(request), self.backbone_name, tmp_path / "saved", *self._inputs(),
                                   load_options=self.load_options, atol=self.atol)

    def test_trainable_parameters(self, request):
        check_trainable_parameters(self._backbone(request), *self._inputs())


def _trainer_test(strategy: str, algo: str) -> Callable[..., None]:
    def test(self, request, tmp_path):
        prompts, images = self._data(tmp_path / "data")
        check_trainer_runs(self._backbone(request), tmp_path / "run", strategy=strategy, algo=algo,
                           prompts_file=prompts, images_dir=images, name=self.backbone_name,
                           load_options=self.load_options, **self.train_options)

    test.__name__ = f"test_trainer_{strategy}_{algo}"
    test.__doc__ = f"suder.train runs 2 steps, strategy {strategy!r}, algorithm {algo!r}."
    return test


for _strategy in STRATEGIES:
    for _algo in ALGORITHMS:
        setattr(BackboneConformance, f"test_trainer_{_strategy}_{_algo}", _trainer_test(_strategy, _algo))
del _strategy, _algo
