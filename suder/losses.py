"""Losses and advantages for SUDER: pure tensor functions returning ``(loss, metrics)``.

SUDER ("Reinforcing Multimodal Understanding and Generation with Dual Self-rewards", arXiv 2506.07963)
section 3.3 trains a unified
model on its own samples, rewarded by the dual self-rewards of section 3.2, with one of two objectives:

- **Online SimPO** (SUDER eq. 4; Meng et al. 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward"): per input, the highest- and lowest-reward sample of a group form one pair
  (:func:`best_worst`, :func:`simpo_loss`).
- **GRPO** (SUDER eqs. 5-7; Shao et al. 2024, DeepSeekMath) with DAPO's clip-higher and token-level
  loss (Yu et al. 2025, "DAPO"): group-normalised advantages (:func:`group_advantages`, eq. 5), a
  per-token importance ratio (eq. 6) and the clipped surrogate with a KL penalty to the reference
  policy (:func:`grpo_loss`, eq. 7), using the k3 estimator (:func:`k3_kl`; Schulman 2020,
  "Approximating KL Divergence", as in DeepSeekMath eq. 4).

Defaults are the paper's appendix A.1: SimPO beta 2.0, gamma 0.5; GRPO eps_low 0.2, eps_high 0.28, beta 0.04.

Every loss is ``sum over items / normalizer``. The normalizer defaults to this call's own count (pairs or
real tokens) and the trainer passes the count of the whole accumulated batch instead, so that summing the
losses of the micro-batches gives exactly the loss (and gradient) of one big batch.

Where the code departs from the paper, or fixes what the paper leaves open:

- eq. 5 does not say which standard deviation; we use the population std (``unbiased=False``): a group's
  advantages then have exactly mean 0 and variance 1, independent of G. TRL's ``GRPOTrainer`` uses the
  unbiased std plus 1e-4, which scales every advantage by sqrt((G-1)/G) (0.935 at G=8).
- Groups whose rewards are all equal (max - min <= eps) get advantage exactly 0 and are flagged invalid, and
  the valid groups are divided by their std with no epsilon (their std is > 0). The caller drops invalid
  groups (DAPO's dynamic sampling filter) and counts them; SimPO skips them too, as a pair of equal
  reward carries no preference.
- eq. 4's gamma is the absolute margin inside the sigmoid, ``-log sigmoid(beta * (c - r) - gamma)``, as in
  TRL's ``CPOTrainer`` (``simpo_gamma``), on which the paper builds (A.1). The SimPO reference code takes
  ``gamma_beta_ratio`` instead; with the paper's beta 2.0, gamma 0.5 means a ratio of 0.25.
- No behaviour-cloning (NLL) term on the chosen output: TRL's ``CPOConfig`` adds ``cpo_alpha * NLL`` by
  default (CPO-SimPO); eq. 4 has no such term.
- :func:`kl_penalty` (an optional k3 KL guard for SimPO) is not in the paper.
- :func:`ordered_pairs` (every ordered pair of a group's distinct samples instead of best vs worst, each group
  weight 1; ``simpo_gen_pairs`` / ``simpo_und_pairs: all``) is not in the paper.
- GRPO maths is done in at least float32 (bf16 log-probs are upcast) so that a ratio of exactly 1 stays 1.
- ``advantages``, ``old_logps`` and ``ref_logps`` are detached: in eq. 7 they are constants, and a
  gradient leaking through them would silently change the objective.
- Padding (``mask == 0``) is replaced by 0 before any arithmetic, so non-finite values there (``-inf``
  log-probs of padding) neither reach the loss nor produce NaN gradients.
- Metrics of an empty call (no pairs, no real tokens) are 0.0 rather than NaN; ``simpo/pairs``, ``grpo/tokens``
  and ``kl/tokens`` say how much was seen, and the trainer weighs each call's means by them (an empty call
  counts for nothing; ``suder.distributed.StepMetrics``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "best_likeliest",
    "best_worst",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "kl_penalty",
    "ordered_pairs",
    "simpo_loss",
]


# ------------------------------------------------------------------------------------------ groups
def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(B*G,) input-major rewards -> (B, G); checks the layout and that every reward is finite."""
    assert rewards.dim() == 1, f"rewards must be (B*G,), got shape {tuple(rewards.shape)}"
    assert group_size >= 1, f"group_size must be >= 1, got {group_size}"
    assert rewards.numel() % group_size == 0, (
        f"rewards has {rewards.numel()} rows, not a multiple of group_size={group_size}"
    )
    finite = torch.isfinite(rewards)
    assert bool(finite.all()), f"non-finite rewards at rows {(~finite).nonzero().flatten().tolist()}"
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, scale: bool = True
) -> tuple[Tensor, Tensor]:
    """Group-normalised advantages, SUDER eq. 5 (GRPO outcome supervision, Shao et al. 2024 section 4.1.2).

    ``A_i = (r_i - mean(r_group)) / std(r_group)`` with the population std (``unbiased=False``, see the
    module docstring); every token of output i gets the same ``A_i`` (done by :func:`grpo_loss`).

    Args:
        rewards: (B*G,) input-major: rows ``b*G .. b*G+G-1`` are the G samples of input b.
        group_size: G.
        eps: a group whose ``max - min <= eps`` has no signal: its advantages are exactly 0, valid False.
        scale: False -> only centred (``r - mean``), e.g. Dr. GRPO's unscaled advantage.

    Returns:
        advantages (B*G,) in the reward's floating dtype, and valid (B,) bool.
    """
    grouped = _grouped(rewards, group_size)
    if not grouped.is_floating_point():
        grouped = grouped.float()
    valid = (grouped.max(-1).values - grouped.min(-1).values) > eps
    adv = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        # Valid groups have std >= (max - min) / sqrt(2G) > 0; the clamp only guards the invalid rows,
        # which are zeroed below anyway.
        std = grouped.std(-1, correction=0, keepdim=True)
        adv = adv / std.clamp_min(torch.finfo(adv.dtype).tiny)
    adv = torch.where(valid[:, None], adv, torch.zeros_like(adv))
    return adv.reshape(-1), valid


def best_worst(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Highest- and lowest-reward sample of each group: the online SimPO pair of SUDER eq. 4.

    Args:
        rewards: (B*G,) input-major groups, as in :func:`group_advantages`.
        group_size: G.
        eps: a group whose ``max - min <= eps`` is not valid (the caller skips and counts it).

    Returns:
        best_idx (B,), worst_idx (B,) long: GLOBAL row indices into ``rewards`` (``b*G + j``); ties go to the
        lowest index (first occurrence). valid (B,) bool.
    """
    grouped = _grouped(rewards, group_size)
    offset = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    # torch.argmax/argmin return the first occurrence of the extreme value (documented since torch 1.7).
    best = grouped.argmax(-1) + offset
    worst = grouped.argmin(-1) + offset
    valid = (grouped.max(-1).values - grouped.min(-1).values) > eps
    return best, worst, valid


def best_likeliest(
    rewards: Tensor, group_size: int, likelihood: Tensor, *, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Highest-reward sample of each group against the likeliest of the samples it beats: the
    ``simpo_*_pairs: best-likeliest`` variant of SUDER eq. 4's best-vs-worst pair (not in the paper).

    The worst sample is usually one the policy rarely draws, so its SimPO term is near saturation and pushing
    it down changes little of what the policy outputs. The likeliest lower-reward sample is the policy's own
    mode whenever the reward disagrees with it (e.g. a captioner's habitual wrong caption, which greedy
    decoding returns): a hard negative, where the logistic loss puts its gradient.

    Args:
        rewards: (B*G,) input-major groups.
        group_size: G.
        likelihood: (B*G,) how likely the policy finds each sample (the trainer passes the sampler's mean
            per-token log-prob, ``.logps`` over real tokens); only its order within a group matters.
        eps: a sample within ``eps`` of the best reward is a tie, never the rejected one.

    Returns:
        best_idx (B,), rejected_idx (B,) long: GLOBAL row indices (ties to the lowest index); valid (B,) bool:
        the group has a sample below the best (``max - min > eps``, as :func:`best_worst`).
    """
    grouped = _grouped(rewards, group_size)
    assert likelihood.shape == rewards.shape, (
        f"likelihood must be (B*G,) like rewards, got {tuple(likelihood.shape)} and {tuple(rewards.shape)}"
    )
    offset = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    top = grouped.max(-1, keepdim=True).values
    below = grouped < top - eps
    lik = likelihood.to(grouped.device).float().view(-1, group_size).masked_fill(~below, float("-inf"))
    best = grouped.argmax(-1) + offset
    rejected = lik.argmax(-1) + offset
    return best, rejected, below.any(-1)


def ordered_pairs(
    rewards: Tensor, group_size: int, tokens: Tensor, *, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every ordered pair of distinct samples of a group whose rewards differ: the ``simpo_*_pairs: all`` variant
    of SUDER eq. 4's best-vs-worst pair (a listwise preference loss over the group's ranking).

    Best vs worst is the group's easiest pair: the two the policy already separates most, so its SimPO term is
    often near saturation. All pairs also contrast the close calls (two near-identical captions, one right, one
    wrong), where the logistic loss puts its gradient. Each group keeps weight 1: its pairs share it equally.

    Args:
        rewards: (B*G,) input-major groups.
        group_size: G.
        tokens: (B*G, L) ids identifying a sample; repeated samples of a group count once (first occurrence).
        eps: rewards closer than this are a tie, not a pair.

    Returns:
        chosen (P,), rejected (P,) long: GLOBAL row indices (higher and lower reward); weights (P,) float, 1 over
        the pair count of the pair's group; groups (P,) long: the pair's group.
    """
    grouped = _grouped(rewards.detach().float().cpu(), group_size)
    tokens = tokens.cpu()
    chosen, rejected, weights, groups = [], [], [], []
    for b in range(grouped.shape[0]):
        seen: dict[tuple, int] = {}
        for j in range(group_size):
            seen.setdefault(tuple(tokens[b * group_size + j].tolist()), j)
        idx = torch.tensor(sorted(seen.values()), dtype=torch.long)
        r = grouped[b, idx]
        wins = (r[:, None] - r[None, :]) > eps  # wins[i, k]: sample i beats sample k
        ci, ri = wins.nonzero(as_tuple=True)
        if len(ci):
            chosen.append(b * group_size + idx[ci])
            rejected.append(b * group_size + idx[ri])
            weights.append(torch.full((len(ci),), 1.0 / len(ci)))
            groups.append(torch.full((len(ci),), b, dtype=torch.long))
    if not chosen:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0), empty
    return torch.cat(chosen), torch.cat(rejected), torch.cat(weights), torch.cat(groups)


# ------------------------------------------------------------------------------------------ SimPO
def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    normalizer: float | None = None,
    weights: Tensor | None = None,
    nll_weight: float = 0.0,
) -> tuple[Tensor, dict]:
    """Online SimPO loss, SUDER eq. 4 (Meng et al. 2024, eq. 6).

    ``loss = sum_p -log sigmoid(beta * (c_p - r_p) - gamma) / normalizer``, where
    ``c_p = log pi(y_w|x) / |y_w|`` is the length-normalised log-prob of the chosen (best-reward) output
    and ``r_p`` the same for the rejected (worst-reward) one: SimPO's implicit reward is
    ``beta/|y| log pi(y|x)``.

    Args:
        chosen_logps: (P,) per-token mean log-probs of the chosen outputs.
        rejected_logps: (P,) the same for the rejected outputs.
        beta: reward scale (paper A.1: 2.0).
        gamma: target reward margin, absolute (paper A.1: 0.5; see the module docstring).
        normalizer: divisor of the summed loss; default P. Pass the pair count of the whole accumulated
            batch so that micro-batch losses add up to the full-batch loss. P == 0 gives a zero loss that
            still requires grad when the inputs do.
        weights: (P,) optional weight of each pair's term (:func:`ordered_pairs` gives each group weight 1).
        nll_weight: ``lambda`` of an added likelihood term on the chosen outputs, ``lambda * sum_p -c_p``
            (weighted and normalised like the SimPO terms; CPO's NLL term, Xu et al. 2024). 0: plain SimPO.

    Returns:
        loss (scalar), metrics: ``simpo/margin`` (mean beta*(c-r)), ``simpo/accuracy`` (fraction c > r),
        ``simpo/chosen_logp``, ``simpo/rejected_logp`` (means), ``simpo/pairs`` (P).
    """
    assert chosen_logps.dim() == 1 and chosen_logps.shape == rejected_logps.shape, (
        f"chosen/rejected must both be (P,), got {tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}"
    )
    P = chosen_logps.shape[0]
    norm = float(max(P, 1) if normalizer is None else normalizer)
    assert norm > 0, f"normalizer must be > 0, got {normalizer}"
    margin = beta * (chosen_logps - rejected_logps)
    terms = -F.logsigmoid(margin - gamma)
    if nll_weight:
        terms = terms - nll_weight * chosen_logps
    loss = (terms if weights is None else terms * weights.to(terms.dtype)).sum() / norm
    with torch.no_grad():
        metrics = {
            "simpo/margin": _mean(margin),
            "simpo/accuracy": _mean((chosen_logps > rejected_logps).float()),
            "simpo/chosen_logp": _mean(chosen_logps),
            "simpo/rejected_logp": _mean(rejected_logps),
            "simpo/pairs": float(P),
        }
        if nll_weight:
            metrics["simpo/nll"] = _mean(-chosen_logps)
    return loss, metrics


# ------------------------------------------------------------------------------------------ KL, GRPO
def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020; DeepSeekMath eq. 4; SUDER eq. 7's D_KL).

    ``k3 = pi_ref/pi - log(pi_ref/pi) - 1 = exp(d) - d - 1`` with ``d = ref_logps - logps``, on tokens sampled
    from pi: unbiased for KL(pi || pi_ref), and >= 0 because exp(d) >= 1 + d. Computed as ``expm1(d) - d``,
    which keeps its precision when d is tiny.

    Args:
        logps, ref_logps: any shape (usually (B, T)), the same for both.

    Returns:
        k3 with that shape; elementwise, no masking.
    """
    assert logps.shape == ref_logps.shape, (
        f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} must have the same shape"
    )
    d = ref_logps - logps
    return torch.expm1(d) - d


def _check_tokens(mask: Tensor, **tensors: Tensor | None) -> Tensor:
    """Checks (B, T) shapes and a 0/1 mask; returns the mask as bool."""
    assert mask.dim() == 2, f"mask must be (B, T), got shape {tuple(mask.shape)}"
    for name, t in tensors.items():
        assert t is None or t.shape == mask.shape, (
            f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}"
        )
    if mask.dtype != torch.bool:
        assert bool(((mask == 0) | (mask == 1)).all()), f"mask must be 0/1, got values {mask.unique().tolist()}"
    return mask.bool()


def _real(x: Tensor, real: Tensor, dtype: torch.dtype) -> Tensor:
    """Upcast and zero the padding, so that non-finite padding never reaches the arithmetic (or its grad)."""
    return x.to(dtype).masked_fill(~real, 0.0)


def _mean(x: Tensor) -> float:
    return x.detach().float().mean().item() if x.numel() else 0.0


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta: float = 0.04,
    normalizer: float | None = None,
) -> tuple[Tensor, dict]:
    """GRPO with DAPO clip-higher and token-level loss, SUDER eqs. 5-7 (Yu et al. 2025, sections 3.1, 3.3).

    Per real token t of output i, with ``ratio = exp(logps - old_logps)`` (eq. 6):
    ``l_it = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3(logps, ref_logps)``
    and ``loss = sum_{i,t real} l_it / normalizer`` (DAPO's token-level loss: every token weighs the same,
    whatever its output's length). The KL term is dropped when ``ref_logps`` is None or ``beta == 0``.

    Args:
        logps: (B, T) per-token log-probs under the policy being trained (carries the gradient).
        old_logps: (B, T) the same under the sampling ("old") policy; detached.
        advantages: (B,) from :func:`group_advantages`, broadcast over tokens (eq. 5); detached.
        mask: (B, T) 1/True for real output tokens, 0/False for padding.
        ref_logps: (B, T) under the reference policy, or None; detached.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (paper A.1: 0.2, 0.28).
        beta: KL coefficient (paper A.1: 0.04).
        normalizer: divisor of the summed token losses; default ``mask.sum()`` (at least 1). The trainer
            passes the real-token count of the whole accumulated batch.

    Returns:
        loss (scalar), metrics over real tokens: ``grpo/clip_low_frac`` (ratio < 1 - eps_low with A < 0: the
        lower clip is active), ``grpo/clip_high_frac`` (ratio > 1 + eps_high with A > 0), ``grpo/clip_frac``
        (either), ``grpo/ratio_mean``, ``grpo/ratio_max_abs_dev`` (max |ratio - 1|), ``grpo/kl`` (mean k3;
        0 without a reference), ``grpo/tokens``.
    """
    real = _check_tokens(mask, logps=logps, old_logps=old_logps, ref_logps=ref_logps)
    assert advantages.shape == (mask.shape[0],), (
        f"advantages must be (B,) = ({mask.shape[0]},), got {tuple(advantages.shape)}"
    )
    assert eps_low >= 0 and eps_high >= 0, f"clip epsilons must be >= 0, got eps_low={eps_low}, eps_high={eps_high}"
    dtype = torch.promote_types(logps.dtype, torch.float32)
    m = real.to(dtype)
    tokens = m.sum()
    norm = tokens.clamp_min(1.0) if normalizer is None else float(normalizer)
    assert normalizer is None or norm > 0, f"normalizer must be > 0, got {normalizer}"

    lp = _real(logps, real, dtype)
    old = _real(old_logps.detach(), real, dtype)
    adv = advantages.detach().to(dtype)[:, None]  # (B, 1): the same advantage for every token (eq. 5)
    ratio = torch.exp(lp - old)  # eq. 6
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)  # eq. 7
    per_token = -surrogate
    kl = None
    if ref_logps is not None and beta != 0:
        kl = k3_kl(lp, _real(ref_logps.detach(), real, dtype))
        per_token = per_token + beta * kl
    loss = (per_token * m).sum() / norm

    with torch.no_grad():
        n = float(tokens.item())
        r = ratio.detach()
        low = (r < 1.0 - eps_low) & (adv < 0) & real
        high = (r > 1.0 + eps_high) & (adv > 0) & real
        frac = (lambda x: float(x.sum().item()) / n) if n else (lambda x: 0.0)
        metrics = {
            "grpo/clip_low_frac": frac(low),
            "grpo/clip_high_frac": frac(high),
            "grpo/clip_frac": frac(low | high),
            "grpo/ratio_mean": frac(r * m),
            "grpo/ratio_max_abs_dev": float(((r - 1).abs() * m).max().item()) if n else 0.0,
            "grpo/kl": frac(kl.detach() * m) if kl is not None else 0.0,
            "grpo/tokens": n,
        }
    return loss, metrics


def kl_penalty(
    logps: Tensor, ref_logps: Tensor, mask: Tensor, *, normalizer: float | None = None
) -> tuple[Tensor, dict]:
    """Token-level mean k3 KL(pi || pi_ref) over real tokens: the optional SimPO KL guard (not in SUDER).

    The same estimator and aggregation as the KL term of SUDER eq. 7 (:func:`k3_kl`, DAPO token-level
    mean); the caller multiplies by its coefficient (``simpo_kl_beta``).

    Args:
        logps: (B, T) per-token log-probs under the policy (carries the gradient).
        ref_logps: (B, T) under the reference policy; detached.
        mask: (B, T) 1/True for real tokens.
        normalizer: divisor of ``sum(k3 * mask)``; default ``mask.sum()`` (at least 1).

    Returns:
        loss (scalar), metrics: ``kl/mean`` (mean k3 over this call's real tokens), ``kl/tokens``.
    """
    real = _check_tokens(mask, logps=logps, ref_logps=ref_logps)
    dtype = torch.promote_types(logps.dtype, torch.float32)
    m = real.to(dtype)
    tokens = m.sum()
    norm = tokens.clamp_min(1.0) if normalizer is None else float(normalizer)
    assert normalizer is None or norm > 0, f"normalizer must be > 0, got {normalizer}"
    kl = k3_kl(_real(logps, real, dtype), _real(ref_logps.detach(), real, dtype))
    loss = (kl * m).sum() / norm
    n = float(tokens.item())
    return loss, {"kl/mean": float((kl.detach() * m).sum().item()) / n if n else 0.0, "kl/tokens": n}
