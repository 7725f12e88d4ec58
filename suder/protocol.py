"""The `UnifiedLMM` protocol: the four methods every backbone provides, and their result types.

Shapes are written down here once and used everywhere else:

- ``B``: number of conditioning inputs (prompts or images) passed to a call.
- ``G``: ``num_samples`` per input (the group size). Samples are laid out input-major: rows
  ``b * G ... b * G + G - 1`` belong to input ``b``.
- ``N``: image tokens per image (fixed per backbone: 64 for ``toy``, 576 for Janus-Pro, 256/1024 for Show-o).
- ``T``: text tokens of the longest caption/prompt in the batch, right-padded, ``mask`` marking real tokens
  (the end-of-text token counts as a real token: it is part of what the model produced or is scored on).

Two log-prob methods serve three purposes, which is the design's central idea:

- the policy log-likelihood of a training loss (with grad),
- the dual self-reward (without grad, the reverse direction), and
- supervised pre-training (maximise both).

A backbone is a ``torch.nn.Module`` (so the trainer can hand it to ``accelerate``) that also has ``name``,
``save_pretrained(path)`` and ``trainable_parameters(direction)``; see ``docs/writing-a-plugin.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Direction = Literal["gen", "und"]
"""``gen``: text-to-image (the model draws); ``und``: image-to-text (the model captions)."""

DIRECTIONS: tuple[str, ...] = ("gen", "und")


@dataclass
class TokenLogProbs:
    """Per-token log-probabilities of a batch of target sequences.

    ``values``: (B, T) float, log p of each target token (0 where ``mask`` is False).
    ``mask``: (B, T) bool, True at real target tokens.
    ``estimate``: True when the values are an estimate rather than the exact likelihood (masked models).
    """

    values: torch.Tensor
    mask: torch.Tensor
    estimate: bool = False

    def __post_init__(self) -> None:
        assert self.values.shape == self.mask.shape, (
            f"values {tuple(self.values.shape)} and mask {tuple(self.mask.shape)} differ"
        )
        assert self.values.dim() == 2, f"expected (B, T) values, got {tuple(self.values.shape)}"

    def sum(self) -> torch.Tensor:
        """(B,) summed log-prob over the real tokens."""
        return (self.values * self.mask).sum(-1)

    def mean(self) -> torch.Tensor:
        """(B,) per-token mean log-prob over the real tokens (the length-normalised score)."""
        return self.sum() / self.mask.sum(-1).clamp_min(1)

    def lengths(self) -> torch.Tensor:
        """(B,) number of real tokens."""
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return self.values.shape[0]


@dataclass
class ImageSamples:
    """Images sampled for ``B`` prompts, ``G`` each.

    ``prompts``: list of B*G prompts (each prompt repeated G times, input-major).
    ``tokens``: (B*G, N) long, image token ids in the backbone's image vocabulary.
    ``logps``: (B*G, N) float, log-prob of each sampled token under the sampling policy (temperature and
    guidance applied; at temperature 0, greedy, the chosen token's log-prob at temperature 1). In float32 they
    equal the teacher-forced ``logp_image_given_text`` of the same tokens (same policy, guidance and
    temperature) to float rounding; in bfloat16 or float16 only approximately (below).
    ``images``: list of B*G PIL images, decoded from ``tokens`` on first access.

    ``.logps`` in reduced precision: a sampler computes each token's log-prob incrementally (one KV-cached step
    at a time), a teacher-forced pass all at once, and the two round differently. In float32 that is float
    rounding (Janus-Pro's tiny test model: at most 1e-5 per token). In bfloat16 or float16 ``.logps`` are still
    the log-probs of the tokens actually drawn, but only an approximation of the policy's likelihood: rounding
    of the hidden states compounds over hundreds of steps, and sharp distributions and classifier-free
    guidance (``s * (cond - uncond)``) amplify it, to tenths of a nat per token (Janus-Pro's tiny 576-token
    model in bfloat16, CFG 5: ``docs/performance.md``). Use them to monitor; where the policy's likelihood
    matters (importance ratios, losses), recompute it teacher-forced, as the trainer does for GRPO's old
    log-probs, logging the gap as ``{direction}/logp_drift_max`` and ``{direction}/logp_drift_mean``. Backbones
    whose image log-probs are an estimate (``TokenLogProbs.estimate``) say what their ``.logps`` match.
    """

    prompts: list[str]
    tokens: torch.Tensor
    logps: torch.Tensor
    num_samples: int = 1
    guidance_scale: float = 1.0
    temperature: float = 1.0
    decode: Callable[[torch.Tensor], list[Any]] | None = field(default=None, repr=False)
    _images: list[Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        assert self.tokens.shape[0] == n and self.logps.shape == self.tokens.shape, (
            f"{n} prompts, tokens {tuple(self.tokens.shape)}, logps {tuple(self.logps.shape)}"
        )

    @property
    def images(self) -> list[Any]:
        if self._images is None:
            if self.decode is None:
                raise ValueError("these ImageSamples carry no decoder; pass images explicitly")
            self._images = list(self.decode(self.tokens))
        return self._images

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Sequence[int] | torch.Tensor) -> ImageSamples:
        """A subset of rows (e.g. the best and worst of each group), sharing the decoder."""
        idx = torch.as_tensor(index, dtype=torch.long)
        images = None if self._images is None else [self._images[i] for i in idx.tolist()]
        return ImageSamples(
            prompts=[self.prompts[i] for i in idx.tolist()],
            tokens=self.tokens[idx],
            logps=self.logps[idx],
            num_samples=1,
            guidance_scale=self.guidance_scale,
            temperature=self.temperature,
            decode=self.decode,
            _images=images,
        )


@dataclass
class TextSamples:
    """Captions sampled for ``B`` images, ``G`` each.

    ``texts``: list of B*G decoded captions (input-major).
    ``tokens``: (B*G, T) long, right-padded caption token ids, ending with the end-of-text token when the
    caption finished.
    ``logps``: (B*G, T) float, log-prob of each sampled token under the sampling policy (0 at padding; at
    temperature 0 the greedy token's log-prob at temperature 1). As ``ImageSamples.logps``: equal to the
    teacher-forced ``logp_text_given_image`` to float rounding in float32, an approximation in reduced precision.
    ``mask``: (B*G, T) bool, True at sampled tokens.
    ``images``: the B*G conditioning images (each input repeated G times), as passed in.
    """

    texts: list[str]
    tokens: torch.Tensor
    logps: torch.Tensor
    mask: torch.Tensor
    images: Any = None
    num_samples: int = 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.texts)
        assert self.tokens.shape[0] == n and self.logps.shape == self.tokens.shape == self.mask.shape, (
            f"{n} texts, tokens {tuple(self.tokens.shape)}, logps {tuple(self.logps.shape)}, "
            f"mask {tuple(self.mask.shape)}"
        )

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index: Sequence[int] | torch.Tensor) -> TextSamples:
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return TextSamples(
            texts=[self.texts[i] for i in rows],
            tokens=self.tokens[idx],
            logps=self.logps[idx],
            mask=self.mask[idx],
            images=select_images(self.images, rows),
            num_samples=1,
            temperature=self.temperature,
        )


def join_groups(first: TextSamples, second: TextSamples) -> TextSamples:
    """Each input's captions from ``first`` followed by its captions from ``second`` (same inputs, same order):
    one ``TextSamples`` with ``first.num_samples + second.num_samples`` rows per input, right-padded to the
    wider of the two (padding: token 0, masked out). ``temperature`` is ``second``'s."""
    g1, g2 = first.num_samples, second.num_samples
    n = len(first) // g1
    assert len(second) == n * g2, f"{len(first)} rows in {g1}s but {len(second)} in {g2}s: not the same inputs"
    width = max(first.tokens.shape[1], second.tokens.shape[1])

    def pad(t: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    def grouped(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.view(n, g1, -1), b.view(n, g2, -1)], 1).view(n * (g1 + g2), -1)

    order = [(k, i * g + j) for i in range(n) for k, g in ((0, g1), (1, g2)) for j in range(g)]
    parts = (first, second)
    # both halves hold the same input per group: the conditioning images are ``first``'s, each repeated
    images = select_images(first.images, [i * g1 for i in range(n) for _ in range(g1 + g2)])
    return TextSamples(
        texts=[parts[k].texts[r] for k, r in order],
        tokens=grouped(pad(first.tokens, 0), pad(second.tokens, 0)),
        logps=grouped(pad(first.logps, 0.0), pad(second.logps, 0.0)),
        mask=grouped(pad(first.mask, False), pad(second.mask, False)),
        images=images,
        num_samples=g1 + g2,
        temperature=second.temperature,
    )


def select_images(images: Any, rows: list[int]) -> Any:
    """Rows of a list of images or of an ``ImageSamples``."""
    if images is None:
        return None
    if isinstance(images, ImageSamples):
        return images.select(rows)
    return [images[i] for i in rows]


def repeat_interleave(items: Sequence[Any], times: int) -> list[Any]:
    """``[a, b] -> [a, a, b, b]`` for ``times=2``: the input-major group layout."""
    return [x for x in items for _ in range(times)]


@runtime_checkable
class UnifiedLMM(Protocol):
    """A model that both draws images from text and captions images.

    Implementations: ``suder.backbones.toy.ToyUnifiedLM`` (the reference), ``janus-pro``, ``show-o``.
    """

    name: str

    def sample_image(
        self,
        prompts: Sequence[str],
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        **options: Any,
    ) -> ImageSamples:
        """Sample ``num_samples`` images per prompt; returns B*G samples with their token log-probs."""
        ...

    def sample_text(
        self,
        images: Sequence[Any] | ImageSamples,
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        **options: Any,
    ) -> TextSamples:
        """Sample ``num_samples`` captions per image (``temperature=0``: greedy)."""
        ...

    def logp_image_given_text(
        self, images: Sequence[Any] | ImageSamples, texts: Sequence[str] | TextSamples, **options: Any
    ) -> TokenLogProbs:
        """log p(image tokens | text): (B, N). One teacher-forced forward; differentiable under grad."""
        ...

    def logp_text_given_image(
        self, texts: Sequence[str] | TextSamples, images: Sequence[Any] | ImageSamples, **options: Any
    ) -> TokenLogProbs:
        """log p(text tokens | image): (B, T). One teacher-forced forward; differentiable under grad."""
        ...

    def save_pretrained(self, path: str) -> None: ...

    def trainable_parameters(self, direction: str) -> Iterable[torch.nn.Parameter]: ...


def check_backbone(obj: Any) -> None:
    """Raise ``BackboneError`` naming what is missing when ``obj`` does not satisfy the protocol."""
    from .errors import BackboneError

    needed = [
        "sample_image",
        "sample_text",
        "logp_image_given_text",
        "logp_text_given_image",
        "save_pretrained",
        "trainable_parameters",
    ]
    missing = [n for n in needed if not callable(getattr(obj, n, None))]
    if not hasattr(obj, "name"):
        missing.append("name")
    if not isinstance(obj, torch.nn.Module):
        missing.append("torch.nn.Module base class")
    if missing:
        raise BackboneError(f"{type(obj).__name__} is not a UnifiedLMM backbone: missing {', '.join(missing)}.")


def texts_of(texts: Sequence[str] | TextSamples) -> list[str]:
    return list(texts.texts) if isinstance(texts, TextSamples) else list(texts)

