"""The runnable examples run (tiny settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_ablation_writes_a_report(tiny_toy_path, tmp_path):
    ablation = _load("shapes_ablation")
    doc = tmp_path / "results.md"
    ablation.main(
        [
            "--out",
            str(tmp_path / "runs"),
            "--seeds",
            "0",
            "1",
            "--configs",
            "simpo-unified",
            "grpo-unified",
            "--steps",
            "1",
            "--eval-num",
            "8",
            "--jobs",
            "2",
            "--base",
            tiny_toy_path,
            "--doc",
            str(doc),
        ]
    )
    text = doc.read_text()
    assert "| base |" in text and "| simpo-unified |" in text and "| grpo-unified |" in text
    assert " ± " in text  # two seeds give a spread
    assert doc.with_suffix(".png").exists()
    assert (tmp_path / "runs" / "grpo-unified-seed1" / "run.json").exists()
