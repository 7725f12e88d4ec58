"""Shared fixtures: tests are CPU-only, offline and fast; the toy base is pre-trained once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread: tiny models are dominated by threading overhead, and CI may run subprocesses beside the tests
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: the embedded default's base goes to a per-session folder."""
    monkeypatch.setenv("SUDER_CACHE", str(tmp_path_factory.getbasetemp() / "suder-cache"))


@pytest.fixture(scope="session")
def tiny_toy_path(tmp_path_factory):
    """A small toy model after a few pre-training steps, saved once for the session."""
    from suder.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny-toy")
    pretrain(
        "toy",
        out=str(out),
        steps=30,
        seed=0,
        batch_size=16,
        warmup_steps=5,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
    )
    return str(out)


@pytest.fixture
def tiny_toy(tiny_toy_path):
    from suder import load_backbone

    return load_backbone("toy", model=tiny_toy_path)
