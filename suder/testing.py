"""Conformance checks that every backbone, built-in or third-party, can run from its own tests.

Each check is a plain function that raises ``AssertionError`` with the offending values; call it from a pytest
test with a small (random-weight) instance of your backbone::

    from suder.testing import check_temperature_zero_is_greedy

    def test_greedy(my_tiny_backbone, some_images):
        check_temperature_zero_is_greedy(my_tiny_backbone, ["a red circle"], some_images)

The contracts (also in ``docs/writing-a-plugin.md``):

- **temperature 0 means greedy** in both directions: the arg-max token at every step (after guidance, for images),
  so the result does not depend on the generator, every sample of a group is the same, and ``.logps`` are finite:
  the log-probs of the chosen tokens under the untempered (temperature 1) distribution of the same policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _assert_finite(name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    v = values if mask is None else values[mask]
    bad = (~torch.isfinite(v)).sum().item()
    assert bad == 0, f"{name}: {bad} of {v.numel()} log-probs are not finite (e.g. {v[~torch.isfinite(v)][:4]})"


def _assert_rows_equal(name: str, tokens: torch.Tensor, group: int) -> None:
    rows = tokens.view(-1, group, *tokens.shape[1:])
    same = (rows == rows[:, :1]).flatten(2).all(-1)
    assert bool(same.all()), f"{name}: greedy samples of one group differ (rows equal to the first: {same.tolist()})"


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
