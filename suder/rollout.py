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

import warnings
from collections.abc import Callable
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
def sample_group(
    model: Any,
    direction: Direction,
    inputs: list[Any],
    cfg: TrainConfig,
    generator: torch.Generator,
    chunks: Chunks | None = None,
):
    """Sample the direction's group size (``cfg.side(direction).group_size``) outputs per input (no grad), in
    calls of at most ``chunks.size`` rows (``Chunks``; default ``cfg.rollout_chunk_size``).

    Backbones that take per-row generators (``row_generators = True``) get one per sample, seeded from
    ``generator`` and the sample's row (``row_generators``), so the samples do not depend on the chunk size;
    others get ``generator`` itself, which each chunk's call draws from in turn."""
    size = group_size(cfg, direction)
    chunked = Chunked(model, chunks or Chunks(cfg.rollout_chunk_size), collective=True)
    per_row = takes_row_generators(model)

    def streams(rows: int, salt: int) -> Any:
        return row_generators(generator, rows, salt) if per_row else generator

    n = len(inputs)
    if direction == "gen":
        return chunked.sample_image(
            inputs,
            num_samples=size,
            generator=streams(n * size, 0),
            guidance_scale=cfg.guidance_scale,
            temperature=cfg.image_temperature,
        )
    if cfg.text_greedy_in_group and size > 1:
        # the captioner's mode, which greedy captioning (evaluation, users) returns, is ranked with the samples
        sampled = chunked.sample_text(
            inputs, num_samples=size - 1, generator=streams(n * (size - 1), 1), temperature=cfg.text_temperature
        )
        greedy = chunked.sample_text(inputs, num_samples=1, generator=streams(n, 2), temperature=0.0)
        return join_groups(greedy, sampled)
    return chunked.sample_text(inputs, num_samples=size, generator=streams(n * size, 1),
                               temperature=cfg.text_temperature)


def takes_row_generators(model: Any) -> bool:
    """Whether ``model`` (a backbone, or an ``Engine`` or ``Reference`` holding one) samples with one generator
    per row (its class sets ``row_generators = True``; ``suder.sampling.Generators``)."""
    for holder in (model, getattr(model, "backbone", None), getattr(model, "model", None)):
        if holder is not None and getattr(type(holder), "row_generators", False) is True:
            return True
    return False


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


# ------------------------------------------------------------------------------------------ chunks
class Chunks:
    """How many rows one sampling or no-grad log-prob call takes (``rollout_chunk_size``), and the back-off.

    ``setting``: ``"auto"`` (the whole group: on CPU it stays so; on CUDA an out-of-memory error halves it) or a
    number of rows to start from. On ``torch.OutOfMemoryError`` inside a call the chunk halves, the cache is
    emptied and the pass is retried; the size is kept for the rest of the run (``size``, logged as the
    ``rollout/chunk_size`` metric) and each halving is reported once, as a ``ChunkSizeWarning``. Sampling passes
    (every process runs them, in the same order) end with an all-reduce of "did any process run out of memory"
    and of the sizes, so that every process retries together and keeps the same size: no process is left
    waiting in a collective for one that is retrying (the processes that ran out of memory warn). Log-prob
    passes (a process may run more or fewer of them) back off on their own process; the next sampling pass
    brings every process to the smallest size.
    """

    def __init__(self, setting: int | str = "auto"):
        self.size: int | None = None if setting == "auto" else int(setting)  # None: the whole group
        self.widest = 0  # the most rows a pass has run in one call

    def run(self, rows: int, call: Callable[[int], Any], *, collective: bool = False) -> Any:
        """``call(size)`` with ``size`` = the chunk size (at most ``rows``), halved and retried on OOM."""
        while True:
            size = max(1, min(self.size or rows, rows))
            result, failed = None, False
            try:
                result = call(size)
            except torch.OutOfMemoryError:
                failed = True
            if failed:  # outside the handler: the error's frames (and their tensors) are gone by now
                _free_memory()
            mine = failed  # this process ran out of memory: it says so; the others follow its halving
            if collective:
                failed, size = _agree(failed, size)
            if not failed:
                if collective and size < min(self.size or rows, rows):  # another process backed off further
                    self.size = size
                self.widest = max(self.widest, size)
                return result
            if size <= 1:
                raise TrainingError(
                    "Out of memory with one sample per call; make the step smaller: check the memory plan "
                    "(docs/performance.md), train LoRA adapters, or lower group_size or batch_size."
                )
            self.size = size // 2
            if mine:
                warnings.warn(
                    f"Out of memory with {size} rows per call; retrying with {self.size} (rollout_chunk_size) "
                    "and keeping it for the rest of the run.",
                    ChunkSizeWarning,
                    stacklevel=2,
                )

    def metrics(self) -> dict[str, float]:
        """``rollout/chunk_size``: the most rows a call may take now (the size in force; while the whole group
        fits, the widest pass so far)."""
        limit = self.size if self.size is not None else self.widest
        return {"rollout/chunk_size": float(limit)} if limit else {}


class ChunkSizeWarning(UserWarning):
    """An out-of-memory error halved ``rollout_chunk_size`` (``Chunks``)."""


def _free_memory() -> None:
    """Let go of what the failed call allocated before the retry (the cached blocks of the CUDA allocator)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _agree(failed: bool, size: int) -> tuple[bool, int]:
    """Over every process: whether any failed, and the smallest size (one all-reduce; alone: the arguments)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failed, size
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    both = torch.tensor([float(failed), -float(size)], device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(both[0] > 0), int(-both[1])


def _pieces(inputs: int, per_input: int, size: int) -> list[tuple[int, int, int, int]]:
    """Calls of at most ``size`` rows over ``inputs`` x ``per_input`` rows, input-major: whole inputs when a group
    fits (``(i0, i1, 0, G)``), else slices of one input's samples (``(i, i + 1, j0, j1)``)."""
    if size >= per_input:
        k = size // per_input
        return [(i, min(i + k, inputs), 0, per_input) for i in range(0, inputs, k)]
    return [(i, i + 1, j, min(j + size, per_input)) for i in range(inputs) for j in range(0, per_input, size)]


def _take(x: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of samples, a tensor or a list."""
    if isinstance(x, (ImageSamples, TextSamples)):
        return x.select(list(range(start, stop)))
    return x[start:stop]


def _pad_cat(parts: list[torch.Tensor], value: Any) -> torch.Tensor:
    """(n_i, T_i) tensors right-padded with ``value`` to the widest, stacked: (sum n_i, max T_i)."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


def _cat_images(parts: list[Any]) -> Any:
    """The conditioning images of several calls, in order: lists joined, tensors stacked, samples merged."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], ImageSamples):
        return merge_samples(parts, num_samples=1)
    return [x for p in parts for x in p]


def merge_samples(parts: list[Any], num_samples: int) -> Any:
    """Consecutive calls' ``ImageSamples``, ``TextSamples`` or ``TokenLogProbs`` as one (rows in order).
    Captions are right-padded to the widest part with the padding token the parts use (0 if none shows it)."""
    first = parts[0]
    if len(parts) == 1 and getattr(first, "num_samples", num_samples) == num_samples:
        return first
    if isinstance(first, TokenLogProbs):
        return TokenLogProbs(_pad_cat([p.values for p in parts], 0.0), _pad_cat([p.mask for p in parts], False),
                             estimate=first.estimate)
    if isinstance(first, ImageSamples):
        images = [p._images for p in parts]
        return ImageSamples(
            prompts=[x for p in parts for x in p.prompts],
            tokens=torch.cat([p.tokens for p in parts]),
            logps=torch.cat([p.logps for p in parts]),
            num_samples=num_samples,
            guidance_scale=first.guidance_scale,
            temperature=first.temperature,
            decode=first.decode,
            _images=None if any(i is None for i in images) else [x for i in images for x in i],
        )
    pads = [p.tokens[~p.mask] for p in parts if (~p.mask).any()]
    pad = int(pads[0][0]) if pads else 0
    return TextSamples(
        texts=[x for p in parts for x in p.texts],
        tokens=_pad_cat([p.tokens for p in parts], pad),
        logps=_pad_cat([p.logps for p in parts], 0.0),
        mask=_pad_cat([p.mask for p in parts], False),
        images=_cat_images([p.images for p in parts]),
        num_samples=num_samples,
        temperature=first.temperature,
    )


class Chunked:
    """``model``'s four ``UnifiedLMM`` calls, each split into calls of at most ``chunks.size`` rows and merged
    (``merge_samples``); anything else is ``model``'s own. An ``Engine`` runs all of a pass's chunks inside
    one call of its wrapped module (``Engine.call``), so that every process makes the same engine calls
    however many chunks its rows take.

    With per-row generators (``sample_group``) a chunk's samples are the whole group's; what a chunk computes
    is otherwise the same function of the same rows, but CPU and CUDA matrix kernels may round a row differently
    in batches of different sizes, so sampled and scored log-probs agree to float rounding (tokens exactly):
    ``docs/performance.md``. A perturbed image estimator (Show-o's ``remask_seed``) draws its noise for the call
    as a whole, so such a pass is not split.
    """

    def __init__(self, model: Any, chunks: Chunks, *, collective: bool = False):
        self.model, self.chunks, self.collective = model, chunks, collective

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "chunks", "collective") or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.model, name)

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        call = getattr(self.model, "call", None)
        return call(fn) if callable(call) else fn(self.model)

    def _sample(self, method: str, inputs: Any, num_samples: int, generator: Any, options: dict) -> Any:
        count = len(inputs)
        streams = [g for g in (generator if isinstance(generator, (list, tuple)) else [generator]) if g is not None]
        states = [g.get_state() for g in streams]  # a retry starts every stream afresh

        def once(size: int) -> Any:
            for g, state in zip(streams, states, strict=True):
                g.set_state(state)

            def each(model: Any) -> Any:
                parts = []
                for i0, i1, j0, j1 in _pieces(count, num_samples, size):
                    rows = [b * num_samples + j for b in range(i0, i1) for j in range(j0, j1)]
                    gen = [generator[r] for r in rows] if isinstance(generator, (list, tuple)) else generator
                    parts.append(getattr(model, method)(_take(inputs, i0, i1), num_samples=j1 - j0,
                                                        generator=gen, **options))
                return merge_samples(parts, num_samples)

            return self._call(each)

        return self.chunks.run(count * num_samples, once, collective=self.collective)

    def sample_image(self, prompts: Any, *, num_samples: int = 1, generator: Any = None, **options: Any):
        return self._sample("sample_image", list(prompts), num_samples, generator, options)

    def sample_text(self, images: Any, *, num_samples: int = 1, generator: Any = None, **options: Any):
        return self._sample("sample_text", images, num_samples, generator, options)

    def _score(self, method: str, first: Any, second: Any, options: dict) -> TokenLogProbs:
        rows = len(first) if not isinstance(first, torch.Tensor) else first.shape[0]
        whole = "remask_seed" in options or "generator" in options  # noise drawn for the call as a whole

        def once(size: int) -> TokenLogProbs:
            size = rows if whole else size

            def each(model: Any) -> TokenLogProbs:
                parts = [getattr(model, method)(_take(first, a, min(a + size, rows)),
                                                _take(second, a, min(a + size, rows)), **options)
                         for a in range(0, rows, size)]
                return merge_samples(parts, 1)

            return self._call(each)

        return self.chunks.run(rows, once)

    def logp_image_given_text(self, images: Any, texts: Any, **options: Any) -> TokenLogProbs:
        return self._score("logp_image_given_text", images, texts, options)

    def logp_text_given_image(self, texts: Any, images: Any, **options: Any) -> TokenLogProbs:
        return self._score("logp_text_given_image", texts, images, options)


def row_generators(generator: torch.Generator | None, rows: int, salt: int = 0) -> list[torch.Generator]:
    """One generator per row, seeded by ``derive_seed(base, salt, row)`` where ``base`` is one number drawn from
    ``generator``: each sample's random stream depends on the step's generator and its row, not on the others
    in its call (``suder.sampling.Generators``)."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    device = generator.device if generator is not None else torch.device("cpu")
    return [torch.Generator(device=device).manual_seed(derive_seed(base, salt, r)) for r in range(rows)]
