"""--resume continues with the run's saved settings: it refuses a change to the run's maths and records what may
change (length, logging, cadence)."""

from __future__ import annotations

import json

import pytest
import yaml

from suder import cli
from suder.config import resolve
from suder.errors import ConfigError
from suder.outputs import MAY_CHANGE_ON_RESUME, config_yaml, resume_config


def _started(out, **settings):
    """A run folder as a run started with ``settings`` leaves it: config.yaml and one complete checkpoint."""
    cfg = resolve(output_dir=str(out), **settings)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(config_yaml(cfg))
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "step.json").write_text('{"step": 2}')
    return cfg


def test_resume_takes_the_saved_settings(tmp_path):
    out = tmp_path / "run"
    started = _started(out, model="m", und_reward_scorer="frozen", und_group_size=3, seed=5)
    cfg = resume_config(resolve(output_dir=str(out), resume=True))
    assert cfg.to_dict() == {**started.to_dict(), "resume": True}
    assert (cfg.model, cfg.und.reward_scorer, cfg.und.group_size, cfg.seed) == ("m", "frozen", 3, 5)
    assert cfg.sources["und.group_size"] == "keywords" and cfg.sources["lr"] == "preset" and cfg.history == []


def test_resume_records_what_may_change(tmp_path):
    out = tmp_path / "run"
    _started(out, model="m", steps=4)
    cfg = resume_config(resolve(output_dir=str(out), resume="auto", steps=10, save_every=3, model="m"))
    assert (cfg.steps, cfg.save_every, cfg.model) == (10, 3, "m")
    changed = {"save_every": {"from": 100, "to": 3}, "steps": {"from": 4, "to": 10}}
    assert cfg.history == [{"resumed_from": "step-000002", "changed": changed}]
    assert cfg.sources["steps"] == "keywords"
    assert {"steps", "report_to", "save_every", "sample_every", "eval_every"} <= set(MAY_CHANGE_ON_RESUME)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model": "other"}, "model ('m' -> 'other')"),
        ({"und_group_size": 4}, "und.group_size (3 -> 4)"),
        ({"group_size": 4}, "gen.group_size (8 -> 4), group_size (8 -> 4), und.group_size (3 -> 4)"),
        ({"reward_scorer": "policy"}, "und.reward_scorer ('frozen' -> 'policy')"),
        ({"lr": 1e-4, "steps": 9}, "lr (3e-05 -> 0.0001)"),
    ],
)
def test_resume_refuses_a_change_to_the_runs_maths(tmp_path, change, named):
    out = tmp_path / "run"
    _started(out, model="m", und_reward_scorer="frozen", und_group_size=3)
    with pytest.raises(ConfigError) as exc:
        resume_config(resolve(output_dir=str(out), resume=True, **change))
    message = str(exc.value)
    assert f"Cannot resume '{out}' with different settings: {named} would change the run's maths" in message
    assert "\n" not in message and "steps" not in message.split("would")[0]  # steps may change


def test_nothing_to_resume_leaves_the_config_alone(tmp_path):
    cfg = resolve(output_dir=str(tmp_path / "new"), resume="auto", und_group_size=4)
    assert resume_config(cfg) is cfg


def test_resume_from_the_cli_keeps_the_runs_settings(tiny_toy_path, tmp_path, capsys):
    """A run started with `--und-reward-scorer frozen --und-group-size 3`, resumed without them: it continues with
    them (config.yaml and what ran), records the new --steps, and refuses another G or --model in one line."""
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--eval-num", "4", "--sample-every", "0"]
    first = ["run", "--model", tiny_toy_path, "--steps", "2", "--save-every", "1", "--group-size", "2"]
    first += ["--batch-size", "2", "--und-reward-scorer", "frozen", "--und-group-size", "3", *common]
    assert cli.main(first) == 0
    assert cli.main(["run", "--resume", "--steps", "3", *common]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["und"]["group_size"], saved["und"]["reward_scorer"], saved["model"]) == (3, "frozen", tiny_toy_path)
    assert saved["steps"] == 3 and saved["history"] == [
        {"resumed_from": "step-000001", "changed": {"steps": {"from": 2, "to": 3}}}  # the last step is final/
    ]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    capsys.readouterr()
    for flags, named in ((["--und-group-size", "4"], "und.group_size (3 -> 4)"), (["--model", "x"], "model")):
        assert cli.main(["run", "--resume", *flags, *common]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("Error: Cannot resume") and named in err[0], err
