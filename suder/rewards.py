"""Rewards: the dual self-rewards of SUDER, our dual-consensus extension, and the ShapesWorld judge.

A reward is a plain function ``reward(ctx, samples) -> (B*G,) tensor`` built by a factory registered through the
``register_rewards(register)`` hook (this module is itself the plugin ``builtin-rewards``). ``ctx`` is a
``RewardContext``: the model that scores (the policy itself, or a frozen snapshot) and the frozen reference.
Rewards are computed without gradient, in batched passes: one forward per group batch, never a per-sample loop.

Built-ins:

- ``dsr`` (SUDER, Hu et al. 2025, eq. 3). Generation: r(image_i) = mean_t log p(prompt_t | image_i), via
  ``logp_text_given_image``. Understanding: r(caption_i) = mean_t log p(image_t | caption_i), via
  ``logp_image_given_text``. ``reduction="sum"`` sums instead; within a group the scored target is fixed, so the
  sum is the mean times a constant and ranks identically (docs/algorithms.md).
- ``dsr-consensus`` (ours; understanding direction). r(c | x) = log p(x | c) + lambda * log pi_ref(c | x), both
  summed over tokens. The paper's caption reward alone prefers over-specific captions (it rewards pinning down
  *where* objects are, right or wrong) and made captions worse in every plain setting of our prototype; adding the
  captioner's own likelihood acts like a caption prior (if both directions model one joint, the sum ranks like
  2 log p(x | c) + log p(c)); docs/results.md has what it measured on ShapesWorld. The caption term comes from
  the frozen initial model by default (``source="reference"``: the prior cannot drift), or from
  the policy being trained (``source="policy"``, whichever model scores the image term). Summing (not
  averaging) both terms matters: a per-token mean would re-weight them by caption length.
- ``shapes-judge``: the exact ShapesWorld judge, 1 or 0 (``suder.worlds.judge``). External supervision, for
  comparison only (the role the paper's CLIP baseline plays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .hookspecs import hookimpl
from .protocol import ImageSamples, TextSamples, TokenLogProbs
from .worlds.judge import judge_generation, judge_understanding


@dataclass
class RewardContext:
    """What a reward may use.

    ``scorer``: the model that computes self-rewards (the policy, a frozen snapshot of it, or in the ``separate``
    strategy the other, frozen model). ``reference``: the frozen initial policy (``None`` when the run keeps
    none; for LoRA backbones the policy with its initial adapter, ``suder.engine.Reference``). ``policy``:
    the model being trained, whoever scores (``None``: the scorer is the policy).
    """

    scorer: Any
    reference: Any = None
    policy: Any = None

    def policy_model(self):
        return self.scorer if self.policy is None else self.policy

    def reference_model(self):
        if self.reference is None:
            raise ConfigError(
                "This reward reads the frozen reference model, but the run keeps none; its plugin must declare "
                "register(..., needs_reference=True)."
            )
        return self.reference


def _reduce(lp: TokenLogProbs, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return lp.mean()
    if reduction == "sum":
        return lp.sum()
    raise ConfigError(f"reward reduction must be 'mean' or 'sum', got {reduction!r}.")


def dsr_generation(ctx: RewardContext, samples: ImageSamples, *, reduction: str = "mean") -> torch.Tensor:
    """SUDER eq. 3 (generation): r(image_i) = reduce_t log p(prompt_t | image_i); (B*G,)."""
    with torch.no_grad():
        return _reduce(ctx.scorer.logp_text_given_image(samples.prompts, samples), reduction).float()


def dsr_understanding(ctx: RewardContext, samples: TextSamples, *, reduction: str = "mean") -> torch.Tensor:
    """SUDER eq. 3 (understanding): r(caption_i) = reduce_t log p(image_t | caption_i); (B*G,).

    The image is scored under the conditional model (``policy="cond"``): the reward asks how well the caption
    explains the image, not how a guided sampler would draw it.
    """
    with torch.no_grad():
        lp = ctx.scorer.logp_image_given_text(samples.images, samples, policy="cond")
        return _reduce(lp, reduction).float()


def dsr_consensus(
    ctx: RewardContext, samples: TextSamples, *, lam: float = 1.0, source: str = "reference"
) -> torch.Tensor:
    """Dual consensus (ours): sum_t log p(image_t | c) + lam * sum_t log pi(c_t | image); (B*G,)."""
    if source not in ("reference", "policy"):
        raise ConfigError(f"consensus_source must be 'reference' or 'policy', got {source!r}.")
    image_term = dsr_understanding(ctx, samples, reduction="sum")
    with torch.no_grad():
        if source == "policy":
            caption_term = ctx.policy_model().logp_text_given_image(samples, samples.images).sum()
        else:
            caption_term = ctx.reference_model().logp_text_given_image(samples, samples.images).sum()
    return image_term + lam * caption_term.float()


def build_dsr(direction: str, reduction: str = "mean", **_: Any):
    fn = dsr_generation if direction == "gen" else dsr_understanding
    return lambda ctx, samples: fn(ctx, samples, reduction=reduction)


def build_consensus(direction: str, consensus_lambda: float = 1.0, consensus_source: str = "reference", **_: Any):
    if direction != "und":
        raise ConfigError("The 'dsr-consensus' reward scores captions; use it as und_reward (gen_reward: dsr).")
    return lambda ctx, samples: dsr_consensus(ctx, samples, lam=consensus_lambda, source=consensus_source)


def build_judge(direction: str, **_: Any):
    fn = judge_generation if direction == "gen" else judge_understanding
    return lambda ctx, samples: fn(samples)


def needs_reference(name: str, options: dict[str, Any]) -> bool:
    """Whether the reward registered as ``name`` needs the frozen reference model, for a run with ``options``
    (the resolved config as a dict): what its plugin declared with ``register(..., needs_reference=...)``."""
    from .registry import get_reward_spec

    declared = get_reward_spec(name).needs_reference
    return bool(declared(options) if callable(declared) else declared)


def _consensus_needs_reference(options: dict[str, Any]) -> bool:
    return options.get("consensus_source", "reference") == "reference"


@hookimpl
def register_rewards(register):
    register("dsr", build_dsr, ("gen", "und"), "SUDER dual self-reward: the reverse direction's log-likelihood")
    register(
        "dsr-consensus",
        build_consensus,
        ("und",),
        "log p(image | caption) + lambda * log pi_ref(caption | image), summed (our extension)",
        needs_reference=_consensus_needs_reference,
    )
    register("shapes-judge", build_judge, ("gen", "und"), "Exact ShapesWorld judge, 1/0 (external supervision)")
