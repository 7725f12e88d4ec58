"""One ShapesWorld pre-training mechanism for every backbone (``suder.pretrain``), and Show-o's ShapesWorld default
on tiny sizes: its MAGVIT-v2 training losses, the recipe's mixed objective, the cached base, and the whole path
(pretrain a few steps, one DSR step, judged before/after) through the Python API and ``suder run``."""

from __future__ import annotations

import functools
import importlib
import json
import math
import random

import pytest
import torch
import yaml

from suder.backbones.show_o import shapes_world
from suder.config import TrainConfig, load_preset, resolve
from suder.errors import BackboneError, ConfigError

pretrain_mod = importlib.import_module("suder.pretrain")
TINY_LLM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_VQ = dict(
    ch=32,
    encoder_ch_mult=(1, 1, 1, 1),
    encoder_num_res_blocks=(1, 1, 1, 1),
    decoder_ch_mult=(1, 1, 1, 1),
    decoder_num_res_blocks=(1, 1, 1, 1),
)
PRESET = shapes_world.recipe().preset
TINY_BUILD = dict(llm=TINY_LLM, vq=TINY_VQ, tokenizer_steps=2, tokenizer_batch_size=4)


def tiny_recipe():
    return pretrain_mod.ShapesRecipe(
        build=functools.partial(shapes_world.build_shapes_base, **TINY_BUILD),
        version="tiny-test",
        pretrain=dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1),
        image_logp_options=shapes_world.image_logp_options,
        preset=PRESET,
    )


# ------------------------------------------------------------------------------------------ MAGVIT-v2 training
def test_lfq_losses_by_hand():
    """Two channels, two positions: z = (2, -1) and (-0.5, 3). q = sign(z) = (1, -1), (-1, 1); commitment is
    mean((z - q)^2) = (1 + 0 + 0.25 + 4) / 4; code probabilities are softmax(2 z . c) over the 4 codes c."""
    z = torch.tensor([[[[2.0, -0.5]], [[-1.0, 3.0]]]])  # (1, C=2, H=1, W=2)
    codebook = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    quantized, commit, entropy = shapes_world.lfq_losses(z, codebook)
    assert torch.equal(quantized, torch.tensor([[[[1.0, -1.0]], [[-1.0, 1.0]]]]))
    assert commit.item() == pytest.approx(5.25 / 4)
    rows = torch.tensor([[2.0, -1.0], [-0.5, 3.0]])
    probs = torch.softmax(2 * rows @ codebook.t(), -1)
    per_code = -(probs * torch.log(probs + 1e-5)).sum(-1).mean()
    mean = probs.mean(0)
    assert entropy.item() == pytest.approx((per_code + (mean * torch.log(mean + 1e-5)).sum()).item(), abs=1e-6)
    z.requires_grad_(True)
    shapes_world.lfq_losses(z, codebook)[0].sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight through


def test_tokenizer_training_lowers_the_reconstruction_loss():
    from suder.backbones.show_o.magvit import MAGVITv2

    torch.manual_seed(0)
    vq = MAGVITv2(**TINY_VQ, z_channels=6)
    losses = shapes_world.train_tokenizer(vq, steps=12, batch_size=8, lr=3e-3)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert not vq.training and not any(p.requires_grad for p in vq.parameters())
    result = shapes_world.reconstruction_accuracy(vq, num=8)
    assert 0 <= result["scenes"] <= 1 and result["codes_used"] >= 1


def test_reconstruction_accuracy_counts_scenes_the_judge_reads_back():
    """The public check every recipe's tokenizer runs: a lossless encode/decode is read back whole, one that draws
    nothing is not, and the codes seen are counted."""
    from suder.pretrain import reconstruction_accuracy
    from suder.worlds import shapes

    def encode(images):
        return torch.stack([torch.from_numpy(shapes.render_array(shapes.parse_image(im))) for im in images])

    def decode(codes, blank=False):
        from PIL import Image

        arrays = codes.numpy().astype("uint8")
        return [Image.fromarray(a * 0 if blank else a) for a in arrays]

    exact = reconstruction_accuracy(encode, decode, num=12)
    seen = encode([shapes.render(s) for s in shapes.sample_scenes(12, seed=999)]).unique().numel()
    assert exact["scenes"] == 1.0 and exact["codes_used"] == seen
    assert reconstruction_accuracy(encode, functools.partial(decode, blank=True), num=12)["scenes"] == 0.0


def test_text_tokenizer_has_one_token_per_word():
    from suder.worlds import shapes

    tok = shapes_world.text_tokenizer()
    prompt = "a purple triangle to the left of four white squares"
    ids = tok(prompt)["input_ids"]
    assert len(ids) == len(prompt.split()) and tok.decode(ids) == prompt
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 == tok.bos_token_id == tok.eos_token_id
    assert all(len(tok(" " + w)["input_ids"]) == 1 for w in shapes.VOCAB_WORDS)


# ------------------------------------------------------------------------------------------ the mechanism
def test_show_o_pretrains_with_its_mixed_objective(monkeypatch):
    """Every step scores images with a fresh random mask ratio (mask-token prediction) and captions
    teacher-forced (next-token), through the protocol's two log-prob methods; the callback counts the image
    tokenizer's steps first, then the model's."""
    from suder.backbones.show_o.backbone import ShowOBackbone

    seen = []
    original = ShowOBackbone.logp_image_given_text

    def spy(self, images, texts, **options):
        seen.append(options)
        return original(self, images, texts, **options)

    monkeypatch.setattr(ShowOBackbone, "logp_image_given_text", spy)
    monkeypatch.setattr(shapes_world, "recipe", tiny_recipe)
    events = []
    result = pretrain_mod.pretrain("show-o", callback=events.append)  # the recipe's 3 steps, batch 4
    assert [e["phase"] for e in events] == ["tokenizer"] * 2 + ["model"] * 3
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5] and {e["total_steps"] for e in events} == {5}
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    ratios = [o["remask_ratio"] for o in seen]
    assert len(set(ratios)) == 3 and all(0 < r <= 1 for r in ratios) and all(o["policy"] == "cond" for o in seen)
    assert result.cpu_seconds > 0


def test_image_logp_options_follow_the_cosine_mask_schedule():
    rng = random.Random(0)
    ratios = [shapes_world.image_logp_options(rng)["remask_ratio"] for _ in range(4000)]
    # P(cos(pi/2 t) <= 0.5) = P(t >= 2/3) = 1/3
    assert sum(r <= 0.5 for r in ratios) / len(ratios) == pytest.approx(1 / 3, abs=0.03)


@pytest.fixture
def no_janus_recipe(monkeypatch):
    """janus-pro as a backbone registered without a ShapesWorld recipe, whether or not it has one."""
    import dataclasses

    from suder import registry

    spec = registry.get_backbone_spec("janus-pro")
    monkeypatch.setitem(registry.backbones(), "janus-pro", dataclasses.replace(spec, shapes_recipe=None))


def test_a_backbone_without_a_recipe_has_no_shapes_world_default(no_janus_recipe):
    assert pretrain_mod.shapes_recipe("janus-pro") is None and pretrain_mod.shapes_recipe("nope") is None
    with pytest.raises(BackboneError, match="has no ShapesWorld default"):
        pretrain_mod.ensure_base("janus-pro")
    with pytest.raises(BackboneError, match="no ShapesWorld recipe"):
        pretrain_mod.pretrain("janus-pro", steps=1)


def test_toy_base_keeps_its_cache_path_and_defaults(monkeypatch, tmp_path):
    calls = []

    def fake(model, *, out, steps, seed, callback):
        calls.append((model, steps, seed))
        (tmp_path / "x").mkdir(exist_ok=True)
        import os

        os.makedirs(out)
        return pretrain_mod.PretrainResult(None, out, 1.0, [0.5], 0.5)

    monkeypatch.setattr(pretrain_mod, "pretrain", fake)
    path = pretrain_mod.ensure_toy_base(rebuild=True)  # built here, not the shipped one
    assert path == pretrain_mod.cache_dir() / "toy-base-v1-steps500-seed0" and calls == [("toy", 500, 0)]
    assert pretrain_mod.ensure_base("toy", rebuild=True) == path and len(calls) == 1  # cached
    assert json.loads((path / "pretrain.json").read_text())["steps"] == 500


def test_a_recipe_names_the_seed_of_its_base(monkeypatch, tmp_path):
    """A recipe's ``pretrain`` seed picks the cached base (folder name, pretrain.json and the seed it is built
    with); an explicit seed still wins."""
    calls = []

    def fake(model, *, out, steps, seed, callback):
        calls.append((model, steps, seed))
        import os

        os.makedirs(out)
        return pretrain_mod.PretrainResult(None, out, 1.0, [0.5], 0.5)

    recipe = pretrain_mod.ShapesRecipe(version="seeded", pretrain=dict(steps=7, seed=3))
    monkeypatch.setattr(shapes_world, "recipe", lambda: recipe)
    monkeypatch.setattr(pretrain_mod, "pretrain", fake)
    path = pretrain_mod.ensure_base("show-o")
    assert path.name == "show-o-base-seeded-steps7-seed3" and calls == [("show-o", 7, 3)]
    assert json.loads((path / "pretrain.json").read_text())["seed"] == 3
    assert pretrain_mod.ensure_base("show-o", seed=0).name == "show-o-base-seeded-steps7-seed0"
    assert calls[-1] == ("show-o", 7, 0)


def test_config_uses_the_recipe_defaults_only_on_shapes_world(no_janus_recipe):
    cfg = resolve(backbone="show-o")
    assert cfg.shapes_world and cfg.lr == load_preset("show-o")["lr"] == 3e-5
    assert cfg.steps == load_preset("toy")["steps"] == 300 and cfg.guidance_scale is None  # the base's own guidance
    assert cfg.reward_scorer == "frozen" and cfg.und.simpo_pairs == "all" and cfg.gen.simpo_pairs == "best-worst"
    real = resolve(backbone="show-o", model="showlab/show-o", prompts="p.txt", images="imgs")
    assert not real.shapes_world and real.lr == TrainConfig().lr == 3e-6
    assert real.reward_scorer == "policy" and real.und.simpo_pairs == "best-worst"  # the paper's, on real data
    assert resolve(backbone="show-o", reward_scorer="policy").reward_scorer == "policy"  # a flag still wins
    with pytest.raises(ConfigError, match="needs --images"):
        resolve(backbone="show-o", prompts="p.txt")
    with pytest.raises(ConfigError, match="needs --prompts"):
        resolve(backbone="janus-pro")


def test_a_released_checkpoint_without_data_asks_for_it(tmp_path):
    """--model of a backbone with a ShapesWorld recipe is trained on ShapesWorld only when `suder pretrain` (or a
    run from its base) marked the folder; a released checkpoint with no data asks for it, naming why."""
    with pytest.raises(ConfigError, match="needs --prompts.*not a ShapesWorld base written by `suder pretrain`"):
        resolve(backbone="show-o", model="showlab/show-o")
    with pytest.raises(ConfigError, match="needs --images"):
        resolve(backbone="show-o", model=str(tmp_path), strategy="und")
    pretrain_mod.write_marker(tmp_path, {"backbone": "show-o"})
    assert resolve(backbone="show-o", model=str(tmp_path)).shapes_world


# ------------------------------------------------------------------------------------------ the whole path
@pytest.fixture(scope="module")
def tiny_show_o_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("show-o-base")
    pretrain_mod.pretrain("show-o", out=str(out), steps=3, batch_size=4, warmup_steps=1, seed=0, **TINY_BUILD)
    return str(out)


def test_the_base_loads_back_and_is_judged(tiny_show_o_base):
    from suder import load_backbone
    from suder.evaluate import evaluate

    model = load_backbone("show-o", model=tiny_show_o_base)
    assert model.settings.steps == 8 and model.resolution == 32 and model.tokens.num_image_tokens == 16
    result = evaluate(model, num=8, batch=8)
    assert result["t2i"]["n"] == 8 and result["caption_greedy"]["n"] == 8


def test_dsr_on_the_base_runs_and_reports_the_judge_table(tiny_show_o_base, tmp_path):
    import suder

    result = suder.train(
        "show-o",
        model=tiny_show_o_base,
        steps=1,
        group_size=2,
        gen_batch_size=2,
        und_batch_size=2,
        eval_num=8,
        output_dir=str(tmp_path / "run"),
    )
    assert set(result.before) >= {"t2i", "caption_greedy"} and set(result.after) >= {"t2i", "caption_greedy"}
    assert result.metrics and "gen/reward_mean" in result.metrics[0] and "und/reward_mean" in result.metrics[0]
    # the trained model is still a ShapesWorld model: a run from it needs no data
    assert pretrain_mod.is_shapes_base(result.final_model) and pretrain_mod.is_shapes_base(tiny_show_o_base)
    assert resolve(backbone="show-o", model=result.final_model).shapes_world


def test_suder_run_show_o_builds_its_base_and_caches_it(monkeypatch, tmp_path, capsys):
    from suder import cli

    monkeypatch.setattr(shapes_world, "recipe", tiny_recipe)
    args = ["run", "--backbone", "show-o", "--steps", "1", "--group-size", "2", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "8", "--output-dir", str(tmp_path / "r")]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "before" in out.out and "after" in out.out
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())  # what ran: the recipe's preset
    assert config["reward_scorer"] == "frozen" and config["und"]["simpo_pairs"] == "all"
    base = pretrain_mod.cache_dir() / "show-o-base-tiny-test-steps3-seed0"
    assert json.loads((base / "pretrain.json").read_text())["backbone"] == "show-o"
    assert (base / "magvitv2" / "pytorch_model.safetensors").is_file()


def test_cli_eval_caption_generate_on_the_base(tiny_show_o_base, tmp_path, capsys):
    from suder import cli
    from suder.worlds import shapes

    assert cli.main(["eval", "--backbone", "show-o", "--model", tiny_show_o_base, "--num", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["t2i"]["n"] == 4
    shapes.export(3, 0, tmp_path / "imgs")
    out = tmp_path / "caps.jsonl"
    args = ["caption", "--backbone", "show-o", "--model", tiny_show_o_base, "--images", str(tmp_path / "imgs")]
    assert cli.main(args + ["--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ["generate", "--backbone", "show-o", "--model", tiny_show_o_base, "--prompts", str(tmp_path / "p.txt")]
    assert cli.main(args + ["--num-samples", "1", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "00000" / "samples" / "0000.png").is_file()


def test_cluster_tokenizer_codes_are_local_patch_contents(monkeypatch):
    """With the default method the decoder is trained on each 8 x 8 patch's own code: the same patch pixels get
    the same -1/+1 code wherever and in whatever scene they appear, different patches different codes."""
    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.pretrain import image_patches

    torch.manual_seed(0)
    vq = MAGVITv2(**TINY_VQ, z_channels=8)
    seen = []
    decoder_forward = vq.decoder.forward
    monkeypatch.setattr(vq.decoder, "forward", lambda q: seen.append(q.detach()) or decoder_forward(q))
    originals = []
    encoder_forward = vq.encoder.forward
    monkeypatch.setattr(vq.encoder, "forward", lambda x: originals.append(x) or encoder_forward(x))
    shapes_world.train_tokenizer(vq, steps=3, batch_size=8)
    codes = torch.cat([q.permute(0, 2, 3, 1).reshape(-1, q.shape[1]) for q in seen])
    patches = torch.cat([image_patches(x, 8) for x in originals])
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    by_patch = {}
    for patch, code in zip(patches, codes):
        by_patch.setdefault(tuple(patch.tolist()), set()).add(tuple(code.tolist()))
    assert len(by_patch) > 5 and all(len(c) == 1 for c in by_patch.values())
    assert len({next(iter(c)) for c in by_patch.values()}) == len(by_patch)
    with pytest.raises(ValueError, match="method"):
        shapes_world.train_tokenizer(vq, steps=1, method="kmeans")
