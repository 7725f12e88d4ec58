"""The show-o backbone on tiny random configs (CPU, offline): release key layout, checkpoint round trips,
float32 rotary frequencies under bf16, universal prompting and omni-attention masks on worked examples, the
MaskGIT sampler (greedy at temperature 0), the one-step image estimator and its two perturbations (image
re-masking, prompt drop), exact caption log-probs over the text or the full vocabulary, the CLIP-ViT
understanding path, gradients, the trainer in every strategy, and the one-line errors when weights are missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from show_o_tiny import (  # noqa: E402
    tiny_backbone,
    tiny_clip_backbone,
    tiny_clip_parts,
    tiny_images,
    tiny_parts,
    tiny_tokenizer,
)

from suder.backbones.show_o import expected_state_dict_shapes  # noqa: E402
from suder.backbones.show_o.prompting import (  # noqa: E402
    SPECIAL_TOKENS,
    ShowoTokens,
    add_special_tokens,
    mmu_attention_mask,
    t2i_attention_mask,
    t2i_sequences,
    t2i_text_block,
)
from suder.errors import BackboneError  # noqa: E402
from suder.protocol import ImageSamples, TextSamples, UnifiedLMM, check_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RELEASED = SimpleNamespace(
    llm_vocab_size=50295,
    num_new_special_tokens=10,
    vocab_size=58498,
    codebook_size=8192,
    max_text_len=128,
    num_vq_tokens=256,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread avoids OpenMP hand-offs that cost ~8 ms per op on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """Shared, read-only tiny backbone (tests that train build their own)."""
    return tiny_backbone()


# --------------------------------------------------------------------------------------------- release layout
def release_table(w_clip_vit: bool = False) -> dict[str, tuple[int, ...]]:
    """The released checkpoints' key table (showlab/show-o, pytorch_model.safetensors), written out."""
    h, v = 2048, 58498
    table = {"showo.model.embed_tokens.weight": (v, h)}
    for n in range(24):
        p = f"showo.model.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            table[p + f"self_attn.{proj}.weight"] = (h, h)
            table[p + f"self_attn.{proj}.bias"] = (h,)
        for norm in ("q_layernorm", "k_layernorm"):
            table[p + f"self_attn.{norm}.weight"] = table[p + f"self_attn.{norm}.bias"] = (64,)
        table[p + "mlp.fc1.weight"], table[p + "mlp.fc1.bias"] = (8192, h), (8192,)
        table[p + "mlp.fc2.weight"], table[p + "mlp.fc2.bias"] = (h, 8192), (h,)
        table[p + "input_layernorm.weight"] = table[p + "input_layernorm.bias"] = (h,)
    table["showo.model.final_layernorm.weight"] = table["showo.model.final_layernorm.bias"] = (h,)
    table["showo.lm_head.weight"], table["showo.lm_head.bias"] = (v, h), (v,)
    if w_clip_vit:
        table |= {
            "mm_projector.0.weight": (h, 1024),
            "mm_projector.0.bias": (h,),
            "mm_projector.2.weight": (h, h),
            "mm_projector.2.bias": (h,),
        }
    return table


def test_full_size_state_dict_matches_the_release_table():
    shapes = expected_state_dict_shapes()
    assert shapes == release_table()
    assert len(shapes) == 437 and sum(math.prod(s) for s in shapes.values()) == 1_448_176_770
    clip = expected_state_dict_shapes("showlab/show-o-w-clip-vit")
    assert clip == release_table(w_clip_vit=True)
    assert len(clip) == 441 and sum(math.prod(s) for s in clip.values()) == 1_454_472_322
    assert expected_state_dict_shapes("showlab/show-o-512x512") == release_table()


def test_full_size_magvit_matches_the_release():
    shapes = expected_state_dict_shapes("showlab/magvitv2")
    buffers = {"quantize.embedding": (8192, 13), "quantize.power_vals": (13,)}
    assert len(shapes) == 382 and {k: shapes[k] for k in buffers} == buffers
    assert sum(math.prod(s) for k, s in shapes.items() if k not in buffers) == 95_387_004

    def blocks(side: str, level: int) -> int:
        return len({k.split(".")[4] for k in shapes if k.startswith(f"{side}.{level}.block.")})

    assert [blocks("encoder.down", i) for i in range(5)] == [4, 3, 4, 3, 4]
    assert [blocks("decoder.up", i) for i in range(5)] == [4, 4, 3, 4, 3]
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.3.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert {k.split(".")[2] for k in shapes if ".downsample." in k} == {"0", "1", "2", "3"}
    assert {k.split(".")[2] for k in shapes if ".upsample." in k} == {"1", "2", "3", "4"}
    assert shapes["encoder.conv_out.weight"] == (13, 512, 3, 3) and shapes["encoder.quant_conv.weight"] == (
        13,
        13,
        1,
        1,
    )
    assert shapes["decoder.post_quant_conv.weight"] == (13, 13, 1, 1) and shapes["decoder.conv_in.weight"] == (
        512,
        13,
        3,
        3,
    )
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)


def test_released_config_files_build_without_warnings(tmp_path, caplog):
    from accelerate import init_empty_weights

    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.backbones.show_o.modeling import Showo

    released = {
        "_class_name": "Showo",
        "_diffusers_version": "0.30.1",
        "codebook_size": 8192,
        "llm_model_path": "microsoft/phi-1_5",
        "llm_vocab_size": 50295,
        "mask_token_id": 58497,
        "num_vq_tokens": 256,
        "vocab_size": 58498,
        "w_clip_vit": False,
    }
    (tmp_path / "showo").mkdir()
    (tmp_path / "showo" / "config.json").write_text(json.dumps(released))
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text('{"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}')
    with caplog.at_level("WARNING"), init_empty_weights():
        showo = Showo.from_config(Showo.load_config(str(tmp_path / "showo")))
        vq = MAGVITv2.from_config(MAGVITv2.load_config(str(tmp_path / "vq")))
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    assert {k: tuple(t.shape) for k, t in showo.state_dict().items()} == release_table()
    assert showo.config.mask_token_id == 58497 and showo.image_offset == 50305
    assert len(vq.state_dict()) == 382 and vq.downsample_factor == 16 and vq.codebook_size == 8192
    with pytest.raises(ValueError, match="vocab_size"):
        Showo.from_config({**released, "vocab_size": 58497})


# --------------------------------------------------------------------------------------------- checkpoints
def test_showlab_checkpoint_round_trip(tmp_path):
    from safetensors import safe_open

    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.backbones.show_o.modeling import Showo

    showo, vq, _ = tiny_parts(seed=1)
    showo.save_pretrained(tmp_path / "showo")
    vq.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "showo").iterdir()) == [
        "config.json",
        "pytorch_model.safetensors",
    ]
    with safe_open(str(tmp_path / "showo" / "pytorch_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    ids = torch.randint(0, showo.config.vocab_size, (2, 12))
    loaded = Showo.from_pretrained(tmp_path / "showo")
    assert torch.equal(loaded(ids), showo(ids))
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    vq2 = MAGVITv2.from_pretrained(tmp_path / "vq")
    assert torch.equal(vq2.get_code(pixels), vq.get_code(pixels))
    assert torch.equal(vq2.decode_code(vq.get_code(pixels)), vq.decode_code(vq.get_code(pixels)))
    # strict on missing keys, lenient on unexpected ones (as showlab's loader)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "showo" / "pytorch_model.safetensors"))
    save_file(state | {"mlm_ln.weight": torch.ones(3)}, str(tmp_path / "showo" / "pytorch_model.safetensors"))
    Showo.from_pretrained(tmp_path / "showo")
    del state["showo.lm_head.bias"]
    save_file(state, str(tmp_path / "showo" / "pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.bias"):
        Showo.from_pretrained(tmp_path / "showo")


def test_backbone_save_then_load_backbone(tmp_path, model):
    from suder import load_backbone

    model.save_pretrained(tmp_path / "ckpt")
    again = load_backbone("show-o", model=str(tmp_path / "ckpt"), device="cpu")
    assert again.guidance_scale == model.guidance_scale == 1.5 and again.settings.max_caption_tokens == 8
    assert again.tokens == model.tokens
    s = model.sample_image(["a red square"], num_samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again.logp_image_given_text(s, s.prompts).values, s.logps, atol=1e-6)
    images = tiny_images(2)
    a = model.logp_text_given_image(["a cat", "two red squares"], images).values
    assert torch.allclose(again.logp_text_given_image(["a cat", "two red squares"], images).values, a, atol=1e-6)
    half = load_backbone("show-o", model=str(tmp_path / "ckpt"), device="cpu", dtype="bfloat16")
    assert half.model.showo.lm_head.weight.dtype == torch.bfloat16 and half.vq.quantize.power_vals.dtype == torch.long
    s16 = half.sample_image(["a red square"], num_samples=2, generator=torch.Generator().manual_seed(0))
    assert s16.logps.dtype == torch.float32 and bool(torch.isfinite(s16.logps).all())
    # explicit options override the saved settings
    assert load_backbone("show-o", model=str(tmp_path / "ckpt"), device="cpu", guidance_scale=0.0).guidance_scale == 0


def _rope_reference(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) in bfloat16 of the GPT-NeoX rotary angles ``positions x inv_freq`` computed in float32."""
    angles = positions[..., None].float() * inv_freq.float()
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def test_bfloat16_keeps_rotary_frequencies_in_float32(tmp_path):
    """A bf16 cast must not round ``inv_freq`` (showlab keeps it in float32): the angles at position 1154 (the
    last of a 512 px sequence) equal float32's, and a bf16 forward's cos/sin come from the float32
    frequencies."""
    from suder.backbones.show_o.modeling import Showo

    showo, _, _ = tiny_parts(seed=1)
    want = showo.showo.model.rotary_emb.inv_freq.clone()
    assert want.dtype == torch.float32
    showo.save_pretrained(tmp_path / "showo")
    loaded = Showo.from_pretrained(tmp_path / "showo", torch_dtype=torch.bfloat16)
    for model in (loaded, tiny_parts(seed=1)[0].to(torch.bfloat16), tiny_parts(seed=1)[0].bfloat16().float()):
        rotary = model.showo.model.rotary_emb
        for buffer in (rotary.inv_freq, rotary.original_inv_freq):
            assert buffer.dtype == torch.float32 and torch.equal(buffer, want)
    rotary = loaded.showo.model.rotary_emb
    assert loaded.showo.lm_head.weight.dtype == torch.bfloat16
    position = torch.tensor([[1154]])
    assert torch.equal(position[..., None] * rotary.inv_freq, position[..., None] * want)
    rounded = (position[..., None] * want.to(torch.bfloat16).float() - position[..., None] * want).abs().max()
    assert rounded > 0.05  # what a rounded inv_freq would cost at this position (the test can fail)
    cos, sin = rotary(torch.zeros(1, 1, 4, dtype=torch.bfloat16), position)
    assert cos.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip((cos, sin), _rope_reference(want, position)))
    # inside a real bf16 forward over 1160 positions
    seen = []
    handle = rotary.register_forward_hook(lambda module, args, out: seen.append(out))
    ids = torch.randint(0, loaded.config.llm_vocab_size, (1, 1160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded.hidden_states(ids)
    handle.remove()
    positions = torch.arange(1160)[None]
    ref_cos, ref_sin = _rope_reference(want, positions)
    assert seen and torch.equal(seen[0][0], ref_cos) and torch.equal(seen[0][1], ref_sin)
    bad_cos, _ = _rope_reference(want.to(torch.bfloat16), positions)
    assert not torch.equal(bad_cos, ref_cos)


# --------------------------------------------------------------------------------------------- prompting
def test_released_token_ids_and_text_block():
    tok = ShowoTokens.from_config(RELEASED, bos=50256, eos=50256)
    assert (tok.pad, tok.soi, tok.eoi, tok.t2i, tok.mmu, tok.image_offset, tok.mask) == (
        50295,
        50296,
        50297,
        50300,
        50301,
        50305,
        58497,
    )
    block = t2i_text_block([1000, 2000], tok)
    assert block == [50295] * 124 + [50300, 50256, 1000, 2000, 50256] and len(block) == 129
    assert t2i_text_block([], tok) == [50295] * 126 + [50300, 50256, 50256]
    assert t2i_text_block([50256, 7], tok)[-3:] == [50256, 7, 50256]  # no second bos
    long = t2i_text_block(list(range(200)), tok)
    assert long == [50300, 50256, *range(126), 50256]
    seq = t2i_sequences([[1000]], torch.full((1, 256), tok.mask), tok)
    assert seq.shape == (1, 387) and seq[0, 129] == 50296 and seq[0, 386] == 50297 and seq[0, 130] == 58497


def test_tokenizer_gets_showo_special_tokens():
    tokenizer = tiny_tokenizer()
    base = len(tokenizer)
    add_special_tokens(tokenizer, base)
    assert tokenizer.convert_tokens_to_ids(["[PAD]", *SPECIAL_TOKENS]) == list(range(base, base + 10))
    assert tokenizer.pad_token_id == base and len(tokenizer) == base + 10
    add_special_tokens(tokenizer, base)  # idempotent
    assert len(tokenizer) == base + 10
    with pytest.raises(ValueError, match="expects"):
        add_special_tokens(tiny_tokenizer(), base + 1)


def _rows(mask: torch.Tensor) -> list[str]:
    return ["".join("1" if x else "." for x in row) for row in mask.tolist()]


def test_t2i_mask_worked_example():
    """P P t2i bos x eos soi i i i i eoi: pads causal among pads, text causal without pads, image rows see all
    non-pad columns (showlab's ``create_attention_mask_predict_next`` with ``rm_pad_in_image``)."""
    tok = replace(ShowoTokens.from_config(RELEASED, bos=50256, eos=50256), max_text_len=5)
    ids = t2i_sequences([[1]], torch.full((1, 4), tok.mask), tok)
    assert ids[0, :6].tolist() == [tok.pad, tok.pad, tok.t2i, 50256, 1, 50256]
    assert _rows(t2i_attention_mask(ids, tok)[0, 0]) == [
        "1...........",
        "11..........",
        "..1.........",
        "..11........",
        "..111.......",
        "..1111......",
        "..1111111111",
        "..1111111111",
        "..1111111111",
        "..1111111111",
        "..1111111111",
        "..1111111111",
    ]


def test_mmu_mask_worked_example():
    """mmu soi i i eoi bos a b eos pad pad: prefix bidirectional, then causal."""
    tok = ShowoTokens.from_config(RELEASED, bos=50256, eos=50256)
    ids = torch.tensor([[tok.mmu, tok.soi, 50305, 50306, tok.eoi, 50256, 5, 6, 50256, tok.pad, tok.pad]])
    assert _rows(mmu_attention_mask(ids, tok)[0, 0]) == [
        "11111......",
        "11111......",
        "11111......",
        "11111......",
        "11111......",
        "111111.....",
        "1111111....",
        "11111111...",
        "111111111..",
        "1111111111.",
        "11111111111",
    ]


def test_pads_do_not_change_image_logits(model):
    """Non-pad tokens never see pads and RoPE is relative: a longer text block gives the same image logits."""
    tok = model.tokens
    text = [model._encode("a red square")]
    image = torch.full((1, tok.num_image_tokens), tok.mask)
    image[0, :5] = torch.arange(5) + tok.image_offset
    out = []
    for width in (tok.max_text_len, tok.max_text_len + 9):
        t = replace(tok, max_text_len=width)
        ids = t2i_sequences(text, image, t)
        with torch.no_grad():
            out.append(model._image_logits(ids, t2i_attention_mask(ids, t), False, 0.0))
    assert torch.allclose(out[0], out[1], atol=1e-5)


# --------------------------------------------------------------------------------------------- MaskGIT
def test_protocol_conformance(model):
    assert isinstance(model, UnifiedLMM) and model.name == "show-o"
    check_backbone(model)
    s = model.sample_image(["a red square", "two cats"], num_samples=3, generator=torch.Generator().manual_seed(0))
    assert isinstance(s, ImageSamples) and s.prompts == ["a red square"] * 3 + ["two cats"] * 3
    assert s.tokens.shape == s.logps.shape == (6, 16) and s.tokens.dtype == torch.long
    assert int(s.tokens.min()) >= 0 and int(s.tokens.max()) < 64
    assert len(s.images) == 6 and s.images[0].size == (16, 16) and s.guidance_scale == 1.5
    t = model.sample_text(s, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(t, TextSamples) and len(t) == 12 and isinstance(t.images, ImageSamples)
    assert torch.equal(t.images.tokens, s.tokens.repeat_interleave(2, 0))


def test_maskgit_is_deterministic_for_a_seed(model):
    def sample(seed):
        return model.sample_image(
            ["a red square", "a cat"], num_samples=2, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = sample(3), sample(3), sample(4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.tokens, c.tokens)


def test_maskgit_schedule_keeps_decoded_tokens_and_compounds_temperature(monkeypatch):
    """N = 16, T = 4, cosine: 16, floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11, floor(16 cos(3pi/8)) = 6
    positions are masked at the four forwards; the re-masking temperature is 1 * .75, * .5, * .25, * 0."""
    from suder.backbones.show_o import sampling

    seen, temps = [], []
    real = sampling.mask_by_random_topk

    def spy(mask_len, probs, temperature, generator):
        temps.append(temperature)
        return real(mask_len, probs, temperature, generator)

    monkeypatch.setattr(sampling, "mask_by_random_topk", spy)
    logits = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))

    def image_logits(codes):
        seen.append(codes.clone())
        return logits

    out = sampling.maskgit_sample(
        image_logits, torch.full((2, 16), -1), steps=4, generator=torch.Generator().manual_seed(1)
    )
    assert [int((c < 0).sum(-1)[0]) for c in seen] == [16, 14, 11, 6]
    assert all(int((c < 0).sum(-1)[1]) == int((c < 0).sum(-1)[0]) for c in seen)
    assert temps == pytest.approx([0.75, 0.375, 0.09375, 0.0])
    for codes in seen:  # a decoded token is never changed again
        known = codes >= 0
        assert torch.equal(out[known], codes[known])
    assert out.shape == (2, 16) and int(out.min()) >= 0 and int(out.max()) < 8
    # RNG order: the first draw is one multinomial over the B*N rows from the generator as given
    first = torch.multinomial(torch.softmax(logits, -1).reshape(-1, 8), 1, generator=torch.Generator().manual_seed(1))
    decoded = seen[1] >= 0
    assert torch.equal(seen[1][decoded], first.view(2, 16)[decoded])


def test_guidance_combines_cond_and_uncond_in_one_batch(model):
    """policy="guided" = log_softmax((1 + g) cond - g uncond) over the image columns, where cond and uncond
    come from separate forwards of the prompt and of "" (the sampler batches them)."""
    from suder.backbones.show_o.prompting import t2i_attention_mask, t2i_sequences

    tok, g = model.tokens, 1.5
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "two cats"]
    with torch.no_grad():
        lp = model.logp_image_given_text(codes, prompts, policy="guided", guidance_scale=g)
        parts = []
        for texts in ([model._encode(p) for p in prompts], [[], []]):
            ids = t2i_sequences(texts, torch.full_like(codes, tok.mask), tok)
            logits = model.model(ids, t2i_attention_mask(ids, tok))[:, -17:-1, tok.image_offset : tok.mask]
            parts.append(logits)
    want = torch.log_softmax((1 + g) * parts[0] - g * parts[1], -1).gather(-1, codes[..., None]).squeeze(-1)
    assert torch.allclose(lp.values, want, atol=1e-5)
    cond = model.logp_image_given_text(codes, prompts, policy="cond")
    want_cond = torch.log_softmax(parts[0], -1).gather(-1, codes[..., None]).squeeze(-1)
    assert torch.allclose(cond.values, want_cond, atol=1e-5)
    assert (cond.values - lp.values).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------- image estimator
def test_sampled_image_logps_are_the_one_step_estimate(model):
    s = model.sample_image(["a red square", "a cat"], num_samples=2, generator=torch.Generator().manual_seed(5))
    lp = model.logp_image_given_text(s, s.prompts, guidance_scale=s.guidance_scale, temperature=0.7)
    assert lp.estimate and bool(lp.mask.all()) and lp.values.shape == (4, 16)
    assert (lp.values - s.logps).abs().max().item() <= 1e-5
    assert bool((lp.values <= 0).all())


def test_random_remasking(model):
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "c"]
    with torch.no_grad():
        a = model.logp_image_given_text(codes, prompts, remask_ratio=0.25, remask_seed=7)
        b = model.logp_image_given_text(codes, prompts, remask_ratio=0.25, remask_seed=7)
        c = model.logp_image_given_text(codes, prompts, remask_ratio=0.25, generator=torch.Generator().manual_seed(8))
    assert a.estimate and torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values)
    assert a.mask.sum(-1).tolist() == [4, 4, 4] and not torch.equal(a.mask, c.mask)
    assert bool((a.values[~a.mask] == 0).all()) and bool((a.values[a.mask] < 0).all())
    with pytest.raises(ValueError, match="remask_seed"):
        model.logp_image_given_text(codes, prompts, remask_ratio=0.5)


def test_prompt_drop_estimator(model):
    """SUDER A.4 / diffu-GRPO: each prompt token is dropped with probability ``prompt_drop``: it becomes the pad
    id (the filler of the unconditional prompt) and no other position sees it; seeded; 0 is the plain
    estimator; the uncond rows of guidance and the t2i/bos/eos markers are never touched."""
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    prompts = ["a red square to the left of a blue circle", "two green triangles above a white square", "a cat"]
    seen = []
    real = model.model.hidden_states

    def spy(ids, attention_mask=None, cache=None):
        seen.append((ids.clone(), attention_mask.clone()))
        return real(ids, attention_mask, cache)

    model.model.hidden_states = spy
    try:
        with torch.no_grad():
            plain = model.logp_image_given_text(codes, prompts)
            zero = model.logp_image_given_text(codes, prompts, prompt_drop=0.0, remask_seed=3)
            a = model.logp_image_given_text(codes, prompts, prompt_drop=0.5, remask_seed=3)
            b = model.logp_image_given_text(codes, prompts, prompt_drop=0.5, generator=torch.Generator().manual_seed(3))
            c = model.logp_image_given_text(codes, prompts, prompt_drop=0.5, remask_seed=4)
    finally:
        del model.model.hidden_states
    assert torch.equal(zero.values, plain.values) and torch.equal(seen[1][0], seen[0][0])
    assert a.values.shape == (3, 16) and a.estimate and bool(a.mask.all()) and bool((a.values < 0).all())
    assert torch.equal(a.values, b.values) and torch.equal(seen[2][0], seen[3][0])
    assert not torch.equal(a.values, c.values)
    tok, width = model.tokens, model.tokens.max_text_len + 1
    (ids0, mask0), (ids, mask) = seen[0], seen[2]
    rows = len(prompts)
    assert torch.equal(ids[rows:], ids0[rows:]) and torch.equal(mask[rows:], mask0[rows:])  # uncond rows
    dropped = ids[:rows] != ids0[:rows]
    assert dropped.any() and bool((ids[:rows][dropped] == tok.pad).all())
    assert not dropped[:, width:].any()  # the image part is never touched
    for r in range(rows):
        block = ids0[r, :width].tolist()
        first = block.index(tok.t2i) + 2
        slots = torch.zeros(ids.shape[1], dtype=torch.bool)
        slots[first : width - 1] = True
        assert bool((dropped[r] <= slots).all())  # only the prompt's own tokens, never t2i, bos or eos
        image_row = mask[r, 0, width + 1]
        assert not image_row[dropped[r]].any()  # nobody sees a dropped token ...
        kept = slots & ~dropped[r]
        assert bool(image_row[kept].all()) and bool(image_row[first - 2 : first].all())  # ... and the rest stays
    with pytest.raises(ValueError, match="prompt_drop"):
        model.logp_image_given_text(codes, prompts, prompt_drop=0.5)
    with pytest.raises(ValueError, match="prompt_drop"):
        model.logp_image_given_text(codes, prompts, prompt_drop=1.0, remask_seed=1)


def test_pil_images_are_vq_encoded(model):
    from suder.backbones.show_o.magvit import LFQuantizer, image_to_tensor

    images = tiny_images(2)
    x = image_to_tensor(images[0], 16)
    assert x.shape == (3, 16, 16) and -1 <= float(x.min()) and float(x.max()) <= 1
    codes = model.image_codes(images)
    assert torch.equal(codes, model.vq.get_code(torch.stack([image_to_tensor(i, 16) for i in images])))
    assert torch.equal(
        model.logp_image_given_text(images, ["a", "b"]).values,
        model.logp_image_given_text(codes, ["a", "b"]).values,
    )
    # LFQ: channel 0 is the most significant bit, zero counts as a 0 bit, lookup gives the signs back
    q = LFQuantizer(4)
    z = torch.tensor([1.0, -2.0, 0.0, 3.0]).view(1, 4, 1, 1)
    assert q.codes(z).item() == 0b1001
    assert torch.equal(q.lookup(q.codes(z), 1, 1).flatten(), torch.tensor([1.0, -1.0, -1.0, 1.0]))


# --------------------------------------------------------------------------------------------- captions
def test_sampled_text_logps_equal_teacher_forced():
    model = tiny_backbone(seed=3)
    with torch.no_grad():  # make <|endoftext|> likely so that captions of different lengths occur
        model.model.showo.lm_head.bias[model.tokens.eos] += 4.0
    t = model.sample_text(tiny_images(3), num_samples=2, generator=torch.Generator().manual_seed(2))
    assert t.images is not None and len(t.images) == 6 and not t.mask.all()  # some finished early
    tf = model.logp_text_given_image(t, t.images)
    assert not tf.estimate and torch.equal(tf.mask, t.mask)
    assert (tf.values - t.logps).abs().max().item() <= 1e-5
    hot = model.sample_text(tiny_images(3), num_samples=2, generator=torch.Generator().manual_seed(2), temperature=1.7)
    assert (model.logp_text_given_image(hot, hot.images, temperature=1.7).values - hot.logps).abs().max() <= 1e-5


def test_chat_caption_prompt():
    """With a question, captions follow ``bos USER: \\n{question} ASSISTANT:`` and start with a space."""
    m = tiny_backbone(seed=4, caption_prompt="What is in the image?")
    assert m._question == m._encode("USER: \nWhat is in the image? ASSISTANT:")
    t = m.sample_text(tiny_images(2), num_samples=2, generator=torch.Generator().manual_seed(0))
    assert (m.logp_text_given_image(t, t.images).values - t.logps).abs().max() <= 1e-5
    lp = m.logp_text_given_image(["a cat"], tiny_images(1))
    assert int(lp.mask.sum()) == len(m._encode(" a cat")) + 1


def test_temperature_zero_is_greedy(model):
    """suder's conformance check: temperature 0 is arg-max decoding in both directions."""
    from suder.testing import check_temperature_zero_is_greedy

    check_temperature_zero_is_greedy(model, ["a red square", "two cats"], tiny_images(2), num_samples=2)


def test_greedy_maskgit_takes_the_argmax_without_noise():
    """temperature 0: every position gets the arg-max code of the logits it was decoded under, no random
    number is drawn (the global RNG is untouched) and the re-masking order is the plain confidence order."""
    from suder.backbones.show_o import sampling

    logits = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def image_logits(codes):
        seen.append(codes.clone())
        return logits

    state = torch.random.get_rng_state()
    out = sampling.maskgit_sample(image_logits, torch.full((2, 16), -1), steps=4, temperature=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(out, logits.argmax(-1))
    confidence = torch.softmax(logits, -1).amax(-1)
    kept = seen[1] >= 0  # after step 1: exactly the 2 most confident positions of each row are decoded
    assert kept.sum(-1).tolist() == [2, 2]
    assert torch.equal(kept, confidence >= confidence.sort(-1, descending=True).values[:, 1:2])


def test_greedy_captions_ignore_the_seed(model):
    a = model.sample_text(tiny_images(2), temperature=0, generator=torch.Generator().manual_seed(0))
    b = model.sample_text(tiny_images(2), temperature=0, generator=torch.Generator().manual_seed(1))
    assert a.texts == b.texts and torch.equal(a.tokens, b.tokens)


def test_caption_logps_are_exact_causal_logps(model):
    """From strings: bos caption eos after the image prefix, normalised over the text columns."""
    tok = model.tokens
    images, captions = tiny_images(2), ["a red square", "two cats on a table"]
    lp = model.logp_text_given_image(captions, images)
    ids0 = model._encode(captions[0]) + [tok.eos]
    assert lp.mask.sum(-1).tolist() == [len(ids0), len(model._encode(captions[1])) + 1]
    prefix = [
        tok.mmu,
        tok.soi,
        *(model.image_codes(images[:1])[0] + tok.image_offset).tolist(),
        tok.eoi,
        tok.bos,
    ]
    ids = torch.tensor([prefix + ids0])
    with torch.no_grad():
        logits = model.model(ids, mmu_attention_mask(ids, tok))[0, len(prefix) - 1 : -1, : tok.text_vocab_size]
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids0)[:, None]).squeeze(-1)
    assert torch.allclose(lp.values[0, : len(ids0)], want, atol=1e-5)


def test_caption_logps_over_the_full_vocabulary():
    """``caption_logp_vocab="full"`` normalises over every column (Show-o's own), "text" over the text columns;
    sampled ``.logps`` equal the teacher-forced ones under either, and the draws are the same."""
    tok_model = tiny_backbone(seed=3)
    full_model = tiny_backbone(seed=3, caption_logp_vocab="full")
    tok = full_model.tokens
    images, captions = tiny_images(2), ["a red square", "two cats on a table"]
    text_lp = tok_model.logp_text_given_image(captions, images)
    full_lp = full_model.logp_text_given_image(captions, images)
    ids0 = full_model._encode(captions[0]) + [tok.eos]
    prefix = [tok.mmu, tok.soi, *(full_model.image_codes(images[:1])[0] + tok.image_offset).tolist(), tok.eoi, tok.bos]
    ids = torch.tensor([prefix + ids0])
    with torch.no_grad():
        logits = full_model.model(ids, mmu_attention_mask(ids, tok))[0, len(prefix) - 1 : -1]
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids0)[:, None]).squeeze(-1)
    assert logits.shape[-1] == full_model.model.config.vocab_size
    assert torch.allclose(full_lp.values[0, : len(ids0)], want, atol=1e-5)
    assert bool((full_lp.values[full_lp.mask] < text_lp.values[text_lp.mask]).all())
    for temperature in (1.0, 1.7, 0.0):
        gen = torch.Generator().manual_seed(2)
        t = full_model.sample_text(images, num_samples=2, generator=gen, temperature=temperature)
        u = tok_model.sample_text(
            images, num_samples=2, generator=torch.Generator().manual_seed(2), temperature=temperature
        )
        assert torch.equal(t.tokens, u.tokens)
        tf = full_model.logp_text_given_image(t, t.images, temperature=temperature)
        assert (tf.values - t.logps).abs().max() <= 1e-5
    with pytest.raises(BackboneError, match="caption_logp_vocab"):
        tiny_backbone(caption_logp_vocab="image")


def test_captions_are_decoded_with_showlab_whitespace_clean_up(model):
    """transformers 4.41 (Show-o's) cleaned up tokenization spaces when decoding; transformers 5 skips it for BPE
    tokenizers."""
    from suder.backbones.show_o.backbone import clean_up_spaces

    ids = model._encode("a red square . is it a cat ? it 's red , isn't it !")
    assert model.tokenizer.decode(ids, skip_special_tokens=True).count(" .") == 1  # the raw decode keeps them
    assert model._decode_caption(ids + [model.tokens.eos]) == "a red square. is it a cat? it's red, isn't it!"
    assert clean_up_spaces(" they 're here , we 've seen ' em , I 'm sure they can n't") == (
        " they're here, we've seen'em, I'm sure they cann't"
    )


def test_sampling_defaults_follow_the_readme_per_resolution():
    """Show-o's README: 256 px t2i with guidance 1.75 and 18 steps, 512 px with guidance 5 and 50 steps."""
    from suder.backbones.show_o.factory import from_parts
    from suder.backbones.show_o.modeling import Showo

    small = from_parts(*tiny_parts(), max_caption_tokens=8)
    assert small.resolution == 16 and (small.guidance_scale, small.settings.steps) == (1.75, 18)
    showo, vq, tokenizer = tiny_parts()
    wide = dict(showo.config) | {"num_vq_tokens": 128 * 128}  # 128 x 128 tokens x 4 px = 512 px, never run
    big = from_parts(Showo.from_config(wide), vq, tokenizer)
    assert big.resolution == 512 and (big.guidance_scale, big.settings.steps) == (5.0, 50)
    assert from_parts(*tiny_parts(), steps=7).settings.steps == 7


# --------------------------------------------------------------------------------------------- CLIP-ViT
def test_mmu_vit_mask_worked_example():
    """mmu sys soi [3 image vectors] eoi q: causal, image columns open to every row (also mmu, sys, soi)."""
    from suder.backbones.show_o.clip import mmu_vit_attention_mask

    assert _rows(mmu_vit_attention_mask(1, 8, 3, 3, "cpu")[0, 0]) == [
        "1..111..",
        "11.111..",
        "111111..",
        "111111..",
        "111111..",
        "111111..",
        "1111111.",
        "11111111",
    ]


def _clip_reference(m, images, caption_ids, head, tail):
    """log-probs of ``caption_ids`` over the text columns, computed by hand: CLIP penultimate-layer patch
    features -> mm_projector, spliced between ``head`` and ``tail`` ids, causal mask plus open image columns."""
    pixels = m.vision.processor(images=images, return_tensors="pt")["pixel_values"]
    features = m.vision.model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert features.shape == (len(images), 4, 16)
    embed = m.model.showo.model.embed_tokens
    x = torch.cat(
        [embed(torch.tensor([head])), m.model.mm_projector(features), embed(torch.tensor([tail + caption_ids]))], 1
    )
    length, start = x.shape[1], len(head)
    idx = torch.arange(length)
    allowed = (idx[:, None] >= idx[None, :]) | ((idx[None, :] >= start) & (idx[None, :] < start + 4))
    logits = m.model.showo(inputs_embeds=x, attention_mask=allowed[None, None]).logits[0]
    p = len(head) + 4 + len(tail)
    text = logits[p - 1 : p - 1 + len(caption_ids), : m.tokens.text_vocab_size]
    return torch.log_softmax(text, -1).gather(-1, torch.tensor(caption_ids)[:, None]).squeeze(-1)


def test_clip_vit_captions_come_from_clip_features():
    """show-o-w-clip-vit: ``<|mmu|> <|soi|> projected CLIP patches <|eoi|> caption \\n eos`` (llava-pretrain
    layout) without a question, and ``<|mmu|> SYSTEM <|soi|> patches <|eoi|> USER: q ASSISTANT: caption eos``
    with one; the MAGVIT tokenizer plays no part."""
    from show_o_tiny import TINY_VQ

    from suder.backbones.show_o.clip import SYSTEM_PROMPT
    from suder.backbones.show_o.magvit import MAGVITv2

    m = tiny_clip_backbone(seed=1)
    tok = m.tokens
    images = tiny_images(1)
    with torch.no_grad():
        lp = m.logp_text_given_image(["a red square"], images)
        ids = m._encode("a red square\n") + [tok.eos]
        want = _clip_reference(m, images, ids, [tok.mmu, tok.soi], [tok.eoi])
        assert lp.mask.sum().item() == len(ids) and torch.allclose(lp.values[0], want, atol=1e-5)
        torch.manual_seed(99)
        m.vq = MAGVITv2(**TINY_VQ).eval()  # another image tokenizer: captions must not change
        assert torch.equal(m.logp_text_given_image(["a red square"], images).values, lp.values)
        chat = tiny_clip_backbone(seed=1, caption_prompt="What is this?")
        lp = chat.logp_text_given_image(["a red square"], images)
        ids = chat._encode(" a red square") + [tok.eos]
        head = [tok.mmu, *chat._encode(SYSTEM_PROMPT), tok.soi]
        want = _clip_reference(chat, images, ids, head, [tok.eoi, *chat._encode("USER: What is this? ASSISTANT:")])
        assert torch.allclose(lp.values[0, : len(ids)], want, atol=1e-5)


def test_clip_vit_sampled_captions_and_training():
    m = tiny_clip_backbone(seed=2)
    with torch.no_grad():
        m.model.showo.lm_head.bias[m.tokens.eos] += 4.0
    s = m.sample_image(["a red square"], num_samples=2, generator=torch.Generator().manual_seed(0))
    t = m.sample_text(s, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert len(t) == 4 and torch.equal(t.images.tokens, s.tokens.repeat_interleave(2, 0))
    assert (m.logp_text_given_image(t, t.images).values - t.logps).abs().max() <= 1e-5  # KV cache == one pass
    from suder.testing import check_temperature_zero_is_greedy

    check_temperature_zero_is_greedy(m, ["a red square"], tiny_images(2), num_samples=2)
    und, gen = m.trainable_parameters("und"), m.trainable_parameters("gen")
    projector = {id(p) for p in m.model.mm_projector.parameters()}
    assert projector <= {id(p) for p in und} and not projector & {id(p) for p in gen}
    loss = -m.logp_text_given_image(["a cat", "a dog"], tiny_images(2)).mean().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.mm_projector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in m.vision.parameters())


def test_clip_vit_checkpoints_load_in_the_released_layout(tmp_path, monkeypatch):
    """Show-o folder (``w_clip_vit: true``, ``mm_projector.*`` keys) + a CLIP folder in transformers' layout, as
    showlab's inference loads them; a saved backbone brings its CLIP folder; without one it is a one-line
    error at load time."""
    import huggingface_hub.constants
    from safetensors import safe_open

    from suder.backbones.show_o.factory import build_show_o, from_parts

    showo, vision, vq, tokenizer = tiny_clip_parts(seed=3)
    showo.save_pretrained(tmp_path / "showo")
    vq.save_pretrained(tmp_path / "vq")
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    vision.save_pretrained(str(tmp_path / "clip"))
    assert json.loads((tmp_path / "showo" / "config.json").read_text())["w_clip_vit"] is True
    with safe_open(str(tmp_path / "showo" / "pytorch_model.safetensors"), "pt") as f:
        assert {k for k in f.keys() if k.startswith("mm_projector")} == {
            f"mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
        }
    kwargs = dict(model=str(tmp_path / "showo"), vq_model=str(tmp_path / "vq"), tokenizer=str(tmp_path / "tok"))
    loaded = build_show_o(**kwargs, vision_tower=str(tmp_path / "clip"), device="cpu", max_caption_tokens=8)
    reference = from_parts(showo, vq, tiny_tokenizer(), vision=vision)
    images = tiny_images(2)
    want = reference.logp_text_given_image(["a cat", "two red squares"], images).values
    assert torch.allclose(loaded.logp_text_given_image(["a cat", "two red squares"], images).values, want, atol=1e-6)
    loaded.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "clip_vit" / "preprocessor_config.json").is_file()
    again = build_show_o(model=str(tmp_path / "ckpt"), device="cpu")
    assert torch.allclose(again.logp_text_given_image(["a cat", "two red squares"], images).values, want, atol=1e-6)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneError) as err:
        build_show_o(**kwargs, device="cpu")
    assert "CLIP vision tower 'openai/clip-vit-large-patch14-336'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BackboneError, match="vision tower"):
        from_parts(showo, vq, tiny_tokenizer())


# --------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_trainable_parameter_and_never_the_vq():
    m = tiny_backbone(seed=2)
    images = tiny_images(2)
    loss = -(
        m.logp_image_given_text(images, ["a", "b"]).mean().sum()
        + m.logp_text_given_image(["a cat", "a dog"], images).mean().sum()
    )
    loss.backward()
    gen, und = m.trainable_parameters("gen"), m.trainable_parameters("und")
    assert {id(p) for p in gen} == {id(p) for p in und} == {id(p) for p in m.model.parameters()}
    names = {id(p): n for n, p in m.model.named_parameters()}
    dead = [names[id(p)] for p in gen if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, dead
    assert all(not p.requires_grad and p.grad is None for p in m.vq.parameters())
    with pytest.raises(ValueError):
        m.trainable_parameters("both")


# --------------------------------------------------------------------------------------------- loading & CLI
def test_missing_weights_fail_with_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from suder.backbones.show_o.factory import build_show_o

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneError) as err:
        build_show_o()
    msg = str(err.value)
    assert "'showlab/show-o'" in msg and "hf download showlab/show-o" in msg and "\n" not in msg
    with pytest.raises(BackboneError, match="no such folder"):
        build_show_o(model=str(tmp_path / "nothing-here"))
    with pytest.raises(BackboneError, match="Unknown show-o option"):
        build_show_o(guidance=3)
    # a saved folder without its VQ model names the VQ folder
    tiny_backbone().save_pretrained(tmp_path / "ckpt")
    for f in (tmp_path / "ckpt" / "magvitv2").iterdir():
        f.unlink()
    with pytest.raises(BackboneError, match="MAGVIT-v2 model"):
        build_show_o(model=str(tmp_path / "ckpt"))


def test_cli_run_without_weights_prints_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from suder.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "prompts.txt").write_text("a red square\n")
    (tmp_path / "images").mkdir()
    tiny_images(1)[0].save(tmp_path / "images" / "0.png")  # valid data: the missing weights are the error
    code = main(
        [
            "run",
            "--backbone",
            "show-o",
            "--model",
            "showlab/show-o",
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--images",
            str(tmp_path / "images"),
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "showlab/show-o" in err and "hf download" in err
    assert len(err.replace("\n", " ").split("Error:")) == 2 and "Traceback" not in err


def test_registered_and_cheap_to_import():
    code = (
        "import sys, suder.backbones.show_o as s; from suder.registry import backbones; "
        "assert 'show-o' in backbones(); "
        "assert not {'transformers', 'diffusers', 'accelerate'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_example_config_is_valid():
    from suder.backbones.show_o.backbone import ShowOSettings
    from suder.config import resolve

    path = ROOT / "examples" / "configs" / "show_o_simpo.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "suder run --config examples/configs/show_o_simpo.yaml" in first
    cfg = resolve(str(path))
    assert (cfg.backbone, cfg.model, cfg.algo, cfg.group_size, cfg.lr) == (
        "show-o",
        "showlab/show-o",
        "simpo",
        8,
        3e-6,
    )
    valid = {"vq_model", "tokenizer", "dtype", "device"} | set(ShowOSettings.__dataclass_fields__)
    assert set(cfg.backbone_options) <= valid


# ------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def show_o_data(tmp_path_factory):
    """Four prompts and four images (unpaired), the inputs of a real-backbone run."""
    root = tmp_path_factory.mktemp("show-o-data")
    (root / "prompts.txt").write_text("a red square\ntwo green triangles\na photo of a cat\na small dog\n")
    (root / "images").mkdir()
    for i, im in enumerate(tiny_images(4, seed=1)):
        im.save(root / "images" / f"{i}.png")
    return {"prompts": str(root / "prompts.txt"), "images": str(root / "images")}


@pytest.mark.parametrize("algo", ["simpo", "grpo"])
@pytest.mark.parametrize("strategy", ["unified", "gen", "und", "separate"])
def test_trainer_runs_two_steps(tmp_path, show_o_data, algo, strategy):
    import suder

    bb = tiny_backbone()
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    res = suder.train(
        bb,
        algo=algo,
        strategy=strategy,
        steps=2,
        group_size=2,
        gen_batch_size=2,
        und_batch_size=2,
        grad_accum=1,
        switch_every=1,
        lr=1e-3,
        sample_every=1,
        save_every=0,
        output_dir=str(tmp_path / "run"),
        **show_o_data,
    )
    assert len(res.metrics) == 2
    losses = [v for m in res.metrics for k, v in m.items() if k.endswith("/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    if strategy in ("unified", "gen", "separate"):
        assert res.metrics[0]["gen/logp_estimate"] == 1.0  # the image log-likelihood is an estimate
    directions = {"unified": ("gen", "und"), "separate": ("gen",)}.get(strategy, (strategy,))
    trained = {id(p) for d in directions for p in bb.trainable_parameters(d)}
    changed = [n for n, p in bb.named_parameters() if id(p) in trained and not torch.equal(p, before[n])]
    assert changed, "no trained parameter changed"
    for name, p in bb.named_parameters():
        if "vq" in name.split(".")[0]:
            assert torch.equal(p, before[name]), f"{name} changed"


@pytest.mark.parametrize("perturbation", [{"remask_ratio": 0.5}, {"prompt_drop": 0.3}])
def test_grpo_remasking_uses_a_fresh_mask_per_inner_iteration(tmp_path, show_o_data, monkeypatch, perturbation):
    """diffu-GRPO: each inner iteration scores under its own random mask, shared by its old and new log-probs
    (so every first ratio of an iteration's mask is 1 and the trainer's check passes)."""
    import suder
    from suder.backbones.show_o.backbone import ShowOBackbone

    seen = []
    original = ShowOBackbone.logp_image_given_text

    def spy(self, images, texts, **options):
        seen.append((torch.is_grad_enabled(), options.get("remask_seed"), {k: options.get(k) for k in perturbation}))
        return original(self, images, texts, **options)

    monkeypatch.setattr(ShowOBackbone, "logp_image_given_text", spy)
    res = suder.train(
        tiny_backbone(),
        algo="grpo",
        strategy="gen",
        steps=1,
        group_size=2,
        gen_batch_size=2,
        grad_accum=1,
        grpo_iterations=2,
        grpo_beta=0.0,
        image_logp_options=perturbation,
        lr=1e-3,
        sample_every=0,
        save_every=0,
        output_dir=str(tmp_path / "run"),
        **show_o_data,
    )
    assert math.isfinite(res.metrics[0]["gen/loss"])
    old = [s for g, s, r in seen if not g and r == perturbation]
    new = [s for g, s, r in seen if g and r == perturbation]
    assert len(set(old)) == 2 and old == new  # two masks, each used once without and once with gradient


def test_trainer_trains_the_clip_vit_projector(tmp_path, show_o_data):
    """GRPO, both directions, on a CLIP-ViT checkpoint: understanding updates ``mm_projector``, the CLIP vision
    model stays frozen."""
    import suder

    bb = tiny_clip_backbone()
    projector = {n: p.detach().clone() for n, p in bb.model.mm_projector.named_parameters()}
    vision = {n: p.detach().clone() for n, p in bb.vision.named_parameters()}
    res = suder.train(
        bb,
        algo="grpo",
        strategy="unified",
        steps=2,
        group_size=2,
        gen_batch_size=2,
        und_batch_size=2,
        grad_accum=1,
        lr=1e-2,
        sample_every=0,
        save_every=0,
        output_dir=str(tmp_path / "run"),
        **show_o_data,
    )
    assert all(math.isfinite(v) for m in res.metrics for k, v in m.items() if k.endswith("/loss"))
    assert any(not torch.equal(p, projector[n]) for n, p in bb.model.mm_projector.named_parameters())
    assert all(torch.equal(p, vision[n]) for n, p in bb.vision.named_parameters())
