"""A LoRA run's frozen scorer and reference are the run's initial model: from a previous LoRA run's folder, its
loaded adapter (a frozen copy, ``snapshot_reference``), not the base under it (docs/algorithms.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_tiny import random_images, tiny_backbone  # noqa: E402

from suder.config import TrainConfig  # noqa: E402

PROMPTS = ["a red circle", "a green triangle left of a yellow star"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-data")
    (root / "prompts.txt").write_text("\n".join(PROMPTS + ["two purple cats", "a dog in the rain"]) + "\n")
    (root / "images").mkdir()
    for i, im in enumerate(random_images(4, seed=1)):
        im.save(root / "images" / f"{i}.png")
    return {"prompts": str(root / "prompts.txt"), "images": str(root / "images")}


def _captions(model, pics):
    with torch.no_grad():
        return model.logp_text_given_image(PROMPTS, pics).values


def _trainer(model, out, data, **kw):
    from suder.trainer import Trainer

    cfg = TrainConfig(
        backbone="janus-pro", model=str(model), algo="grpo", reward_scorer="frozen", steps=1, group_size=2,
        gen={"batch_size": 1}, und={"batch_size": 1}, lr=1e-2, sample_every=0, save_every=0, output_dir=str(out),
        **data, **kw,
    )
    return Trainer(cfg)


def test_a_run_from_a_lora_run_scores_with_its_initial_adapter(tmp_path, data):
    """A previous run's adapter (``lora_B`` non-zero) saved and trained on: before any update the frozen scorer and
    the reference give the policy's own log-probs (before the fix: the base's, the adapter switched off); after
    an update they still do the initial model's, while the trained adapter moved and the frozen copy did not."""
    previous = tiny_backbone(lora={"r": 4})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in previous.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    previous.save_pretrained(tmp_path / "previous")
    pics = random_images(2, seed=3)
    initial = _captions(previous, pics)
    with previous.reference_scope():
        base = _captions(previous, pics)
    assert (initial - base).abs().max() > 1e-2  # the previous run learned something

    tr = _trainer(tmp_path / "previous", tmp_path / "run", data)
    policy = tr.engines["policy"].backbone
    for scorer in (tr.scorer("frozen"), tr.reference):
        assert (_captions(scorer, pics) - initial).abs().max() <= 1e-5
    assert (_captions(policy, pics) - initial).abs().max() <= 1e-5
    trained = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}
    assert any(".reference." in n for n in trained) and all(
        p.requires_grad == (".default." in n) for n, p in policy.model.named_parameters() if "lora_" in n
    )
    tr.step(0)
    moved = [n for n, p in policy.model.named_parameters() if "lora_" in n and not torch.equal(p, trained[n])]
    assert moved and all(".default." in n for n in moved)
    assert (_captions(policy, pics) - initial).abs().max() > 1e-4
    assert (_captions(tr.scorer("frozen"), pics) - initial).abs().max() <= 1e-5

    # the saved run holds the trained adapter only, and loads with it on
    import suder

    policy.save_pretrained(tmp_path / "final")
    again = suder.load_backbone("janus-pro", model=str(tmp_path / "final"), dtype="float32", device="cpu")
    assert (_captions(again, pics) - _captions(policy, pics)).abs().max() <= 1e-5
    assert "reference" not in again.model.peft_config


def test_a_fresh_adapter_keeps_no_copy(tmp_path, data):
    """A fresh adapter (``lora_B`` zero) is the base model: the reference stays the adapter switched off, with no
    second adapter."""
    tiny_backbone(lora={"r": 4}).save_pretrained(tmp_path / "fresh")
    tr = _trainer(tmp_path / "fresh", tmp_path / "run", data)
    policy = tr.engines["policy"].backbone
    assert list(policy.model.peft_config) == ["default"]
    assert not any(".reference." in n for n, _ in policy.model.named_parameters())
