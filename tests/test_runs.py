"""What a user's run does: precedence as the user wrote it, recipes as shipped, resume, crashes and edge cases."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import suder
from suder import cli, outputs
from suder.config import resolve
from suder.errors import ConfigError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=2, group_size=4, gen_batch_size=2, und_batch_size=2, eval_num=8, sample_every=0, save_every=0)
RECIPES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def _train(path, out, **kw):
    return suder.train("toy", model=path, output_dir=str(out), **(TINY | kw))


def _steps(folder: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ precedence
def test_yaml_decides_when_the_caller_passes_no_keyword(tmp_path):
    """``train(config_file=...)`` must not override the YAML's backbone or algorithm with defaults."""
    from suder.config import resolve

    y = tmp_path / "r.yaml"
    y.write_text("backbone: toy\nalgo: grpo\nlr: 1.0e-4\n")
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(cfg, policy=None, callback=None):
        seen["cfg"] = cfg
        raise Stop

    import suder.trainer as trainer_mod

    orig = trainer_mod.Trainer
    trainer_mod.Trainer = fake_trainer
    try:
        with pytest.raises(Stop):
            suder.train(config_file=str(y))
        assert seen["cfg"].algo == "grpo" and seen["cfg"].lr == 1e-4
        with pytest.raises(Stop):
            suder.train(config_file=str(y), flags={"algo": "simpo"})
        assert seen["cfg"].algo == "simpo"  # flags beat YAML
        with pytest.raises(Stop):
            suder.train("toy", "grpo", config_file=str(y), flags={"algo": "simpo"})
        assert seen["cfg"].algo == "grpo"  # passed keywords beat flags
    finally:
        trainer_mod.Trainer = orig
    assert resolve(str(y)).algo == "grpo"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_to_what_it_names(recipe, monkeypatch):
    """``suder run --config RECIPE`` as its first line says: the backbone, model and algorithm it names."""
    import suder.trainer as trainer_mod

    named = yaml.safe_load(recipe.read_text())
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "suder run --config examples/configs/" + recipe.name in first
    seen = {}

    def fake_train(model=None, algo=None, *, config_file=None, flags=None, callback=None, **kw):
        from suder.config import resolve

        seen["cfg"] = resolve(config_file, flags, **kw)
        raise SystemExit(0)

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(trainer_mod, "preflight", lambda cfg: None)
    monkeypatch.setattr(importlib.import_module("suder.pretrain"), "ensure_base", lambda *a, **kw: "/no-base")
    with pytest.raises(SystemExit):
        cli.main(["run", "--config", str(recipe)])
    cfg = seen["cfg"]
    assert cfg.backbone == named["backbone"] and cfg.algo == named["algo"]
    assert cfg.model == named.get("model", cfg.model)
    from suder.config import flatten

    for key, value in flatten(named, str(recipe)).items():  # sections as dotted keys: gen.reward
        assert cfg._get(key) == value or key == "model", key


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name.startswith("toy_")], ids=lambda p: p.name)
def test_toy_recipes_run_and_log_their_algorithm(recipe, tiny_toy_path, tmp_path):
    named = yaml.safe_load(recipe.read_text())
    out = tmp_path / "run"
    code = cli.main(
        ["run", "--config", str(recipe), "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "2"]
        + ["--group-size", "4", "--gen-batch-size", "2", "--und-batch-size", "2", "--eval-num", "8"]
    )
    assert code == 0
    ran = yaml.safe_load((out / "config.yaml").read_text())
    assert ran["algo"] == named["algo"] and ran["backbone"] == "toy" and ran["steps"] == 2
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    other = "simpo" if named["algo"] == "grpo" else "grpo"
    assert any(k.startswith(f"gen/{named['algo']}/") for k in metrics[0]), sorted(metrics[0])
    assert not any(k.startswith(f"gen/{other}/") for k in metrics[0])


def test_cli_algo_flag_is_what_runs(tiny_toy_path, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--algo", "grpo", "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "1"]
    assert cli.main(args + ["--group-size", "4", "--gen-batch-size", "2", "--und-batch-size", "2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["algo"] == "grpo"
    assert "gen/grpo/ratio_max_abs_dev" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_a_saved_config_rerun_with_another_algo_and_scorer_trains_with_them(tiny_toy_path, tmp_path):
    """config.yaml holds gen.algo / und.algo and the per-direction scorers resolved; re-running it with `--algo grpo
    --reward-scorer frozen` must train both directions with GRPO and frozen scorers, not keep the saved copies."""
    args = ["--model", tiny_toy_path, "--steps", "1", "--group-size", "4", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "4", "--sample-every", "0", "--save-every", "0"]
    first, second = tmp_path / "first", tmp_path / "second"
    # the toy's preset scores captions with the frozen base: the first run asks for the policy in both directions
    assert cli.main(["run", *args, "--reward-scorer", "policy", "--output-dir", str(first)]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert (saved["gen"]["algo"], saved["und"]["algo"], saved["und"]["reward_scorer"]) == ("simpo", "simpo", "policy")
    rerun = ["run", "--config", str(first / "config.yaml"), "--output-dir", str(second), "--algo", "grpo"]
    assert cli.main(rerun + ["--reward-scorer", "frozen"]) == 0
    ran = yaml.safe_load((second / "config.yaml").read_text())
    assert (ran["algo"], ran["gen"]["algo"], ran["und"]["algo"]) == ("grpo", "grpo", "grpo")
    assert (ran["gen"]["reward_scorer"], ran["und"]["reward_scorer"]) == ("frozen", "frozen")
    row = json.loads((second / "metrics.jsonl").read_text().splitlines()[0])
    assert "gen/grpo/clip_frac" in row and "und/grpo/clip_frac" in row
    # a per-direction value the file sets apart from its global is kept while only the file speaks; a global flag
    # (a later layer) decides both directions, unless the flags also set the direction (docs/configuration.md)
    (tmp_path / "split.yaml").write_text("algo: simpo\nund_algo: grpo\n")
    assert (resolve(str(tmp_path / "split.yaml")).und.algo, resolve(str(tmp_path / "split.yaml")).gen.algo) == (
        "grpo", "simpo")
    assert resolve(str(tmp_path / "split.yaml"), {"algo": "simpo"}).und.algo == "simpo"
    split = resolve(str(tmp_path / "split.yaml"), {"algo": "simpo", "und.algo": "grpo"})
    assert (split.gen.algo, split.und.algo) == ("simpo", "grpo")


def test_data_files_are_checked_before_the_base_is_built(tmp_path, monkeypatch, capsys):
    def boom(*a, **kw):
        raise AssertionError("pre-training started before the data was checked")

    monkeypatch.setattr(importlib.import_module("suder.pretrain"), "ensure_base", boom)
    assert cli.main(["run", "--prompts", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ resume
def test_resume_with_nothing_to_resume_is_an_error_and_auto_starts_fresh(tiny_toy_path, tmp_path):
    with pytest.raises(ConfigError, match="Nothing to resume"):
        _train(tiny_toy_path, tmp_path, resume=True)
    res = _train(tiny_toy_path, tmp_path, resume="auto", steps=1)
    assert [m["step"] for m in res.metrics] == [1]


def test_a_fresh_run_never_continues_an_older_run(tiny_toy_path, tmp_path):
    """An older finished run's checkpoints must not be picked up by a new run killed before its first one."""
    _train(tiny_toy_path, tmp_path, steps=4, save_every=2)
    with pytest.raises(ConfigError, match="already holds a run"):
        _train(tiny_toy_path, tmp_path, steps=3)

    class Killed(Exception):
        pass

    def crash(m):
        raise Killed

    with pytest.raises(Killed):
        suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path), callback=crash, overwrite=True, **TINY)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()
    with pytest.raises(ConfigError, match="Nothing to resume"):
        _train(tiny_toy_path, tmp_path, resume=True)


def test_resume_reports_the_base_as_before_and_counts_every_step(tiny_toy_path, tmp_path):
    full = _train(tiny_toy_path, tmp_path / "a", steps=3, save_every=1)

    class Killed(Exception):
        pass

    def crash(m):
        if m["step"] == 2:
            raise Killed

    with pytest.raises(Killed):
        suder.train(
            "toy",
            model=tiny_toy_path,
            output_dir=str(tmp_path / "b"),
            callback=crash,
            **(TINY | {"steps": 3, "save_every": 1}),
        )
    resumed = _train(tiny_toy_path, tmp_path / "b", steps=3, save_every=1, resume=True)
    assert resumed.before == full.before  # the base's scores, not the checkpoint's
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["steps"] == 3 and _steps(tmp_path / "b") == [1, 2, 3]


def test_logged_lr_is_the_rate_the_step_used(tiny_toy_path, tmp_path):
    res = _train(tiny_toy_path, tmp_path, steps=3, lr=1e-3, warmup_steps=2, lr_schedule="cosine")
    lrs = [m["lr"] for m in res.metrics]
    # LambdaLR: step 0 -> 1/2, step 1 -> 2/2, step 2 -> cosine at (2 - 2) / (3 - 2) = 0 -> 1
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


def test_save_total_limit_keeps_the_last_checkpoints(tiny_toy_path, tmp_path):
    _train(tiny_toy_path, tmp_path, steps=5, save_every=1, save_total_limit=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004"]


# ------------------------------------------------------------------------------------------ crashes
def test_a_full_disk_keeps_the_last_checkpoint(tiny_toy_path, tmp_path, monkeypatch):
    from suder.backbones.toy import ToyUnifiedLM

    original = ToyUnifiedLM.save_pretrained
    calls = []

    def save(self, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, path)

    monkeypatch.setattr(ToyUnifiedLM, "save_pretrained", save)
    with pytest.raises(TrainingError, match="No space left.*step-000001' is kept.*--resume"):
        _train(tiny_toy_path, tmp_path, steps=4, save_every=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    suder.load_backbone("toy", model=str(tmp_path / "checkpoints" / "step-000001" / "model"))


@pytest.mark.parametrize("exchange", [True, False])
def test_final_swap_interrupted_at_any_point_keeps_a_loadable_final(tiny_toy, tmp_path, monkeypatch, exchange):
    """Write an old final/, then interrupt the swap with the new one after each file operation in turn."""
    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    for n in range(4):
        for p in (final, tmp, tmp_path / ".final.old"):
            if p.exists():
                import shutil

                shutil.rmtree(p)
        tiny_toy.save_pretrained(str(final))
        tiny_toy.save_pretrained(str(tmp))
        (tmp / "new").write_text("1")
        if not exchange:
            monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
        ops = {"n": 0}
        real_replace, real_rmtree = os.replace, outputs.shutil.rmtree

        def counted(fn, ops=ops, n=n):
            def wrapper(*a, **k):
                ops["n"] += 1
                if ops["n"] > n:
                    raise KeyboardInterrupt  # the kill
                return fn(*a, **k)

            return wrapper

        monkeypatch.setattr(outputs.os, "replace", counted(real_replace))
        monkeypatch.setattr(outputs.shutil, "rmtree", counted(real_rmtree))
        try:
            outputs.atomic_replace(tmp, final)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(outputs.os, "replace", real_replace)
        monkeypatch.setattr(outputs.shutil, "rmtree", real_rmtree)
        outputs.recover(tmp_path)
        suder.load_backbone("toy", model=str(final))  # old or new, never missing or half written


@pytest.mark.slow
def test_kill_9_during_checkpoints_then_resume_logs_each_step_once(tiny_toy_path, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "suder", "run", "--model", tiny_toy_path, "--output-dir", str(out)]
    args += ["--steps", "6", "--save-every", "1", "--group-size", "4", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "8", "--sample-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob(".step-000002.tmp")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # while checkpoint 2 is being written (or just after)
    proc.wait()
    assert (out / "checkpoints" / "step-000001" / "step.json").exists()
    code = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    suder.load_backbone("toy", model=str(out / "final"))


# ------------------------------------------------------------------------------------------ edge cases
def test_separate_schedules_are_sized_by_each_models_steps(tiny_toy_path):
    from suder.trainer import Trainer

    cfg = resolve(model=tiny_toy_path, strategy="separate", steps=150, switch_every=50, output_dir="unused")
    tr = Trainer(cfg)
    assert (tr._steps_for("gen"), tr._steps_for("und")) == (100, 50)


def test_cosine_reaches_its_end_on_both_separate_models(tiny_toy_path, tmp_path):
    res = _train(
        tiny_toy_path,
        tmp_path,
        strategy="separate",
        steps=6,
        switch_every=2,
        lr=1e-3,
        warmup_steps=1,
        lr_schedule="cosine",
    )
    lrs = [m["lr"] for m in res.metrics]
    # gen trains steps 1, 2, 5, 6 (4 steps), und steps 3, 4 (2 steps); each model's k-th step (from 0) uses
    # lr * 0.5 * (1 + cos(pi * (k - 1) / (n - 1))) after its one warm-up step: no model trains a step at lr 0
    gen = [1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 3)) for k in (1, 2, 3)]
    und = [1e-3, 1e-3]
    assert [lrs[i] for i in (0, 1, 4, 5)] == pytest.approx(gen)
    assert [lrs[i] for i in (2, 3)] == pytest.approx(und)


def test_a_step_where_every_group_is_skipped_does_not_move_the_weights(tiny_toy_path):
    from suder.trainer import Trainer

    cfg = resolve(
        model=tiny_toy_path, steps=2, group_size=4, gen_batch_size=2, und_batch_size=2, output_dir="unused", lr=1e-3
    )
    tr = Trainer(cfg)
    tr.step(0)  # a real update: AdamW now has momentum
    before = [p.detach().clone() for p in tr.engines["policy"].backbone.parameters()]
    tr.rewards = {d: (lambda ctx, s: torch.zeros(len(s))) for d in tr.rewards}  # every group has zero spread
    m = tr.step(1)
    assert m["gen/update_skipped"] == 1.0 and m["und/update_skipped"] == 1.0 and "optimizer_steps" not in m
    for a, b in zip(before, tr.engines["policy"].backbone.parameters()):
        assert torch.equal(a, b)


def test_non_finite_rewards_fail_loudly(tiny_toy_path, tmp_path, monkeypatch):
    from suder.backbones.toy import ToyUnifiedLM

    original = ToyUnifiedLM.logp_image_given_text

    def nan(self, images, texts, **options):
        lp = original(self, images, texts, **options)
        if torch.is_grad_enabled():
            lp.values = lp.values * float("nan")
        return lp

    monkeypatch.setattr(ToyUnifiedLM, "logp_image_given_text", nan)
    with pytest.raises(TrainingError, match="importance ratio is not 1"):
        _train(tiny_toy_path, tmp_path / "g", algo="grpo", strategy="gen", steps=1)
    with pytest.raises(TrainingError, match="not finite"):
        _train(tiny_toy_path, tmp_path / "s", algo="simpo", strategy="gen", steps=1)


def test_metrics_over_micro_batches_average_sum_counts_and_max_maxima():
    from suder.distributed import StepMetrics

    into = StepMetrics()
    for part in (
        {"gen/reward_mean": 1.0, "gen/groups": 2.0, "gen/logp_drift_max": 0.5},
        {"gen/reward_mean": 3.0, "gen/groups": 2.0, "gen/logp_drift_max": 0.1},
    ):
        into.add(part)
    assert into.result() == {"gen/reward_mean": 2.0, "gen/groups": 4.0, "gen/logp_drift_max": 0.5}


def test_zero_steps_is_an_error():
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        resolve(steps=0)


def test_the_embedded_default_records_no_model_the_user_did_not_give(monkeypatch):
    """`suder run` builds (or finds) the embedded default's base before training, but the flags layer holds only what
    the user typed: config.yaml keeps `model: null` from the defaults (before: the base's cache path, recorded as a
    flag), so re-running it asks for the embedded default again."""
    import suder.trainer as trainer_mod

    seen = {}

    def fake_train(model=None, algo=None, *, config_file=None, flags=None, callback=None, **kw):
        from suder.config import resolve

        seen["flags"], seen["cfg"] = dict(flags), resolve(config_file, flags, **kw)
        raise SystemExit(0)

    built = []
    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(trainer_mod, "preflight", lambda cfg: None)
    monkeypatch.setattr(importlib.import_module("suder.pretrain"), "ensure_base", lambda *a, **kw: built.append(a))
    with pytest.raises(SystemExit):
        cli.main(["run", "--steps", "1"])
    assert built == [("toy",)]  # the base was made ready first
    assert seen["flags"] == {"steps": "1"}  # as typed; resolve coerces it
    assert seen["cfg"].model is None and seen["cfg"].sources["model"] == "default"
