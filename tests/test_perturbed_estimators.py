"""GRPO with Show-o's randomly perturbed image estimators (``remask_ratio < 1``, ``prompt_drop > 0``) and several
inner iterations: every estimator that is compared with another (old, new, reference) uses the same seed."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from show_o_tiny import tiny_backbone  # noqa: E402

from suder.config import TrainConfig  # noqa: E402
from suder.rollout import ALGORITHMS, Rollout, sample_group  # noqa: E402

PERTURBATIONS = [{"remask_ratio": 0.5}, {"prompt_drop": 0.15}]


def _cfg(perturbation: dict, **kw) -> TrainConfig:
    return TrainConfig(
        backbone="show-o",
        algo="grpo",
        strategy="gen",
        group_size=4,
        gen={"batch_size": 2},
        grpo_iterations=2,
        grpo_beta=0.04,
        image_logp_options=perturbation,
        output_dir="unused",
        **kw,
    )


def _rollout(policy, cfg) -> Rollout:
    prompts = ["a red square", "two green triangles"]
    samples = sample_group(policy, "gen", prompts, cfg, torch.Generator().manual_seed(0))
    rewards = torch.arange(len(samples), dtype=torch.float32) % 3  # every group has a spread: no group skipped
    return Rollout("gen", samples, rewards, 4)


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_grpo_reference_log_probs_use_each_inner_iterations_seed(perturbation):
    """With the reference equal to the policy (true KL 0), the KL term is 0 at every inner iteration. Before,
    the reference was scored once with the first iteration's seed: iteration 1 compared seed-1 policy log-probs
    with seed-0 reference log-probs (``grpo/kl`` 1.59 with ``remask_ratio`` 0.5 on the full model)."""
    policy = tiny_backbone()
    reference = copy.deepcopy(policy)
    cfg = _cfg(perturbation)
    batch, _ = ALGORITHMS["grpo"].prepare(policy, _rollout(policy, cfg), cfg, reference, [11, 12])
    norm = {"count": batch.count, "tokens": batch.tokens}
    for it in range(2):
        with torch.no_grad():
            _, metrics = ALGORITHMS["grpo"].loss(policy, batch, cfg, norm, it)
        assert metrics["grpo/kl"] == 0.0, (it, metrics["grpo/kl"])


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_sharded_stand_in_forward_passes_the_iterations_seed(tmp_path, monkeypatch, perturbation):
    """Under ZeRO-3/FSDP2 a process whose groups were all skipped trains on a zero-weight stand-in, through the
    same log-prob function as the others; with a perturbed estimator it needs the inner iteration's seed (before:
    ``ValueError: remask_ratio < 1 needs remask_seed=``, which killed that rank and left the others waiting)."""
    from suder.backbones.show_o.backbone import ShowOBackbone
    from suder.trainer import Trainer

    cfg = _cfg(perturbation, steps=1, lr=1e-3, sample_every=0, save_every=0)
    cfg = TrainConfig(**(cfg.to_dict() | {"output_dir": str(tmp_path / "run"), "grpo_beta": 0.0}))
    tr = Trainer(cfg, tiny_backbone())
    policy = tr.engines["policy"].backbone
    seen = []
    original = ShowOBackbone.logp_image_given_text

    def spy(self, images, texts, **options):
        seen.append((torch.is_grad_enabled(), options.get("remask_seed")))
        return original(self, images, texts, **options)

    roll = _rollout(policy, cfg)
    batch, _ = ALGORITHMS["grpo"].prepare(policy, roll, cfg, None, [21, 22])
    # this process: all groups skipped, a stand-in (as Trainer.prepare builds it with sharded weights)
    monkeypatch.setattr(type(tr), "sharded", property(lambda self: True))
    flat = Rollout("gen", roll.samples, torch.zeros(len(roll.samples)), 4)
    stand_in, _ = tr.prepare("policy", flat, [21, 22])  # cfg.algo is grpo
    assert stand_in.count == 0
    monkeypatch.setattr(ShowOBackbone, "logp_image_given_text", spy)
    # the other processes have groups: the global count is not zero, so this one runs the stand-in forward
    norm = {("policy", "gen"): {"count": 4.0, "tokens": 64.0}}
    metrics = tr.update("policy", [{("policy", "gen"): stand_in}], norm).result()
    assert metrics["optimizer_steps"] == 2
    assert [s for g, s in seen if g] == [21, 22]  # one forward per inner iteration, each with its own seed
