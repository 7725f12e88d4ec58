"""suder.losses: hand-computed values (maths in each docstring), gradients, masking and grad accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from suder.losses import (
    best_likeliest,
    best_worst,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalty,
    ordered_pairs,
    simpo_loss,
)


def _t(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


# ------------------------------------------------------------------------------------------ SimPO
def test_simpo_hand_computed_two_pairs():
    """beta=2, gamma=0.5, pairs (c, r) = (-1.0, -2.0) and (-1.5, -1.0).

    z1 = 2 * (-1.0 + 2.0) - 0.5 = 1.5   -> -log sigmoid(1.5)  = log(1 + e^-1.5) = 0.201413
    z2 = 2 * (-1.5 + 1.0) - 0.5 = -1.5  -> -log sigmoid(-1.5) = log(1 + e^1.5)  = 1.701413
    loss = (0.201413 + 1.701413) / 2 = 0.951413
    margin = mean(2*1.0, 2*(-0.5)) = 0.5; accuracy = 1/2; chosen mean -1.25; rejected mean -1.5.
    """
    loss, m = simpo_loss(_t([-1.0, -1.5]), _t([-2.0, -1.0]), beta=2.0, gamma=0.5)
    expected = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(1.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.951413, abs=1e-6)
    assert m == pytest.approx(
        {
            "simpo/margin": 0.5,
            "simpo/accuracy": 0.5,
            "simpo/chosen_logp": -1.25,
            "simpo/rejected_logp": -1.5,
            "simpo/pairs": 2.0,
        }
    )
    assert all(type(v) is float for v in m.values())


def test_simpo_gradient_sign_and_value():
    """d/dc [-log sigmoid(beta*(c-r) - gamma)] / P = -beta * sigmoid(-z) / P < 0; +beta*sigmoid(-z)/P for r.

    Pair (c, r) = (-1, -2), beta=2, gamma=0.5, P=1: z = 1.5, dL/dc = -2 * sigmoid(-1.5) = -0.364851.
    So raising the chosen log-prob lowers the loss, raising the rejected one raises it.
    """
    c, r = _t([-1.0], grad=True), _t([-2.0], grad=True)
    loss, _ = simpo_loss(c, r)
    loss.backward()
    expected = -2.0 / (1 + math.exp(1.5))
    assert c.grad.item() == pytest.approx(expected, abs=1e-12) and expected < 0
    assert r.grad.item() == pytest.approx(-expected, abs=1e-12)
    # And the finite step agrees: a higher chosen log-prob gives a lower loss.
    assert simpo_loss(_t([-0.9]), _t([-2.0]))[0] < loss


def test_simpo_normalizer_makes_half_batches_sum_to_full_batch():
    """sum over pairs / 4 splits into (pairs 0-1)/4 + (pairs 2-3)/4: same loss and same gradient."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    r = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    full, _ = simpo_loss(c, r)
    (full_gc, full_gr) = torch.autograd.grad(full, (c, r))
    a, _ = simpo_loss(c[:2], r[:2], normalizer=4)
    b, _ = simpo_loss(c[2:], r[2:], normalizer=4)
    (gc, gr) = torch.autograd.grad(a + b, (c, r))
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(gc, full_gc)
    torch.testing.assert_close(gr, full_gr)
    # Without the shared normalizer each half is a mean of its own: the sum is twice the full loss.
    assert (simpo_loss(c[:2], r[:2])[0] + simpo_loss(c[2:], r[2:])[0]).item() == pytest.approx(
        2 * full.item()
    )


def test_simpo_empty_batch_is_zero_and_still_differentiable():
    """P = 0: sum of nothing = 0; backward must not fail (a rank may hold no pairs under DDP)."""
    c = torch.empty(0, requires_grad=True)
    loss, m = simpo_loss(c, torch.empty(0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert m["simpo/pairs"] == 0.0 and math.isfinite(m["simpo/margin"])


def test_simpo_rejects_mismatched_shapes_with_the_shapes():
    with pytest.raises(AssertionError, match=r"\(3,\).*\(2,\)"):
        simpo_loss(torch.zeros(3), torch.zeros(2))


# ------------------------------------------------------------------------------------------ groups
def test_group_advantages_worked_2x3_with_zero_variance_group():
    """Groups [1, 2, 3] and [5, 5, 5], G = 3.

    Group 0: mean 2, population variance ((1)^2 + 0 + (1)^2) / 3 = 2/3, std = sqrt(2/3);
    advantages (-1, 0, 1) / sqrt(2/3) = (-sqrt(3/2), 0, sqrt(3/2)) = (-1.224745, 0, 1.224745).
    (The unbiased std, 1, would give (-1, 0, 1): this pins the population std.)
    Group 1: max - min = 0 <= eps -> advantages exactly 0, valid False.
    """
    adv, valid = group_advantages(_t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    s = math.sqrt(1.5)
    torch.testing.assert_close(adv, _t([-s, 0.0, s, 0.0, 0.0, 0.0]))
    assert valid.tolist() == [True, False]
    assert adv.shape == (6,) and valid.shape == (2,) and valid.dtype == torch.bool
    assert (adv[3:] == 0).all()  # exactly, not approximately

    centred, valid2 = group_advantages(_t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, scale=False)
    torch.testing.assert_close(centred, _t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert valid2.tolist() == [True, False]


def test_group_advantages_eps_and_normalisation():
    """A spread of 1e-7 <= eps=1e-6 is no signal; a valid group's advantages have mean 0, pop. variance 1."""
    adv, valid = group_advantages(_t([0.3, 0.3 + 1e-7, 0.3, 0.3, 0.0, 4.0, 1.0, 7.0]), 4)
    assert valid.tolist() == [False, True]
    assert (adv[:4] == 0).all()
    assert adv[4:].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert adv[4:].pow(2).mean().item() == pytest.approx(1.0, abs=1e-12)


def test_group_advantages_rejects_bad_layout_and_nan():
    with pytest.raises(AssertionError, match="5 rows.*group_size=2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(AssertionError, match=r"rows \[1\]"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)


def test_best_worst_ties_and_global_indices():
    """G = 4, three groups:

    group 0 rows 0-3  [0.5, 0.9, 0.9, 0.1]: max 0.9 first at row 1; min at row 3; valid.
    group 1 rows 4-7  [0.3, 0.3, 0.7, 0.3]: max at row 6; min 0.3 first at row 4; valid.
    group 2 rows 8-11 [2, 2, 2, 2]: best = worst = row 8 (first), valid False.
    """
    rewards = _t([0.5, 0.9, 0.9, 0.1, 0.3, 0.3, 0.7, 0.3, 2.0, 2.0, 2.0, 2.0])
    best, worst, valid = best_worst(rewards, 4)
    assert best.tolist() == [1, 6, 8]
    assert worst.tolist() == [3, 4, 8]
    assert valid.tolist() == [True, True, False]
    assert (rewards[best] >= rewards.view(3, 4).max(-1).values).all()


def test_ordered_pairs_skip_ties_and_repeats_and_give_each_group_weight_one():
    """G = 4, three groups; tokens identify samples.

    group 0 rows 0-3 rewards [0.5, 0.9, 0.9, 0.1], rows 1 and 2 the same sample: distinct rows 0, 1, 3 ->
        pairs (1, 0), (1, 3), (0, 3), weight 1/3 each (row 2 is not paired again).
    group 1 rows 4-7 rewards [0.3, 0.3, 0.7, 0.3], all distinct: 4, 5 and 7 tie, so only 6 beats them ->
        pairs (6, 4), (6, 5), (6, 7), weight 1/3 each.
    group 2 rows 8-11: all rewards equal -> no pair.
    """
    rewards = _t([0.5, 0.9, 0.9, 0.1, 0.3, 0.3, 0.7, 0.3, 2.0, 2.0, 2.0, 2.0])
    tokens = torch.arange(12)[:, None].repeat(1, 3)
    tokens[2] = tokens[1]
    chosen, rejected, weights, groups = ordered_pairs(rewards, 4, tokens)
    pairs = sorted(zip(chosen.tolist(), rejected.tolist()))
    assert pairs == [(0, 3), (1, 0), (1, 3), (6, 4), (6, 5), (6, 7)]
    assert weights.tolist() == pytest.approx([1 / 3] * 6) and groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert (rewards[chosen] > rewards[rejected]).all()
    empty = ordered_pairs(_t([1.0, 1.0]), 2, torch.zeros(2, 1))
    assert all(len(t) == 0 for t in empty)


def test_best_likeliest_rejects_the_likeliest_sample_below_the_best():
    """G = 4, three groups; likelihood is the policy's mean per-token log-prob.

    group 0 rewards [0.5, 0.9, 0.9, 0.1], likelihood [-1, -3, -0.2, -2]: best row 1 (first of the tied best);
        row 2 is likeliest but ties the best, so the rejected is row 0 (-1 > -2), not the worst row 3.
    group 1 rewards [0.3, 0.2, 0.7, 0.1], likelihood [-5, -4, -1, -6]: best row 6; rejected row 5.
    group 2: all rewards equal -> not valid.
    """
    rewards = _t([0.5, 0.9, 0.9, 0.1, 0.3, 0.2, 0.7, 0.1, 2.0, 2.0, 2.0, 2.0])
    likelihood = _t([-1.0, -3.0, -0.2, -2.0, -5.0, -4.0, -1.0, -6.0, -1.0, -2.0, -3.0, -4.0])
    best, rejected, valid = best_likeliest(rewards, 4, likelihood)
    assert best[:2].tolist() == [1, 6] and rejected[:2].tolist() == [0, 5] and valid.tolist() == [True, True, False]
    assert (rewards[best[:2]] > rewards[rejected[:2]]).all()
    # with the likelihood ranking the worst sample first, it is best vs worst (eq. 4)
    bw_best, bw_worst, bw_valid = best_worst(rewards, 4)
    _, rejected, _ = best_likeliest(rewards, 4, -rewards)
    assert rejected[:2].tolist() == bw_worst[:2].tolist() and bw_valid.tolist() == valid.tolist()


def test_weighted_simpo_is_the_mean_over_each_groups_pairs():
    """Weights 1/2, 1/2 (one group, two pairs) and 1 (another group), normalizer 2 groups:
    loss = (0.5 * l(1.5) + 0.5 * l(-1.5) + 1 * l(1.5)) / 2 with l(z) = log(1 + e^-z)."""
    loss, m = simpo_loss(
        _t([-1.0, -1.5, -1.0]), _t([-2.0, -1.0, -2.0]), beta=2.0, gamma=0.5, normalizer=2, weights=_t([0.5, 0.5, 1])
    )
    lo, hi = math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.5))
    assert loss.item() == pytest.approx((0.5 * lo + 0.5 * hi + lo) / 2, abs=1e-12)
    assert m["simpo/pairs"] == 3.0


def test_simpo_nll_term_adds_the_chosen_outputs_likelihood():
    """nll_weight 0.5, chosen -1 / -2, rejected -2 / -1, normalizer 2, second pair weighted 3:
    loss = (1 * (l(1.5) + 0.5 * 1) + 3 * (l(-2.5) + 0.5 * 2)) / 2, l(z) = log(1 + e^-z); dL/dc_1 = (-2 s(-1.5)
    - 0.5) / 2: the term pulls the chosen output up even where the margin is already met."""
    c, r = _t([-1.0, -2.0], grad=True), _t([-2.0, -1.0])
    loss, m = simpo_loss(c, r, beta=2.0, gamma=0.5, normalizer=2, weights=_t([1.0, 3.0]), nll_weight=0.5)
    l = lambda z: math.log(1 + math.exp(-z))  # noqa: E731
    assert loss.item() == pytest.approx((l(1.5) + 0.5 + 3 * (l(-2.5) + 1.0)) / 2, abs=1e-12)
    assert m["simpo/nll"] == pytest.approx(1.5)
    loss.backward()
    assert c.grad[0].item() == pytest.approx((-2 * torch.sigmoid(_t(-1.5)).item() - 0.5) / 2, abs=1e-12)
    plain, pm = simpo_loss(c.detach(), r, beta=2.0, gamma=0.5, normalizer=2, weights=_t([1.0, 3.0]))
    assert plain.item() == pytest.approx(loss.item() - (0.5 + 3.0) / 2, abs=1e-12) and "simpo/nll" not in pm


def test_all_pairs_put_the_gradient_on_the_close_call():
    """A group of three: a wrong caption the policy already rates far below (log-prob -3), and two close ones
    (right -1.0, wrong -1.1; rewards rank right > wrong > far). Best vs worst pairs right with far, a nearly
    saturated SimPO term; all pairs also contrast right with the close wrong one, and push the close wrong one
    down, which best vs worst never touches.

    With s(z) = sigmoid(z), beta 2, gamma 0.5: best vs worst, z = 2 * 2.0 - 0.5 = 3.5: dL/d right = -2 s(-3.5)
    = -0.0586, close wrong 0. All pairs (weight 1/3 each): (right, close) z = -0.3, (right, far) z = 3.5, (close,
    far) z = 3.3: dL/d right = -2/3 (s(0.3) + s(-3.5)) = -0.4025; dL/d close = 2/3 (s(0.3) - s(-3.3)) = +0.3592."""
    s = torch.sigmoid
    logps = _t([-1.0, -1.1, -3.0], grad=True)  # right, close wrong, far wrong
    rewards = _t([2.0, 1.0, 0.0])
    best, worst, _ = best_worst(rewards, 3)
    simpo_loss(logps[best], logps[worst])[0].backward()
    assert logps.grad[0].item() == pytest.approx(-2 * s(_t(-3.5)).item()) and logps.grad[1].item() == 0.0
    logps.grad = None
    chosen, rejected, weights, _ = ordered_pairs(rewards, 3, torch.arange(3)[:, None])
    simpo_loss(logps[chosen], logps[rejected], normalizer=1, weights=weights)[0].backward()
    assert logps.grad[0].item() == pytest.approx(-2 / 3 * (s(_t(0.3)) + s(_t(-3.5))).item())
    assert logps.grad[1].item() == pytest.approx(2 / 3 * (s(_t(0.3)) - s(_t(-3.3))).item())
    assert logps.grad[0].item() == pytest.approx(-0.4025, abs=1e-4) and logps.grad[1].item() > 0.35


# ------------------------------------------------------------------------------------------ GRPO
def test_grpo_at_ratio_one_is_minus_token_weighted_advantage():
    """logps == old_logps (ratio 1), no KL, mask rows of length 3 and 1, A = (0.5, -2).

    surrogate per token = A_i, so loss = -(0.5 * 3 + (-2) * 1) / 4 tokens = -(-0.5) / 4 = 0.125.
    d loss / d logp_it = -A_i * ratio / 4: row 0 -> -0.125 per real token, row 1 -> +0.5, padding 0.
    """
    old = _t([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    logps = old.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, m = grpo_loss(logps, old, _t([0.5, -2.0]), mask)
    assert loss.item() == pytest.approx(0.125, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logps.grad, _t([[-0.125, -0.125, -0.125], [0.5, 0.0, 0.0]]))
    assert m["grpo/tokens"] == 4.0 and m["grpo/ratio_mean"] == 1.0 and m["grpo/ratio_max_abs_dev"] == 0.0
    assert m["grpo/clip_frac"] == 0.0 and m["grpo/kl"] == 0.0


def test_grpo_clip_higher_hand_example():
    """eps_low 0.2, eps_high 0.28, clip range [0.8, 1.28]. Row 0 has A = +1, row 1 has A = -1.

    row 0, ratio 1.5: min(1.5, 1.28)       = 1.28  clipped (high)   grad 0
    row 0, ratio 0.5: min(0.5, 0.8)        = 0.5   unclipped        d/dlogp (-ratio*A)/4 = -0.5/4 = -0.125
    row 1, ratio 0.5: min(-0.5, -0.8)      = -0.8  clipped (low)    grad 0
    row 1, ratio 1.5: min(-1.5, -1.28)     = -1.5  unclipped        d/dlogp (-ratio*A)/4 = +1.5/4 = 0.375
    loss = -(1.28 + 0.5 - 0.8 - 1.5) / 4 = 0.52 / 4 = 0.13
    clip_high_frac 1/4, clip_low_frac 1/4, clip_frac 1/2, ratio_mean (1.5+0.5+0.5+1.5)/4 = 1, max |r-1| 0.5.
    """
    old = _t([[-1.0, -2.0], [-0.7, -1.2]])
    ratio = _t([[1.5, 0.5], [0.5, 1.5]])
    logps = (old + ratio.log()).detach().requires_grad_()
    loss, m = grpo_loss(
        logps, old, _t([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool), eps_low=0.2, eps_high=0.28
    )
    assert loss.item() == pytest.approx(0.13, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logps.grad, _t([[0.0, -0.125], [0.0, 0.375]]))
    assert m["grpo/clip_high_frac"] == 0.25 and m["grpo/clip_low_frac"] == 0.25 and m["grpo/clip_frac"] == 0.5
    assert m["grpo/ratio_mean"] == pytest.approx(1.0) and m["grpo/ratio_max_abs_dev"] == pytest.approx(0.5)
    # Symmetric clipping at 0.2 (not DAPO's clip-higher) would cap row 0's first token at 1.2 instead.
    sym, _ = grpo_loss(logps, old, _t([1.0, -1.0]), torch.ones(2, 2), eps_low=0.2, eps_high=0.2)
    assert sym.item() == pytest.approx(-(1.2 + 0.5 - 0.8 - 1.5) / 4, abs=1e-12)


def test_k3_zero_when_equal_hand_value_and_exact_on_a_distribution():
    """k3 = exp(d) - d - 1 with d = ref - logp.

    d = ln 0.5: 0.5 - ln 0.5 - 1 = 0.5 + 0.693147 - 1 = 0.193147;  d = ln 2: 2 - 0.693147 - 1 = 0.306853.
    Under pi, E[exp(d)] = sum_x pi(x) ref(x)/pi(x) = 1, so sum_x pi(x) k3(x) = E[-d] = KL(pi || ref) exactly.
    """
    lp = _t([-0.3, -1.7, -4.0])
    assert (k3_kl(lp, lp) == 0).all()
    hand = k3_kl(_t([0.0, 0.0]), _t([math.log(0.5), math.log(2.0)]))
    torch.testing.assert_close(hand, _t([0.5 - math.log(0.5) - 1, 2 - math.log(2.0) - 1]))
    assert hand[0].item() == pytest.approx(0.193147, abs=1e-6)

    g = torch.Generator().manual_seed(1)
    logp = torch.randn(7, generator=g, dtype=torch.float64).log_softmax(-1)
    ref = torch.randn(7, generator=g, dtype=torch.float64).log_softmax(-1)
    kl = (logp.exp() * (logp - ref)).sum()
    assert (logp.exp() * k3_kl(logp, ref)).sum().item() == pytest.approx(kl.item(), abs=1e-12)
    assert (k3_kl(logp, ref) >= 0).all() and k3_kl(logp, ref).shape == (7,)


def test_grpo_kl_term_adds_beta_times_mean_k3():
    """A = 0 and ratio 1, so only the KL term is left: loss = beta * mean k3 over the 3 real tokens.

    d = ref - logp on real tokens: ln 2, 0, ln 0.5 -> k3 = (2 - ln2 - 1) + 0 + (0.5 + ln2 - 1) = 0.5 exactly.
    beta = 0.1: loss = 0.1 * 0.5 / 3 = 0.0166667; grpo/kl = 0.5 / 3. Without ref (or beta 0) the loss is 0.
    """
    logps = _t([[-1.0, -2.0], [-0.5, -3.0]])
    ref = logps + _t([[math.log(2.0), 0.0], [math.log(0.5), 5.0]])  # the 5.0 sits on padding
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = _t([0.0, 0.0])
    loss, m = grpo_loss(logps, logps, adv, mask, ref_logps=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * 0.5 / 3, abs=1e-12)
    assert m["grpo/kl"] == pytest.approx(0.5 / 3, abs=1e-12)
    assert grpo_loss(logps, logps, adv, mask, ref_logps=None, beta=0.1)[0].item() == 0.0
    assert grpo_loss(logps, logps, adv, mask, ref_logps=ref, beta=0.0)[0].item() == 0.0

    kl, km = kl_penalty(logps, ref, mask)
    assert kl.item() == pytest.approx(0.5 / 3, abs=1e-12) and km["kl/mean"] == pytest.approx(0.5 / 3)


def _random_grpo_batch(seed: int, B: int = 4, T: int = 5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = (old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    return logps, old, ref, adv, mask


def test_grpo_masked_tokens_do_not_contribute():
    """Overwriting every padded position (even with -inf / nan / 50) changes neither loss nor grads."""
    logps, old, ref, adv, mask = _random_grpo_batch(2)
    assert (~mask).any()
    loss, m = grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04)
    (grad,) = torch.autograd.grad(loss, logps)

    junk = torch.full_like(old, float("nan"))
    logps2 = torch.where(mask, logps.detach(), torch.full_like(old, 50.0)).requires_grad_()
    old2 = torch.where(mask, old, torch.full_like(old, -float("inf")))
    ref2 = torch.where(mask, ref, junk)
    loss2, m2 = grpo_loss(logps2, old2, adv, mask, ref_logps=ref2, beta=0.04)
    (grad2,) = torch.autograd.grad(loss2, logps2)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(grad2, grad)
    assert (grad2[~mask] == 0).all()
    assert m2 == pytest.approx(m)

    kl, _ = kl_penalty(logps, ref, mask)
    kl2, _ = kl_penalty(logps2, ref2, mask)
    assert kl2.item() == pytest.approx(kl.item(), abs=1e-12)


def test_grpo_normalizer_gives_grad_accumulation_equivalence():
    """Token-level loss over 4 rows == (rows 0-1) + (rows 2-3), each divided by the total real-token count.

    With the default (per-call) normalizer the halves would be weighted by their own token counts instead.
    """
    logps, old, ref, adv, mask = _random_grpo_batch(3)
    full, _ = grpo_loss(logps, old, adv, mask, ref_logps=ref)
    (g_full,) = torch.autograd.grad(full, logps)
    n = float(mask.sum())
    parts = [
        grpo_loss(logps[s], old[s], adv[s], mask[s], ref_logps=ref[s], normalizer=n)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    (g_acc,) = torch.autograd.grad(parts[0] + parts[1], logps)
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(g_acc, g_full)

    kl_full, _ = kl_penalty(logps, ref, mask)
    kl_parts = [kl_penalty(logps[s], ref[s], mask[s], normalizer=n)[0] for s in (slice(0, 2), slice(2, 4))]
    assert (kl_parts[0] + kl_parts[1]).item() == pytest.approx(kl_full.item(), abs=1e-12)


def test_grpo_constants_are_detached_and_bf16_ratio_is_exactly_one():
    """old_logps, ref_logps, advantages get no gradient; bf16 log-probs are upcast: ratio stays exactly 1."""
    logps, old, ref, adv, mask = _random_grpo_batch(4)
    old, ref, adv = old.requires_grad_(), ref.requires_grad_(), adv.requires_grad_()
    loss, _ = grpo_loss(logps, old, adv, mask, ref_logps=ref)
    loss.backward()
    assert old.grad is None and ref.grad is None and adv.grad is None and logps.grad is not None

    lp16 = torch.tensor([[-1.1, -2.3]], dtype=torch.bfloat16, requires_grad=True)
    loss16, m16 = grpo_loss(lp16, lp16.detach(), torch.tensor([1.0]), torch.ones(1, 2))
    assert loss16.dtype == torch.float32 and m16["grpo/ratio_max_abs_dev"] == 0.0
    assert loss16.item() == -1.0


def test_grpo_empty_mask_and_shape_errors():
    """No real tokens: loss 0 that still backprops, metrics 0. Wrong shapes name the shapes."""
    logps = torch.zeros(2, 3, requires_grad=True)
    loss, m = grpo_loss(logps, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad and m["grpo/tokens"] == 0.0
    loss.backward()
    assert all(math.isfinite(v) for v in m.values())
    with pytest.raises(AssertionError, match=r"advantages must be \(B,\) = \(2,\), got \(3,\)"):
        grpo_loss(logps, torch.zeros(2, 3), torch.ones(3), torch.ones(2, 3))
    with pytest.raises(AssertionError, match=r"old_logps.*\(2, 3\).*\(2, 4\)"):
        grpo_loss(logps, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3))


def test_step_metrics_weigh_each_report_by_its_count_and_count_once_per_rollout():
    """``StepMetrics`` (the trainer's reduction over micro-batches, inner iterations and processes):

    - a mean is over the reports that have the key, each weighted by the count it averages over: ratio 1.0 over
      3 and over 5 tokens reads 1.0 beside a micro-batch that reported no ratio (before: (1 + 1) / 4 = 0.5 with 2
      processes x accumulation 2, the absent reports counted as 0); accuracy 1.0 over 2 pairs and 0.0 over 6
      reads 0.25, as one batch of 8 pairs would;
    - counts are summed, except over a rollout's later inner iterations (512 tokens, not 1,024);
    - ``groups_within_gap`` is a count (2 + 1 = 3, not their mean 1.5);
    - a NaN (no decisive group) reports nothing, and a key with no report reads NaN;
    - the losses' shares of one global loss add up across micro-batches and processes."""
    import math

    from suder.distributed import StepMetrics

    m = StepMetrics()
    m.add({"und/grpo/ratio_mean": 1.0, "und/grpo/tokens": 3.0, "und/groups_within_gap": 2.0})
    m.add({"und/groups_within_gap": 1.0})  # a micro-batch whose groups were all skipped: no ratio
    m.add({"und/grpo/ratio_mean": 1.0, "und/grpo/tokens": 5.0})
    m.add({"und/grpo/ratio_mean": 1.0, "und/grpo/tokens": 5.0}, counts=False)  # its second inner iteration
    m.add({"und/simpo/accuracy": 1.0, "und/simpo/pairs": 2.0, "und/judge_agree": float("nan")})
    m.add({"und/x/kl": 0.5, "und/x/tokens": 0.0})
    other = StepMetrics()  # another process
    other.add({"und/simpo/accuracy": 0.0, "und/simpo/pairs": 6.0, "und/judge_agree": 1.0, "und/loss": 0.25})
    other.add({"und/judge_agree": 0.0, "und/judge_decisive": 3.0, "und/loss": 0.5})
    m.merge(other.state)
    out = m.result()
    assert out["und/grpo/ratio_mean"] == 1.0 and out["und/grpo/tokens"] == 8.0
    assert out["und/groups_within_gap"] == 3.0 and out["und/simpo/accuracy"] == 0.25 and out["und/simpo/pairs"] == 8
    assert out["und/judge_agree"] == 0.25 and out["und/loss"] == 0.75 and math.isnan(out["und/x/kl"])


def test_step_metrics_pool_reward_std_as_one_batch_would():
    """``reward_std`` is the std of all the step's rewards: pooled from micro-batches and processes with Chan et al.'s
    parallel variance (each report's std, mean and group count; G fixed), it equals the std of the whole batch; a
    single report keeps its own value exactly (a run of one micro-batch logs what it logged before)."""
    import torch

    from suder.distributed import StepMetrics

    rewards = torch.tensor([0.1, -2.0, 0.7, 3.0, -0.4, 1.5, 2.2, -1.1, 0.0, 5.0, -3.0, 0.3])  # 6 groups of 2
    whole = rewards.std(unbiased=False).item()

    def report(r: torch.Tensor) -> dict:
        return {"gen/reward_std": r.std(unbiased=False).item(), "gen/reward_mean": r.mean().item(),
                "gen/groups": len(r) / 2}

    split = StepMetrics()
    split.add(report(rewards[:4]))
    split.add(report(rewards[4:6]))
    other = StepMetrics()  # another process
    other.add(report(rewards[6:]))
    split.merge(other.state)
    assert split.result()["gen/reward_std"] == pytest.approx(whole, rel=1e-6)
    one = StepMetrics()
    one.add(report(rewards))
    assert one.result()["gen/reward_std"] == whole
