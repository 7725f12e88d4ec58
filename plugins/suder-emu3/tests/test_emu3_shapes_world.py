"""Emu3's ShapesWorld default at tiny sizes (CPU, seconds): the recipe end to end (``check_shapes_recipe``), its
image tokenizer's codes, and ``suder run --backbone emu3`` with no ``--model`` printing the judge table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("suder_emu3", reason="the emu3 plugin is not installed: pip install -e plugins/suder-emu3")

# the decoder is shrunk; the VQ-VAE keeps its ShapesWorld size (GroupNorm needs 32 channels, 32 px needs stride 8)
TINY = dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2),
            tokenizer_steps=2, tokenizer_batch_size=2)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A SUDER_CACHE holding a tiny emu3 base where ``ensure_base`` looks for the recipe's (version, steps, seed),
    written by ``check_shapes_recipe`` (the recipe end to end: preset, pre-training, save, load, sampling)."""
    from suder_emu3.shapes_world import recipe

    from suder.testing import check_shapes_recipe

    r = recipe()
    cache = tmp_path_factory.mktemp("cache")
    base = cache / f"emu3-base-{r.version}-steps{r.pretrain['steps']}-seed{r.pretrain['seed']}"
    loaded = check_shapes_recipe("emu3", base, **TINY)
    assert loaded.num_image_tokens == 16 and loaded.settings.image_size == 32
    return cache


def test_recipe_end_to_end_at_tiny_size(tiny_cache):
    saved = json.loads(next(tiny_cache.glob("emu3-base-*/suder_emu3.json")).read_text())
    assert saved["negative_prompt"] == "" and saved["positive_prompt"] == "" and saved["top_k"] is None


def test_reconstruction_accuracy_is_the_vq_round_trip_the_judge_reads(tiny_cache):
    """The recipe's tokenizer check goes through the backbone's own VQ-VAE (``image_codes``, ``decode_images``)."""
    from suder_emu3.shapes_world import reconstruction_accuracy

    from suder import load_backbone
    from suder.worlds import shapes

    model = load_backbone("emu3", model=str(next(tiny_cache.glob("emu3-base-*"))))
    tokenizer = reconstruction_accuracy(model, num=8)
    scenes = shapes.sample_scenes(8, seed=999)  # the helper's held-out scenes
    codes = model.image_codes([shapes.render(x) for x in scenes])
    read = sum(shapes.parse_image(im) == x for im, x in zip(model.decode_images(codes), scenes, strict=True))
    assert tokenizer == {"scenes": read / 8, "codes_used": int(codes.unique().numel())}


def test_shapes_words_are_single_tokens():
    """Each ShapesWorld word is one token after a space, as captions are encoded (``" " + caption``)."""
    from suder_emu3.shapes_world import shapes_tokenizer

    from suder.worlds import shapes

    tok = shapes_tokenizer()
    for word in shapes.VOCAB_WORDS:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.convert_tokens_to_ids("<|visual token 000127|>") != tok.unk_token_id


def test_tokenizer_codes_are_what_transformers_encode_picks():
    """After ``train_tokenizer``, ``Emu3VQVAE.encode`` (nearest code by squared distance) picks the code of largest
    cosine similarity, the one training taught the encoder: the stored codebook is on the unit sphere."""
    from suder_emu3.shapes_world import SHAPES_VQ, _latents, _pixels, train_tokenizer
    from transformers import Emu3VQVAEConfig
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

    from suder.worlds import shapes

    torch.manual_seed(0)
    vq = Emu3VQVAE(Emu3VQVAEConfig(**SHAPES_VQ))
    losses = train_tokenizer(vq, steps=3, batch_size=2, seed=0)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), norms
    x = _pixels([shapes.render(s) for s in shapes.sample_scenes(4, seed=1)])
    with torch.no_grad():
        want = (_latents(vq, x) @ vq.quantize.embedding.weight.t()).argmax(-1)
        got = torch.stack(vq.encode(x, torch.tensor([[32, 32]] * 4)).image_tokens).flatten()
    assert torch.equal(got, want)


def test_suder_run_without_model_prints_the_judge_table(tiny_cache, tmp_path):
    """The user's path: ``suder run --backbone emu3`` with no --model, --prompts or --images trains the base the
    recipe names (the one the package ships, else the tiny one in the cache) and prints the judge before and
    after."""
    from suder.pretrain import shipped_base

    shipped = shipped_base("emu3")
    out = tmp_path / "run"
    args = ["run", "--backbone", "emu3", "--steps", "1", "--eval-num", "4", "--group-size", "2", "--batch-size", "1",
            "--save-every", "0", "--sample-every", "0", "--output-dir", str(out)]
    env = {**os.environ, "SUDER_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    assert "pretrain base" not in shown and "T2I" in shown, shown[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["before"] and run["after"]
    want = str(shipped) if shipped else str(next(tiny_cache.glob("emu3-base-*")))
    assert run["base_model"] == want, (run["base_model"], want)


def test_eval_and_caption_commands_on_the_base(tiny_cache, tmp_path):
    """``suder eval`` and ``suder caption --backbone emu3 --model BASE`` work on a ShapesWorld base."""
    from suder.worlds import shapes

    base = str(next(tiny_cache.glob("emu3-base-*")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def suder(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    result = json.loads(suder("eval", "--backbone", "emu3", "--model", base, "--num", "4", "--json").stdout)
    assert {"t2i", "caption", "caption_greedy"} <= set(result) and result["t2i"]["n"] == 4, result
    (tmp_path / "images").mkdir()
    for i, scene in enumerate(shapes.sample_scenes(2, seed=3)):
        shapes.render(scene).save(tmp_path / "images" / f"{i}.png")
    suder("caption", "--backbone", "emu3", "--model", base, "--images", str(tmp_path / "images"), "--out",
          str(tmp_path / "captions.jsonl"))
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert [json.loads(x)["image"] for x in lines] == ["0.png", "1.png"]
