"""Janus-Pro's ShapesWorld default on tiny sizes: its processor and chat template, its VQ training, and the whole
path (pretrain a few steps, one DSR step, judged before/after) through the Python API and ``suder run``, then
``suder eval / caption / generate`` on the base."""

from __future__ import annotations

import functools
import importlib
import json

import pytest
import torch
import yaml

from suder.backbones.janus_pro import shapes_world as jsw
from suder.pretrain import image_patches as pretrain_image_patches
from suder.pretrain import patch_clusters as pretrain_patch_clusters

pretrain_mod = importlib.import_module("suder.pretrain")
TINY_BUILD = dict(
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
    vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0),
    vq=dict(base_channels=32, latent_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=0, num_embeddings=64),
    tokenizer_steps=2,
    tokenizer_batch_size=4,
)


PRESET = jsw.recipe().preset
BASE_SEED = jsw.recipe().pretrain["seed"]
STEPS_TO_ASSIGN = 300


def tiny_recipe():
    return pretrain_mod.ShapesRecipe(
        build=functools.partial(jsw.build_shapes_base, **TINY_BUILD),
        version="tiny-test",
        pretrain=dict(steps=2, seed=BASE_SEED, batch_size=4, lr=1e-3, warmup_steps=1),
        preset=PRESET,
    )


# ------------------------------------------------------------------------------------------ processor
def _chat(processor, messages, gen=True):
    return processor.apply_chat_template(messages, add_generation_prompt=gen)


def test_chat_template_formats_turns_like_the_released_processors():
    """Expected strings written by hand from DeepSeek's SFT format as the released processors render it."""
    p = jsw.shapes_processor()
    user = {"role": "user", "content": [{"type": "text", "text": " a red circle "}]}
    assert _chat(p, [user]) == "<|User|>: a red circle\n\n<|Assistant|>:"
    caption = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
    assert _chat(p, [caption]) == "<|User|>: <image_placeholder>\nDescribe this image.\n\n<|Assistant|>:"
    two = {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}
    assert _chat(p, [two, answer], gen=False) == "<|User|>: x y\n\n<|Assistant|>: ok"
    system = {"role": "system", "content": [{"type": "text", "text": "sys"}]}
    empty = {"role": "assistant", "content": [{"type": "text", "text": ""}]}
    late = {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image"}]}
    assert _chat(p, [system, late, empty], gen=False) == (
        f"System: sys{jsw.EOS_TOKEN}<|User|>: x\n<image_placeholder>\n\n<|Assistant|>:"
    )
    assert _chat(p, [user, answer, user]).count(jsw.EOS_TOKEN) == 1  # the assistant turn ends in EOS


def test_processor_has_one_token_per_word_and_the_real_prompt_layout():
    from PIL import Image

    from suder.worlds import shapes

    p = jsw.shapes_processor()
    words = " ".join(shapes.VOCAB_WORDS)
    assert len(p.tokenizer.tokenize(" " + words)) == len(shapes.VOCAB_WORDS)
    assert p.tokenizer("a")["input_ids"][0] == jsw.BOS and p.tokenizer.padding_side == "left"
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
    text = _chat(p, [turn])
    ids = p(text=[text], images=[Image.new("RGB", (32, 32))], return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(jsw.IMG) == 16 and ids[0] == jsw.BOS
    assert p.tokenizer.decode(ids[1:5]) == "You are a helpful"  # the default system prompt, word by word


# ------------------------------------------------------------------------------------------ VQ model
def test_patch_clusters_are_the_distinct_quarter_objects_or_their_k_means():
    """At stride 8 a ShapesWorld patch is empty or one quarter (4 corners) of one of 6 x 3 objects: 73 patches."""
    from suder.worlds import shapes

    distinct = pretrain_patch_clusters(256, 8)
    assert distinct.shape == (1 + 4 * len(shapes.COLORS) * len(shapes.SHAPES), 3 * 8 * 8)
    assert (distinct == -1).all(-1).sum() == 1  # the empty (black) patch is one of them
    assert torch.equal(pretrain_patch_clusters(256, 8), distinct)  # deterministic
    few = pretrain_patch_clusters(16, 8)  # fewer codes than patches: k-means centres, each one some patches' mean
    assert few.shape == (16, 192)
    assign = torch.cdist(distinct, few).argmin(-1)
    assert assign.unique().numel() == 16


def test_vq_training_lowers_the_loss_and_leaves_a_unit_codebook():
    from transformers.models.janus.modeling_janus import JanusVQVAE

    cfg = jsw.shapes_config(64, vq=TINY_BUILD["vq"]).vq_config
    assert cfg.num_patches == 4  # 4 x 4 codes at 32 px, 2 x 2 per quadrant
    torch.manual_seed(0)
    vq = JanusVQVAE(cfg)
    losses = jsw.train_tokenizer(vq, steps=12, batch_size=8, lr=3e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert not any(p.requires_grad for p in vq.parameters()) and not vq.training


def test_trained_encoder_gives_each_patch_its_cluster_code():
    """The tokenizer's codes are the patch clusters: after training, transformers' ``encode`` of held-out
    scenes gives each 8 x 8 patch the code of its cluster (the plain VQ-VAE objective had no such target)."""
    from transformers.models.janus.modeling_janus import JanusVQVAE

    from suder.worlds import shapes

    cfg = jsw.shapes_config(64, vq={**TINY_BUILD["vq"], "num_embeddings": 80}).vq_config
    torch.manual_seed(0)
    vq = JanusVQVAE(cfg)
    jsw.train_tokenizer(vq, steps=STEPS_TO_ASSIGN, batch_size=8, lr=5e-3)
    x = jsw._pixels([shapes.render(s) for s in shapes.sample_scenes(32, seed=999)])
    target = torch.cdist(pretrain_image_patches(x, 8), pretrain_patch_clusters(80, 8)).argmin(-1)
    assert (vq.encode(x).image_tokens.view(-1) == target).float().mean() > 0.95


def test_transformers_encode_picks_the_codes_training_used():
    """The stored codebook is normalised, so transformers' un-normalised nearest-code search equals training's
    search on the sphere (without normalising, the two disagree)."""
    from transformers.models.janus.modeling_janus import JanusVQVAE

    cfg = jsw.shapes_config(64, vq=TINY_BUILD["vq"]).vq_config
    torch.manual_seed(0)
    vq = JanusVQVAE(cfg)
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(torch.rand(cfg.num_embeddings, 1) * 3)  # uneven norms
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    codes = jsw._codes(vq, x)
    assert not torch.equal(vq.encode(x).image_tokens.view(-1), codes)
    jsw.normalize_codebook(vq)
    assert torch.equal(vq.encode(x).image_tokens.view(-1), codes)


# ------------------------------------------------------------------------------------------ the whole path
@pytest.fixture(scope="module")
def tiny_janus_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("janus-base")
    events = []
    result = pretrain_mod.pretrain("janus-pro", out=str(out), steps=2, batch_size=4, warmup_steps=1, seed=0,
                                   callback=events.append, **TINY_BUILD)
    return str(out), result, events


def test_pretrain_trains_the_vision_encoder_and_counts_tokenizer_steps(tiny_janus_base):
    _, result, events = tiny_janus_base
    assert [e["phase"] for e in events] == ["tokenizer"] * 2 + ["model"] * 2
    assert [e["step"] for e in events] == [1, 2, 3, 4] and {e["total_steps"] for e in events} == {4}
    assert result.model.freeze_vision_encoder  # saved frozen for self-improvement ...
    # ... but it trained: pre-training moved SigLIP (random init otherwise)
    torch.manual_seed(0)
    fresh = jsw.build_shapes_base(**TINY_BUILD).model.model.vision_model.state_dict()
    trained = result.model.model.model.vision_model.state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)


def test_the_base_loads_back_and_is_judged(tiny_janus_base):
    from suder import load_backbone
    from suder.evaluate import evaluate

    path, _, _ = tiny_janus_base
    model = load_backbone("janus-pro", model=path)
    assert model.num_image_tokens == 16 and model.guidance_scale == jsw.SHAPES_GUIDANCE
    assert model.max_caption_tokens == 24 and model.freeze_vision_encoder
    assert model.processor.tokenizer.chat_template or model.processor.chat_template == jsw.CHAT_TEMPLATE
    image = model.sample_image(["a red circle"], generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    result = evaluate(model, num=8, batch=8)
    assert result["t2i"]["n"] == 8 and result["caption_greedy"]["n"] == 8
    from suder.worlds import shapes

    tokenizer = jsw.reconstruction_accuracy(model, num=8)
    scenes = shapes.sample_scenes(8, seed=999)  # the helper's held-out scenes, through the model's own VQ
    codes = model.encode_images([shapes.render(x) for x in scenes])
    read = sum(shapes.parse_image(im) == x for im, x in zip(model.decode_images(codes), scenes, strict=True))
    assert tokenizer == {"scenes": read / 8, "codes_used": int(codes.unique().numel())}


def test_dsr_on_the_base_runs_and_reports_the_judge_table(tiny_janus_base, tmp_path):
    import suder

    path, _, _ = tiny_janus_base
    result = suder.train("janus-pro", model=path, steps=1, group_size=2, gen_batch_size=2, und_batch_size=2,
                         eval_num=8, output_dir=str(tmp_path / "run"))
    assert set(result.before) >= {"t2i", "caption_greedy"} and set(result.after) >= {"t2i", "caption_greedy"}
    assert result.metrics and "gen/reward_mean" in result.metrics[0] and "und/reward_mean" in result.metrics[0]


def test_suder_run_janus_pro_builds_its_base_and_caches_it(monkeypatch, tmp_path, capsys):
    from suder import cli
    from suder.config import resolve

    monkeypatch.setattr(jsw, "recipe", tiny_recipe)
    assert resolve(backbone="janus-pro").shapes_world  # no --prompts needed: its ShapesWorld default
    args = ["run", "--backbone", "janus-pro", "--steps", "1", "--group-size", "2", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "8", "--output-dir", str(tmp_path / "r")]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "before" in out.out and "after" in out.out
    base = pretrain_mod.cache_dir() / f"janus-pro-base-tiny-test-steps2-seed{BASE_SEED}"
    assert json.loads((base / "pretrain.json").read_text())["backbone"] == "janus-pro"
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())  # what ran: the recipe's preset
    assert config["guidance_scale"] == 2.0 and config["cfg_policy"] == "guided"
    assert (config["gen"]["reward_scorer"], config["und"]["reward_scorer"]) == ("policy", "frozen")
    assert config["gen"]["group_size"] == 2  # --group-size 2 decides both directions over the preset's 16
    # the final model samples at the run's scale; the base keeps its own
    assert json.loads((tmp_path / "r" / "run.json").read_text())["guidance_scale"] == 2.0
    assert json.loads((tmp_path / "r" / "before.json").read_text())["base_guidance"]["guidance_scale"] == 1.0
    assert (base / "config.json").is_file() and (base / "suder_janus.json").is_file()


def test_cli_eval_caption_generate_on_the_base(tiny_janus_base, tmp_path, capsys):
    from suder import cli
    from suder.worlds import shapes

    path, _, _ = tiny_janus_base
    assert cli.main(["eval", "--backbone", "janus-pro", "--model", path, "--num", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["t2i"]["n"] == 4
    shapes.export(3, 0, tmp_path / "imgs")
    out = tmp_path / "caps.jsonl"
    args = ["caption", "--backbone", "janus-pro", "--model", path, "--images", str(tmp_path / "imgs")]
    assert cli.main(args + ["--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ["generate", "--backbone", "janus-pro", "--model", path, "--prompts", str(tmp_path / "p.txt")]
    assert cli.main(args + ["--num-samples", "1", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "00000" / "samples" / "0000.png").is_file()


def test_run_defaults_yield_to_what_the_user_passes():
    """The ShapesWorld run defaults (guidance 2, captions scored by the frozen base) apply only where the user
    passed nothing: `--reward-scorer policy` means both directions, as it does on every other backbone."""
    from suder.config import resolve

    cfg = resolve(backbone="janus-pro")
    assert (cfg.guidance_scale, cfg.cfg_policy, cfg.gen.reward_scorer, cfg.und.reward_scorer) == (
        2.0, "guided", "policy", "frozen")
    assert resolve(backbone="janus-pro", reward_scorer="policy").und.reward_scorer == "policy"
    assert resolve(backbone="janus-pro", reward_scorer="frozen").gen.reward_scorer == "frozen"
    assert resolve(backbone="janus-pro", und_reward_scorer="policy").und.reward_scorer == "policy"
    assert resolve(backbone="janus-pro", guidance_scale=1.0).guidance_scale == 1.0
    # 16 images per prompt, 8 captions per image, unless the user says: --group-size decides both directions
    assert (cfg.group_size, cfg.gen.group_size, cfg.und.group_size) == (8, 16, 8)
    given = resolve(backbone="janus-pro", group_size=4)
    assert (given.gen.group_size, given.und.group_size) == (4, 4)
    assert resolve(backbone="janus-pro", gen_group_size=8).gen.group_size == 8
    assert resolve(backbone="janus-pro", und_group_size=4).gen.group_size == 16
    real = resolve(backbone="janus-pro", model="deepseek-community/Janus-Pro-1B", prompts="p.txt", images="i")
    assert real.und.reward_scorer == "policy" and real.guidance_scale is None  # released checkpoints: the paper's
