"""Rollouts: sampling groups in both directions into typed records, and the per-algorithm batch assembly.

The trainer is one loop; what differs between directions and algorithms lives here, looked up by name:

- ``DIRECTIONS[d]`` knows how to sample a group for direction ``d`` and how to score the policy on its samples.
- ``ALGORITHMS[name]`` turns a rewarded rollout into a training batch (``prepare``) and a batch into a loss
  (``loss``), using the pure functions of ``suder.losses``.

Departures from the paper, on purpose:

- GRPO's "old" log-probs are recomputed by the same teacher-forced function as the new ones (not taken from the
  sampler), so the first importance ratio is exactly 1 whatever CFG policy or temperature was used to sample; the
  trainer checks this (``TrainingError``) to catch dropout, nondeterminism or a mismatched scoring path.
- SimPO skips groups whose best and worst sample are identical (same tokens), as well as zero-spread groups.
- An optional KL penalty to the reference policy is available for SimPO too (``simpo_kl_beta``), as a guard for
  the understanding direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import losses
from .errors import TrainingError
from .protocol import ImageSamples, TextSamples, TokenLogProbs, join_groups

if TYPE_CHECKING:
    from .config import TrainConfig

Direction = Literal["gen", "und"]  # text-to-image generation, image-to-text understanding


@dataclass
class Rollout:
    """One direction's sampled groups with their rewards. ``samples`` and ``rewards`` have B*G rows."""

    direction: Direction
    samples: ImageSamples | TextSamples
    rewards: torch.Tensor
    group_size: int
    judge: torch.Tensor | None = None  # (B*G,) 1/0 from an exact judge, monitors only
    greedy_first: bool = False  # row 0 of each group is the greedy caption (``text_greedy_in_group``)


@dataclass
class Batch:
    """What one loss call needs: the selected samples and the no-grad tensors computed before the update."""

    direction: Direction
    samples: ImageSamples | TextSamples
    count: int  # pairs (SimPO) or rows (GRPO)
    tokens: int  # real target tokens in ``samples``
    advantages: torch.Tensor | None = None
    old_logps: list[torch.Tensor] | None = None  # one per inner iteration (they differ only when re-masking)
    ref_logps: list[torch.Tensor] | None = None  # the same seeds as ``old_logps`` (SimPO: one, ``seeds[0]``)
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # SimPO all pairs: chosen, rejected, weight
    seeds: list[int] = field(default_factory=lambda: [0])  # re-masking seed per inner iteration
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ directions
def sample_group(model: Any, direction: Direction, inputs: list[Any], cfg: TrainConfig, generator: torch.Generator):
    """Sample the direction's group size (``cfg.side(direction).group_size``) outputs per input (no grad)."""
    size = group_size(cfg, direction)
    if direction == "gen":
        return model.sample_image(
            inputs,
            num_samples=size,
            generator=generator,
            guidance_scale=cfg.guidance_scale,
            temperature=cfg.image_temperature,
        )
    if cfg.text_greedy_in_group and size > 1:
        # the captioner's mode, which greedy captioning (evaluation, users) returns, is ranked with the samples
        sampled = model.sample_text(inputs, num_samples=size - 1, generator=generator, temperature=cfg.text_temperature)
        greedy = model.sample_text(inputs, num_samples=1, generator=generator, temperature=0.0)
        return join_groups(greedy, sampled)
    return model.sample_text(inputs, num_samples=size, generator=generator, temperature=cfg.text_temperature)


def group_size(cfg: TrainConfig, direction: Direction) -> int:
    """G of a direction: ``gen.group_size`` or ``und.group_size`` (each ``group_size`` unless set)."""
    return cfg.side(direction).group_size


def policy_logps(
    model: Any, direction: Direction, samples: ImageSamples | TextSamples, cfg: TrainConfig, seed: int | None = None
) -> TokenLogProbs:
    """log pi(output | input) of the policy on its own samples: (rows, N) images or (rows, T) captions.

    ``cfg.image_logp_options`` go to ``logp_image_given_text`` (e.g. Show-o's ``remask_ratio``, ``prompt_drop``);
    when they ask for a random perturbation, ``seed`` is passed as ``remask_seed`` so old and new log-probs share it.
    """
    if direction == "gen":
        extra = dict(cfg.image_logp_options)
        if _remasks(cfg) and seed is not None:
            extra["remask_seed"] = seed
        return model.logp_image_given_text(
            samples,
            samples.prompts,
            policy=cfg.cfg_policy,
            guidance_scale=samples.guidance_scale,
            temperature=cfg.image_temperature,
            **extra,
        )
    return model.logp_text_given_image(samples, samples.images, temperature=cfg.text_temperature or 1.0)


def _remasks(cfg: TrainConfig) -> bool:
    """Whether the image estimator is randomly perturbed (Show-o's re-masking or prompt drop): one seed per
    inner iteration then."""
    options = cfg.image_logp_options
    return float(options.get("remask_ratio", 1.0)) < 1.0 or float(options.get("prompt_drop", 0.0)) > 0.0


def target_tokens(samples: ImageSamples | TextSamples) -> torch.Tensor:
    """(rows, L) token ids that identify a sample (for duplicate checks)."""
    return samples.tokens if isinstance(samples, ImageSamples) else samples.tokens * samples.mask


def distinct_per_group(samples: ImageSamples | TextSamples, group_size: int) -> float:
    """Mean fraction of distinct samples in a group (1.0: all different)."""
    rows = target_tokens(samples).cpu()
    fracs = []
    for g in range(0, rows.shape[0], group_size):
        fracs.append(len({tuple(r.tolist()) for r in rows[g : g + group_size]}) / group_size)
    return sum(fracs) / max(len(fracs), 1)


def rollout_metrics(r: Rollout, best: torch.Tensor, worst: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Monitors: reward mean/std/spread, diversity, caption length, judge accuracy and reward-judge agreement.
    Means are over groups (``groups``; G is fixed, so also over rows) or decisive groups (``judge_decisive``),
    which the trainer weighs them by (``suder.distributed.StepMetrics``); ``reward_std`` is the std of all the
    batch's rewards, which ``StepMetrics`` pools exactly over micro-batches and processes."""
    d, G = r.direction, r.group_size
    grouped = r.rewards.view(-1, G)
    out = {
        f"{d}/reward_mean": r.rewards.mean().item(),
        f"{d}/reward_std": r.rewards.std(unbiased=False).item(),
        f"{d}/reward_spread": (grouped.max(-1).values - grouped.min(-1).values).mean().item(),
        f"{d}/distinct": distinct_per_group(r.samples, G),
        f"{d}/groups_skipped": float((~valid).sum().item()),
        f"{d}/groups": float(valid.numel()),
    }
    if isinstance(r.samples, TextSamples):
        out[f"{d}/caption_words"] = sum(len(t.split()) for t in r.samples.texts) / max(len(r.samples), 1)
    if r.greedy_first:  # how often the reward ranks the captioner's own greedy caption first / last in its group
        first = torch.arange(0, len(r.rewards), G, device=best.device)
        out[f"{d}/greedy_chosen"] = (valid & (best == first)).float().mean().item()
        out[f"{d}/greedy_rejected"] = (valid & (worst == first)).float().mean().item()
        if r.judge is not None:
            out[f"{d}/greedy_judge_acc"] = r.judge[first.cpu()].float().mean().item()
    if r.judge is not None:
        out[f"{d}/judge_acc"] = r.judge.mean().item()
        jb, jw = r.judge[best], r.judge[worst]
        decisive = valid & (jb != jw)
        out[f"{d}/judge_decisive"] = float(decisive.sum().item())
        out[f"{d}/judge_agree"] = (
            (jb[decisive] > jw[decisive]).float().mean().item() if decisive.any() else float("nan")
        )
    return out


def sampled_mean_logp(samples: ImageSamples | TextSamples) -> torch.Tensor:
    """(rows,) each sample's mean per-token ``.logps`` over its real tokens: how likely its sampler found it."""
    if isinstance(samples, TextSamples):
        mask = samples.mask.float()
        return (samples.logps.float() * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return samples.logps.float().mean(-1)


def _share_equal(rewards: torch.Tensor, rejected: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """Fraction of valid groups whose rejected sample has the group's lowest reward, and how many groups."""
    G = len(rewards) // len(valid)
    lowest = rewards.view(-1, G).min(-1).values
    hit = (rewards[rejected.to(rewards.device)] <= lowest + 1e-6)[valid.to(rewards.device)]
    return (hit.float().mean().item() if hit.numel() else float("nan")), float(hit.numel())


def logp_drift(
    direction: Direction, samples: ImageSamples | TextSamples, scored: TokenLogProbs, cfg: TrainConfig
) -> dict:
    """Monitors ``{direction}/logp_drift_max`` and ``_mean``: |sampled ``.logps`` - teacher-forced log-probs|
    over the real tokens. The same tokens under the same policy: float rounding in float32, more in bf16
    (``ImageSamples.logps``). None where they differ on purpose: estimates (Show-o's images), and guided
    samples scored under ``cfg_policy="cond"``."""
    if scored.estimate or (direction == "gen" and cfg.cfg_policy == "cond" and samples.guidance_scale != 1.0):
        return {}
    if samples.logps.shape != scored.values.shape:  # a backbone that re-tokenizes its captions
        return {}
    if direction == "und" and cfg.text_greedy_in_group and (cfg.text_temperature or 1.0) != 1.0:
        return {}  # the greedy rows' .logps are at temperature 1, the others' at text_temperature
    gap = (samples.logps.to(scored.values.device).float() - scored.values.float()).abs()[scored.mask]
    if not gap.numel():
        return {}
    return {
        f"{direction}/logp_drift_max": gap.max().item(),
        f"{direction}/logp_drift_mean": gap.mean().item(),
        f"{direction}/drift_tokens": float(gap.numel()),  # what the mean is over
    }


def _guidance_holder(model: Any) -> Any:
    """Where a backbone keeps its default guidance scale: ``config``, ``settings``, else the model itself."""
    for holder in (getattr(model, "config", None), getattr(model, "settings", None)):
        if holder is not None and not callable(holder) and hasattr(holder, "guidance_scale"):
            return holder
    return model


def read_guidance(model: Any) -> float | None:
    """The model's default guidance scale (``store_guidance`` writes it there); ``None`` if it keeps none."""
    scale = getattr(_guidance_holder(model), "guidance_scale", None)
    return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None


def store_guidance(model: Any, scale: float | None) -> None:
    """Make the training guidance scale the model's default, so checkpoints carry the scale the model was
    optimised for and ``suder generate`` uses it (gains do not carry across scales)."""
    if scale is None:
        return
    try:
        _guidance_holder(model).guidance_scale = float(scale)
    except AttributeError:
        pass


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (Python's ``hash`` of strings changes per process)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % 2**64
    return h % 2**63


# ------------------------------------------------------------------------------------------ algorithms
class SimPO:
    """Online SimPO (SUDER eq. 4): best vs worst sample of each group by reward; with the direction's
    ``simpo_pairs: all`` (``cfg.side(direction)``), every ordered pair of the group's distinct samples
    (``losses.ordered_pairs``), each group weight 1."""

    name = "simpo"
    iterations_field = None

    def prepare(
        self, policy: Any, rollout: Rollout, cfg: TrainConfig, reference: Any, seeds: list[int]
    ) -> tuple[Batch | None, dict]:
        best, worst, valid = losses.best_worst(rollout.rewards, rollout.group_size)
        metrics = rollout_metrics(rollout, best, worst, valid)
        pairs = cfg.side(rollout.direction).simpo_pairs
        gap = cfg.side(rollout.direction).simpo_min_gap
        eps = max(gap, 1e-6)  # rewards closer than this are ties
        if gap > 0:
            best, worst, valid = losses.best_worst(rollout.rewards, rollout.group_size, eps=eps)
            metrics[f"{rollout.direction}/groups_within_gap"] = float((~valid).sum().item())
        if pairs == "best-likeliest":
            likelihood = sampled_mean_logp(rollout.samples)
            best, worst, valid = losses.best_likeliest(rollout.rewards, rollout.group_size, likelihood, eps=eps)
            share, ranked = _share_equal(rollout.rewards, worst, valid)
            metrics[f"{rollout.direction}/rejected_is_worst"] = share
            metrics[f"{rollout.direction}/groups_ranked"] = ranked
        tokens = target_tokens(rollout.samples)
        same = (tokens[best] == tokens[worst]).all(-1).to(valid.device)
        keep = valid & ~same
        metrics[f"{rollout.direction}/groups_identical"] = float((valid & same).sum().item())
        if pairs == "all":  # gated on its own pairs: repeated samples count once, so best vs worst cannot tell
            batch = self._all_pairs(rollout, tokens, seeds, eps)
            if batch.count == 0:
                return None, metrics
            metrics[f"{rollout.direction}/pairs_per_group"] = len(batch.pairs[0]) / batch.count
            metrics[f"{rollout.direction}/groups_paired"] = float(batch.count)
        elif not keep.any():
            return None, metrics
        else:
            rows = torch.cat([best[keep], worst[keep]])
            samples = rollout.samples.select(rows)
            batch = Batch(rollout.direction, samples, count=int(keep.sum()), tokens=_count_tokens(samples), seeds=seeds)
        if cfg.simpo_kl_beta > 0:
            batch.ref_logps = [_no_grad_logps(reference, rollout.direction, batch.samples, cfg, seeds[0])]
        return batch, metrics

    @staticmethod
    def _all_pairs(rollout: Rollout, tokens: torch.Tensor, seeds: list[int], eps: float) -> Batch:
        """The samples in any pair, each scored once, and the pairs as positions among them."""
        chosen, rejected, weights, groups = losses.ordered_pairs(
            rollout.rewards, rollout.group_size, tokens.cpu(), eps=eps
        )
        rows = torch.unique(torch.cat([chosen, rejected]))  # sorted
        where = torch.full((len(rollout.rewards),), -1, dtype=torch.long)
        where[rows] = torch.arange(len(rows))
        samples = rollout.samples.select(rows)
        batch = Batch(
            rollout.direction, samples, count=len(torch.unique(groups)), tokens=_count_tokens(samples), seeds=seeds
        )
        batch.pairs = (where[chosen], where[rejected], weights)
        return batch

    def loss(self, policy: Any, batch: Batch, cfg: TrainConfig, normalizer: dict[str, float], iteration: int):
        lp = policy_logps(policy, batch.direction, batch.samples, cfg, batch.seeds[0])
        mean = lp.mean()
        P = batch.count
        if batch.pairs is None:
            chosen, rejected, weights = mean[:P], mean[P:], None
        else:
            c_idx, r_idx, weights = (t.to(mean.device) for t in batch.pairs)
            chosen, rejected = mean[c_idx], mean[r_idx]
        loss, metrics = losses.simpo_loss(
            chosen,
            rejected,
            beta=cfg.simpo_beta,
            gamma=cfg.simpo_gamma,
            normalizer=normalizer["count"],
            weights=weights,
            nll_weight=cfg.simpo_nll_weight,
        )
        metrics["logp_estimate"] = float(lp.estimate)
        if batch.ref_logps is not None:
            ref = batch.ref_logps[0].to(lp.values.device)
            kl, kl_metrics = losses.kl_penalty(lp.values, ref, lp.mask, normalizer=normalizer["tokens"])
            loss = loss + cfg.simpo_kl_beta * kl
            metrics.update(kl_metrics)
        return loss, metrics


class GRPO:
    """GRPO with group-normalised advantages (SUDER eqs. 5-7), DAPO clip-higher and token-level loss."""

    name = "grpo"

    def prepare(
        self, policy: Any, rollout: Rollout, cfg: TrainConfig, reference: Any, seeds: list[int]
    ) -> tuple[Batch | None, dict]:
        advantages, valid = losses.group_advantages(rollout.rewards, rollout.group_size)
        best, worst, _ = losses.best_worst(rollout.rewards, rollout.group_size)
        metrics = rollout_metrics(rollout, best, worst, valid)
        if not valid.any():
            return None, metrics
        rows = torch.arange(len(rollout.rewards)).view(-1, rollout.group_size)[valid].flatten()
        samples = rollout.samples.select(rows)
        batch = Batch(rollout.direction, samples, count=len(rows), tokens=_count_tokens(samples), seeds=seeds)
        batch.advantages = advantages[rows].detach()
        # old log-probs before any update; with re-masking (Show-o), one per inner iteration's mask (diffu-GRPO)
        per_iteration = seeds if _remasks(cfg) and rollout.direction == "gen" else seeds[:1]
        with torch.no_grad():
            old = [policy_logps(policy, rollout.direction, samples, cfg, s) for s in per_iteration]
        batch.old_logps = [lp.values.detach() for lp in old]
        metrics.update(logp_drift(rollout.direction, samples, old[0], cfg))
        if cfg.grpo_beta > 0:  # the reference under each iteration's seed too: the KL compares like with like
            batch.ref_logps = [_no_grad_logps(reference, rollout.direction, samples, cfg, s) for s in per_iteration]
        return batch, metrics

    def loss(self, policy: Any, batch: Batch, cfg: TrainConfig, normalizer: dict[str, float], iteration: int):
        k = iteration if len(batch.old_logps) > 1 else 0
        lp = policy_logps(policy, batch.direction, batch.samples, cfg, batch.seeds[k])
        adv = batch.advantages.to(lp.values.device)
        loss, metrics = losses.grpo_loss(
            lp.values,
            batch.old_logps[k].to(lp.values.device),
            adv,
            lp.mask,
            ref_logps=None if batch.ref_logps is None else batch.ref_logps[k].to(lp.values.device),
            eps_low=cfg.grpo_eps_low,
            eps_high=cfg.grpo_eps_high,
            beta=cfg.grpo_beta,
            normalizer=normalizer["tokens"],
        )
        metrics["logp_estimate"] = float(lp.estimate)
        # written as "not <=" so that a NaN deviation fails too
        if iteration == 0 and not metrics["grpo/ratio_max_abs_dev"] <= cfg.ratio_tolerance:
            raise TrainingError(
                f"GRPO importance ratio is not 1 at the first inner step ({batch.direction}: max |ratio - 1| = "
                f"{metrics['grpo/ratio_max_abs_dev']:.2e} > {cfg.ratio_tolerance}); the policy's log-probs are "
                "not reproducible (dropout on? nondeterministic kernels? different scoring path?)."
            )
        return loss, metrics


ALGORITHMS: dict[str, Any] = {"simpo": SimPO(), "grpo": GRPO()}


def _no_grad_logps(
    model: Any, direction: Direction, samples: Any, cfg: TrainConfig, seed: int | None = None
) -> torch.Tensor:
    if model is None:
        raise TrainingError("A reference model is needed (KL or consensus) but none was built.")
    with torch.no_grad():
        return policy_logps(model, direction, samples, cfg, seed).values.detach()


def _count_tokens(samples: ImageSamples | TextSamples) -> int:
    if isinstance(samples, ImageSamples):
        return int(samples.tokens.numel())
    return int(samples.mask.sum().item())
