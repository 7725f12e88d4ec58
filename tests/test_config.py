"""Config: sections, layers (default < preset < config < flags < keywords), provenance, coercion, unknown keys."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from suder.config import DirectionConfig, TrainConfig, load_preset, load_yaml, parse_value, resolve
from suder.errors import ConfigError
from suder.outputs import config_yaml


def test_dataclass_defaults_are_the_papers():
    """Appendix A.1: lr 3e-6 cosine with 5 warm-up steps, grad-accum 2, 5 epochs, SimPO 2.0/0.5, GRPO 0.2/0.28 and
    beta 0.04, G = 8."""
    real = TrainConfig()
    assert (real.lr, real.grad_accum, real.epochs, real.steps) == (3e-6, 2, 5.0, None)
    assert (real.simpo_beta, real.simpo_gamma, real.grpo_eps_low, real.grpo_eps_high, real.grpo_beta) == (
        2.0, 0.5, 0.2, 0.28, 0.04)
    assert real.group_size == 8 and real.warmup_steps == 5 and real.lr_schedule == "cosine"
    assert (real.gen.group_size, real.und.group_size) == (8, 8)
    assert (real.gen.reward, real.und.reward) == ("dsr", "dsr-consensus")


# the embedded defaults as they were before presets moved into files (config.TOY_DEFAULTS, PAPER_DEFAULTS and the
# recipes' run_defaults): every resolved run must keep them. One deliberate change since: the toy's captions are
# scored by the frozen base on every ordered pair (2026-12-07, measured over three seeds in docs/results.md)
BEFORE = {
    "toy": dict(lr=3e-5, grad_accum=1, guidance_scale=1.0, epochs=None, steps=300, lr_schedule="constant",
                reward_scorer="policy", **{"gen.batch_size": 8, "und.batch_size": 8, "gen.group_size": 8,
                                           "und.group_size": 8, "und.simpo_pairs": "all",
                                           "gen.reward_scorer": "policy", "und.reward_scorer": "frozen"}),
    "show-o": dict(lr=3e-5, grad_accum=1, guidance_scale=None, epochs=None, steps=300, lr_schedule="constant",
                   reward_scorer="frozen", **{"und.simpo_pairs": "all", "gen.simpo_pairs": "best-worst",
                                              "gen.reward_scorer": "frozen", "und.reward_scorer": "frozen",
                                              "gen.group_size": 8, "und.group_size": 8}),
    "janus-pro": dict(lr=5e-5, grad_accum=1, guidance_scale=2.0, epochs=None, steps=300, lr_schedule="constant",
                      reward_scorer="policy", **{"gen.group_size": 16, "und.group_size": 8,
                                                 "gen.reward_scorer": "policy", "und.reward_scorer": "frozen",
                                                 "gen.batch_size": 8, "und.batch_size": 8}),
}
PAPER = dict(lr=3e-6, grad_accum=2, guidance_scale=None, epochs=5.0, steps=None, lr_schedule="cosine",
             reward_scorer="policy", **{"gen.group_size": 8, "und.group_size": 8, "gen.batch_size": 8,
                                        "und.batch_size": 8, "und.reward_scorer": "policy",
                                        "und.simpo_pairs": "best-worst"})


@pytest.mark.parametrize("backbone", list(BEFORE))
def test_presets_keep_every_embedded_default(backbone):
    cfg = resolve(backbone=backbone)
    assert cfg.preset == backbone and cfg.shapes_world
    assert {k: cfg._get(k) for k in BEFORE[backbone]} == BEFORE[backbone]
    assert all(cfg.sources[k] in ("default", "preset") for k in BEFORE[backbone] if k != "backbone")


@pytest.mark.parametrize("backbone, model", [("janus-pro", "deepseek-community/Janus-Pro-1B"),
                                             ("show-o", "showlab/show-o")])
def test_real_data_runs_keep_the_papers_defaults(backbone, model):
    cfg = resolve(backbone=backbone, model=model, prompts="p.txt", images="imgs")
    assert cfg.preset is None and {k: cfg._get(k) for k in PAPER} == PAPER


def test_the_toy_keeps_its_preset_on_real_data():
    cfg = resolve(prompts="p.txt", images="imgs")
    assert cfg.preset == "toy" and (cfg.lr, cfg.steps) == (3e-5, 300)


def test_preset_files_are_documented_and_known_keys():
    for name in ("toy", "show-o", "janus-pro"):
        assert load_preset(name)  # flattened and coerced: unknown keys or bad values would raise
    assert load_preset("janus-pro")["gen.group_size"] == 16 and load_preset("show-o")["und.simpo_pairs"] == "all"


def test_precedence(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lr: 1.0e-4\ngroup_size: 4\nalgo: grpo\n")
    cfg = resolve(str(y), {"group_size": 6}, algo="simpo")
    assert (cfg.lr, cfg.group_size, cfg.algo) == (1e-4, 6, "simpo")
    assert (cfg.sources["lr"], cfg.sources["group_size"], cfg.sources["algo"]) == ("config", "flags", "keywords")
    assert cfg.sources["gen.group_size"] == "flags" and cfg.sources["seed"] == "default"


@pytest.mark.parametrize(
    "layers, gen, und",
    [
        ({}, 16, 8),  # the Janus-Pro preset: 16 images per prompt, 8 captions per image
        ({"flags": {"group_size": 4}}, 4, 4),  # a global decides both directions over the preset
        ({"flags": {"group_size": 4, "gen.group_size": 12}}, 12, 4),  # the same layer: the section wins
        ({"config": {"gen": {"group_size": 12}}, "flags": {"group_size": 4}}, 4, 4),  # a later global wins
        ({"config": {"group_size": 4}, "keywords": {"und_group_size": 6}}, 4, 6),
    ],
)
def test_a_global_decides_both_directions_unless_a_same_or_later_layer_sets_one(tmp_path, layers, gen, und):
    path = None
    if "config" in layers:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(layers["config"]))
    cfg = resolve(path and str(path), layers.get("flags"), backbone="janus-pro", **layers.get("keywords", {}))
    assert (cfg.gen.group_size, cfg.und.group_size) == (gen, und)


def test_unknown_keys_suggest(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key 'grup_size'.*Did you mean 'group_size'"):
        resolve(None, None, grup_size=4)
    y = tmp_path / "bad.yaml"
    y.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'learning_rate' in .*bad.yaml"):
        resolve(str(y))
    y.write_text("gen:\n  grup_size: 4\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'gen.grup_size'.*Did you mean 'gen.group_size'"):
        resolve(str(y))
    with pytest.raises(ConfigError, match="--group-size"):
        parse_value("group_siz", "4")


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("lr: 1e-5\n", "lr", 1e-5),  # PyYAML reads 1e-5 (no dot) as a string
        ("steps: '300'\n", "steps", 300),
        ("group_size: 4.0\n", "group_size", 4),
        ("text_greedy_in_group: 'yes'\n", "text_greedy_in_group", True),
        ("gen:\n  simpo_min_gap: '0.5'\n", "gen.simpo_min_gap", 0.5),
        ("backbone_options: '{lora: true}'\n", "backbone_options", {"lora": True}),
        ("report_to: tensorboard\n", "report_to", ["tensorboard"]),
    ],
)
def test_yaml_values_are_coerced_to_their_fields_type(tmp_path, text, key, value):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    got = resolve(str(y))._get(key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("group_size: four\n", "group_size in {y} must be an integer, got 'four'."),
        ("lr: fast\n", "lr in {y} must be a number, got 'fast'."),
        ("gen:\n  group_size: [4]\n", "gen.group_size in {y} must be an integer, got [4]."),
        ("overwrite: maybe\n", "overwrite in {y} must be true or false, got 'maybe'."),
        ("seed: true\n", "seed in {y} must be an integer, got True."),
        ("backbone_options: lora\n", 'backbone_options in {y} must be a mapping such as "{{lora: true}}", got '
         "'lora'."),
        ("gen: 4\n", "gen in {y} must be a mapping of gen-direction settings, got 4."),
    ],
)
def test_values_of_the_wrong_type_are_one_line_errors_naming_the_key(tmp_path, text, message):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError) as exc:
        resolve(str(y))
    assert str(exc.value) == message.format(y=y) and "\n" not in str(exc.value)


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
        ({"algo": "grpo", "gen": {"algo": "simpo"}, "grpo_iterations": 2}, "every trained direction uses grpo"),
        ({"und": {"algo": "ppo"}}, "und.algo must be one of simpo, grpo; got 'ppo'"),
        ({"und": {"batch_size": 0}}, "und.batch_size must be >= 1"),
    ],
)
def test_validation_messages(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_per_direction_algo_defaults_to_algo():
    both = TrainConfig(algo="grpo")
    assert (both.gen.algo, both.und.algo) == ("grpo", "grpo")
    split = resolve(und_algo="grpo")
    assert (split.algo_for("gen"), split.algo_for("und")) == ("simpo", "grpo")
    assert split.side("und") is split.und and split["gen"] is split.gen
    with pytest.raises(AttributeError):  # flat names are input aliases only (YAML, keywords, flags), never read
        split.und_algo  # noqa: B018
    # one direction trained: the other's algorithm does not block GRPO's inner iterations
    assert resolve(strategy="und", und_algo="grpo", grpo_iterations=2).grpo_iterations == 2


def test_separate_strategy_has_no_reward_scorer():
    """Under `separate` the other model scores each direction: a scorer set by hand is an error, not ignored, and a
    preset's scorer (Janus-Pro's ShapesWorld run scores captions with the frozen base) is dropped."""
    for key in ("reward_scorer", "gen_reward_scorer", "und_reward_scorer"):
        shown = key.replace("_reward", ".reward") if key != "reward_scorer" else key
        with pytest.raises(ConfigError, match=f"{shown} does not apply to strategy separate"):
            resolve(strategy="separate", **{key: "frozen"})
    janus = resolve(backbone="janus-pro", strategy="separate")
    assert (janus.reward_scorer, janus.gen.reward_scorer, janus.und.reward_scorer) == (None, None, None)
    assert resolve(backbone="janus-pro").und.reward_scorer == "frozen"  # the unified default keeps it


def test_parse_value_types():
    assert parse_value("lr", "1e-5") == 1e-5 and parse_value("group_size", "4") == 4
    assert parse_value("resume", "true") is True and parse_value("model", "123") == "123"
    assert parse_value("gen_group_size", "16") == 16 and parse_value("guidance_scale", "none") is None


# ------------------------------------------------------------------------------------------- saved configs
def _saved(tmp_path, **kwargs):
    """The config.yaml a run resolved from ``kwargs`` writes."""
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(resolve(**kwargs)))
    return str(path)


def test_config_yaml_records_values_and_their_layer(tmp_path):
    path = _saved(tmp_path, backbone="janus-pro", und_group_size=3, seed=7)
    saved = yaml.safe_load(open(path))
    assert saved["gen"]["group_size"] == 16 and saved["und"]["group_size"] == 3 and saved["preset"] == "janus-pro"
    assert saved["sources"]["gen.group_size"] == "preset" and saved["sources"]["und.group_size"] == "keywords"
    assert saved["sources"]["seed"] == "keywords" and saved["sources"]["lr"] == "preset"
    assert saved["sources"]["simpo_beta"] == "default"
    assert "overwrite" not in load_yaml(_saved(tmp_path, overwrite=True, resume="auto"))  # not carried over
    path = _saved(tmp_path, backbone="janus-pro", und_group_size=3, seed=7)
    again = resolve(path)  # re-run as it was
    assert again.to_dict() == resolve(backbone="janus-pro", und_group_size=3, seed=7).to_dict()
    assert again.sources["und.group_size"] == "config" and again.sources["gen.group_size"] == "preset"


def test_rerunning_a_janus_pro_config_with_group_size_applies_it(tmp_path):
    """The issue's case: `--config RUN/config.yaml --group-size 4` on a Janus-Pro ShapesWorld run kept 16 and 8."""
    cfg = resolve(_saved(tmp_path, backbone="janus-pro"), {"group_size": 4})
    assert (cfg.gen.group_size, cfg.und.group_size) == (4, 4)


# every per-direction field: a value other than what the saved run has, for a flag of that field
OTHER = {"algo": "grpo", "batch_size": 3, "group_size": 5, "reward": "shapes-judge",
         "reward_scorer": {"gen": "frozen", "und": "policy"}, "loss_weight": 0.5, "simpo_pairs": "all",
         "simpo_min_gap": 0.25}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DirectionConfig)])
@pytest.mark.parametrize("direction", ["gen", "und"])
def test_rerunning_a_saved_config_with_a_flag_applies_it_for_every_per_direction_field(tmp_path, name, direction):
    """From a Janus-Pro ShapesWorld run whose caption rewards are scored by the frozen base and whose G is 16/8,
    with the user's own und settings: the direction's flag (`--und.simpo-pairs all`) and, for a field with a
    global, the global flag (`--group-size 5`), decide what the re-run trains with."""
    user = {"und_group_size": 6, "und_reward_scorer": "frozen", "und_reward": "dsr", "und_loss_weight": 2.0}
    path = _saved(tmp_path, backbone="janus-pro", **user)
    other = OTHER[name][direction] if isinstance(OTHER[name], dict) else OTHER[name]
    saved = resolve(path)
    assert getattr(saved.side(direction), name) != other  # the flag changes something
    own = resolve(path, {f"{direction}.{name}": other})
    assert getattr(own.side(direction), name) == other and own.sources[f"{direction}.{name}"] == "flags"
    kept = "und" if direction == "gen" else "gen"
    assert getattr(own.side(kept), name) == getattr(saved.side(kept), name)  # the other direction is left alone
    legacy = f"simpo_{direction}_{name[6:]}" if name.startswith("simpo_") else f"{direction}_{name}"
    assert getattr(resolve(path, {legacy: other}).side(direction), name) == other
    if name in ("algo", "batch_size", "group_size", "reward_scorer"):
        both = resolve(path, {name: other})
        assert (getattr(both.gen, name), getattr(both.und, name)) == (other, other)


def test_an_old_flat_config_yaml_still_loads(tmp_path):
    """A config.yaml written before the sections (flat keys, every value resolved, no sources)."""
    old = {"backbone": "janus-pro", "algo": "simpo", "gen_algo": "simpo", "und_algo": "simpo", "group_size": 8,
           "gen_group_size": 16, "und_group_size": 8, "gen_batch_size": 8, "und_batch_size": 8, "lr": "5e-5",
           "steps": 300, "epochs": None, "reward_scorer": "policy", "gen_reward_scorer": "policy",
           "und_reward_scorer": "frozen", "simpo_gen_pairs": "best-worst", "simpo_und_pairs": "all",
           "simpo_und_min_gap": 0.1, "gen_reward": "dsr", "und_reward": "dsr-consensus", "und_loss_weight": 1.0}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = resolve(str(path))
    assert (cfg.gen.group_size, cfg.und.group_size, cfg.und.reward_scorer, cfg.lr) == (16, 8, "frozen", 5e-5)
    assert (cfg.und.simpo_pairs, cfg.und.simpo_min_gap) == ("all", 0.1)
    rerun = resolve(str(path), {"group_size": 4, "algo": "grpo"})
    assert (rerun.gen.group_size, rerun.und.group_size, rerun.gen.algo, rerun.und.algo) == (4, 4, "grpo", "grpo")
