"""report_to: metrics, sample grids and the config reach accelerate's trackers (read back from TensorBoard files)."""

from __future__ import annotations

import json
import re

import pytest

import suder
from suder.config import parse_value, resolve
from suder.errors import ConfigError
from suder.tracking import hparams, parse_report_to

TINY = dict(steps=2, group_size=4, gen_batch_size=2, und_batch_size=2, eval_num=8, sample_every=1, save_every=0)


def _events(folder):
    """Every TensorBoard event file under ``folder``, loaded with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files under {folder}"
    loaded = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        loaded.append(acc)
    return loaded


def test_report_to_accepts_lists_comma_strings_and_none():
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert parse_report_to("none") == parse_report_to(None) == []
    assert resolve(report_to="tensorboard").report_to == ["tensorboard"]
    assert resolve(flags={"report_to": parse_value("report_to", "tensorboard")}).report_to == ["tensorboard"]
    assert resolve().report_to == []


def test_unknown_or_missing_tracker_is_a_one_line_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"Unknown tracker 'tensorbord'.*Available: .*tensorboard.*Did you mean"):
        resolve(report_to="tensorbord")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the wandb package.*pip install wandb"):
        resolve(report_to="wandb")


def test_hparams_are_scalars():
    values = hparams({"lr": 1e-5, "model": None, "report_to": ["tensorboard"], "opts": {"a": 1}, "resume": False})
    assert values == {"lr": 1e-5, "model": "None", "report_to": '["tensorboard"]', "opts": '{"a": 1}', "resume": False}


def test_tensorboard_gets_every_metric_the_grids_and_the_config(tiny_toy_path, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    suder.train("toy", model=tiny_toy_path, output_dir=str(out), report_to="tensorboard", lr=2e-5, **TINY)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = _events(out / "logs" / "suder")
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for acc in events for tag in acc.Tags()["scalars"]}
    expected = {
        (k, line["step"]): v
        for line in lines
        for k, v in line.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert expected and {k for k, _ in expected} >= {"gen/loss", "und/loss", "lr", "gen/reward_mean"}
    for (key, step), value in expected.items():
        assert scalars[key][step] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert set(scalars) - {k for k, _ in expected} == {
        f"judge_{w}/{k}" for w in ("before", "after") for k in ("t2i", "caption", "caption_greedy")
    }
    run = json.loads((out / "run.json").read_text())
    assert scalars["judge_after/t2i"][2] == pytest.approx(run["after"]["t2i"]["overall"])
    assert scalars["judge_before/caption_greedy"][2] == pytest.approx(run["before"]["caption_greedy"]["overall"])

    images = {(tag, e.step): e for acc in events for tag in acc.Tags()["images"] for e in acc.Images(tag)}
    assert set(images) == {(f"samples/{d}", s) for d in ("gen", "und") for s in (1, 2)}
    from PIL import Image

    grid = Image.open(out / "samples" / "step-000002-gen.png")
    assert (images[("samples/gen", 2)].width, images[("samples/gen", 2)].height) == grid.size

    logged = {}
    for acc in events:
        try:
            tagged = acc.PluginTagToContent("hparams")
        except KeyError:  # only add_hparams' own event file has them
            continue
        for tag, content in tagged.items():
            if tag.endswith("session_start_info"):
                info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
                logged = {k: v.string_value or v.number_value or v.bool_value for k, v in info.hparams.items()}
    assert logged["lr"] == pytest.approx(2e-5) and logged["algo"] == "simpo" and logged["group_size"] == 4
    assert logged["report_to"] == '["tensorboard"]' and logged["output_dir"] == str(out)


def test_no_report_to_writes_no_tracker_files(tiny_toy_path, tmp_path):
    suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path), **(TINY | {"steps": 1}))
    assert not (tmp_path / "logs").exists()


def test_mlflow_file_store_gets_metrics_params_and_grids(tiny_toy_path, tmp_path, monkeypatch):
    """Runs where mlflow is installed (not a dev dependency): an offline file store read back with its client."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database; a folder is enough here
    out = tmp_path / "run"
    suder.train("toy", model=tiny_toy_path, output_dir=str(out), report_to="mlflow", **TINY)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("suder").experiment_id])
    assert run.info.run_name == "run" and run.data.params["group_size"] == "4"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("gen/loss", "und/reward_mean", "lr"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({line["step"]: line[key] for line in lines}), key
    images = [
        re.search(r"(samples_\w+)\+step\+(\d+)\+", a.path) for a in client.list_artifacts(run.info.run_id, "images")
    ]
    logged = {(m.group(1), int(m.group(2))) for m in images if m}
    assert logged == {(f"samples_{d}", s) for d in ("gen", "und") for s in (1, 2)}
