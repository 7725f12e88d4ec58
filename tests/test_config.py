"""Config: validation, precedence (YAML < flags < keywords), unknown keys with suggestions."""

from __future__ import annotations

import pytest

from suder.config import TOY_DEFAULTS, TrainConfig, parse_value, resolve
from suder.errors import ConfigError


def test_backbone_defaults():
    toy = TrainConfig()
    assert toy.lr == TOY_DEFAULTS["lr"] == 3e-5 and toy.steps == 300 and toy.guidance_scale == 1.0
    real = TrainConfig(backbone="janus-pro", prompts="p.txt", images="imgs")
    # appendix A.1: lr 3e-6, grad-accum 2, 5 epochs, SimPO 2.0/0.5, GRPO 0.2/0.28 and beta 0.04, G = 8
    assert (real.lr, real.grad_accum, real.epochs, real.steps) == (3e-6, 2, 5.0, None)
    assert (real.simpo_beta, real.simpo_gamma, real.grpo_eps_low, real.grpo_eps_high, real.grpo_beta) == (
        2.0,
        0.5,
        0.2,
        0.28,
        0.04,
    )
    assert real.group_size == 8 and real.warmup_steps == 5 and real.lr_schedule == "cosine"


def test_precedence(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lr: 1.0e-4\ngroup_size: 4\nalgo: grpo\n")
    cfg = resolve(str(y), {"group_size": 6}, algo="simpo")
    assert (cfg.lr, cfg.group_size, cfg.algo) == (1e-4, 6, "simpo")


def test_unknown_keys_suggest(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key 'grup_size'.*Did you mean 'group_size'"):
        resolve(None, None, grup_size=4)
    y = tmp_path / "bad.yaml"
    y.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'learning_rate' in .*bad.yaml"):
        resolve(str(y))
    with pytest.raises(ConfigError, match="--group-size"):
        parse_value("group_siz", "4")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"algo": "dpo"}, "algo must be one of simpo, grpo; got 'dpo'"),
        ({"strategy": "unifed"}, "Did you mean 'unified'"),
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"cfg_policy": "guide"}, "cfg_policy must be one of cond, guided"),
        ({"backbone": "janus-pro", "images": "x"}, "needs --prompts FILE"),
        ({"algo": "simpo", "grpo_iterations": 2}, "grpo_iterations applies when every trained direction uses grpo"),
        ({"algo": "grpo", "gen_algo": "simpo", "grpo_iterations": 2}, "every trained direction uses grpo"),
        ({"und_algo": "ppo"}, "und_algo must be one of simpo, grpo; got 'ppo'"),
    ],
)
def test_validation_messages(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_per_direction_algo_defaults_to_algo():
    both = TrainConfig(algo="grpo")
    assert (both.gen_algo, both.und_algo) == ("grpo", "grpo")
    split = TrainConfig(und_algo="grpo")
    assert (split.algo_for("gen"), split.algo_for("und")) == ("simpo", "grpo")
    # one direction trained: the other's algorithm does not block GRPO's inner iterations
    assert TrainConfig(strategy="und", und_algo="grpo", grpo_iterations=2).grpo_iterations == 2


def test_separate_strategy_has_no_reward_scorer():
    """Under `separate` the other model scores each direction: a scorer set by hand is an error, not ignored, and a
    backbone default's scorer (Janus-Pro's ShapesWorld run scores captions with the frozen base) is dropped."""
    for key in ("reward_scorer", "gen_reward_scorer", "und_reward_scorer"):
        with pytest.raises(ConfigError, match=f"{key} does not apply to strategy separate"):
            TrainConfig(strategy="separate", **{key: "frozen"})
    janus = TrainConfig(backbone="janus-pro", strategy="separate")
    assert (janus.reward_scorer, janus.gen_reward_scorer, janus.und_reward_scorer) == (None, None, None)
    assert TrainConfig(backbone="janus-pro").und_reward_scorer == "frozen"  # the unified default keeps it


def test_parse_value_types():
    assert parse_value("lr", "1e-5") == 1e-5 and parse_value("group_size", "4") == 4
    assert parse_value("resume", "true") is True and parse_value("model", "123") == "123"
