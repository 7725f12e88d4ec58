"""Every command: --help, a short run, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suder.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["backbones", "world", "world export", "pretrain", "generate", "caption", "eval", "run"]


def _suder(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _one_line_error(proc, text):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0
    assert "usage: suder" in capsys.readouterr().out


def test_world_export(tmp_path):
    assert main(["world", "export", "--num", "3", "--seed", "1", "--out", str(tmp_path / "w")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "w" / "captions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert all((tmp_path / "w" / r["image"]).exists() for r in rows)


def test_pretrain_generate_caption_eval(tmp_path, tiny_toy_path):
    assert main(["pretrain", "--backbone", "toy", "--out", str(tmp_path / "m"), "--steps", "2"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red square", "tag": "single"}\n{"prompt": "two blue circles"}\n')
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--backbone",
                "toy",
                "--model",
                tiny_toy_path,
                "--prompts",
                str(prompts),
                "--num-samples",
                "2",
                "--seed",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == {"prompt": "a red square", "tag": "single"}
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
    main(["world", "export", "--num", "3", "--seed", "1", "--out", str(tmp_path / "w")])
    (tmp_path / "w" / "captions.jsonl").unlink()
    caps = tmp_path / "caps.jsonl"
    assert (
        main(
            [
                "caption",
                "--backbone",
                "toy",
                "--model",
                tiny_toy_path,
                "--images",
                str(tmp_path / "w"),
                "--out",
                str(caps),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in caps.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["00000.png", "00001.png", "00002.png"] and all("caption" in r for r in rows)
    again = tmp_path / "caps2.jsonl"
    main(
        ["caption", "--backbone", "toy", "--model", tiny_toy_path, "--images", str(tmp_path / "w"), "--out", str(again)]
    )
    assert again.read_text() == caps.read_text()  # greedy by default: the same captions every time
    proc = _suder("eval", "--backbone", "toy", "--model", tiny_toy_path, "--num", "8", "--json")
    result = json.loads(proc.stdout)
    assert set(result["t2i"]) >= {"single", "pair", "count", "relation", "overall"} and "caption_greedy" in result


def test_run_short(tmp_path, tiny_toy_path):
    proc = _suder(
        "run",
        "--model",
        tiny_toy_path,
        "--output-dir",
        str(tmp_path / "r"),
        "--steps",
        "1",
        "--group-size",
        "2",
        "--gen-batch-size",
        "2",
        "--und-batch-size",
        "2",
        "--eval-num",
        "4",
    )
    assert "before" in proc.stdout and "after" in proc.stdout
    assert json.loads((tmp_path / "r" / "run.json").read_text())["steps"] == 1


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_toy_path):
    _one_line_error(_suder("eval", "--backbone", "toy", "--model", str(tmp_path / "nope"), check=False), "No toy model")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(
        _suder(
            "generate",
            "--backbone",
            "toy",
            "--model",
            tiny_toy_path,
            "--prompts",
            str(empty),
            "--out",
            str(tmp_path / "g"),
            check=False,
        ),
        "has no prompts",
    )
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    _one_line_error(
        _suder(
            "caption",
            "--backbone",
            "toy",
            "--model",
            tiny_toy_path,
            "--images",
            str(bad),
            "--out",
            str(tmp_path / "c.jsonl"),
            check=False,
        ),
        "Cannot read image",
    )
    _one_line_error(
        _suder("run", "--strategy", "unified", "--algo", "simpo", "--group-size", "1", check=False),
        "group_size must be >= 2",
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text("learning_rate: 0.1\n")
    _one_line_error(_suder("run", "--config", str(yaml), check=False), "Unknown config key 'learning_rate'")
