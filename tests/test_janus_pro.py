"""The ``janus-pro`` backbone on a tiny random ``JanusConfig`` and a small real processor (CPU, offline).

What is proved: log-probs recorded while sampling equal one teacher-forced pass (both directions, both CFG
policies); left-padded batches equal unpadded rows; gradients reach exactly the modules each direction trains;
LoRA's reference is the adapter switched off; save/load round trips; prompts are the documented chat format;
the trainer runs 2 steps in every strategy, with both algorithms, on the tiny backbone.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from janus_tiny import BOI, BOS, EOI, EOS, IMG, NUM_IMAGE_TOKENS, PAD, random_images, tiny_backbone

PROMPTS = ["a red circle", "a green triangle left of a yellow star"]  # different lengths: left padding
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops gain nothing from a second thread, and on 2 shared cores each op then waits for a busy core
    (measured: 64 sampling steps 0.05 s with one thread, 13 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ registration
def test_module_import_is_cheap_and_registers_janus_pro():
    code = (
        "import sys, suder\n"
        "import suder.backbones.janus_pro\n"
        "names = [s.name for s in suder.list_backbones()]\n"
        "assert 'janus-pro' in names, names\n"
        "assert 'transformers' not in sys.modules, 'importing janus_pro loaded transformers'\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_satisfies_protocol():
    from suder.protocol import UnifiedLMM, check_backbone

    bb = tiny_backbone()
    check_backbone(bb)
    assert isinstance(bb, UnifiedLMM) and bb.name == "janus-pro"
    assert not callable(getattr(bb, "reference_scope", None))  # the trainer keeps a frozen copy without LoRA


def test_missing_weights_offline_is_one_line_backbone_error(tmp_path):
    from suder.backbones.janus_pro import build_janus_pro
    from suder.errors import BackboneError

    with pytest.raises(BackboneError) as err:
        build_janus_pro("deepseek-community/Janus-Pro-1B", cache_dir=str(tmp_path), device="cpu")
    msg = str(err.value)
    assert "deepseek-community/Janus-Pro-1B" in msg and "hf download" in msg and "\n" not in msg
    with pytest.raises(BackboneError, match="does not exist"):
        build_janus_pro(str(tmp_path / "no-such-folder"), device="cpu")


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_follow_the_chat_template():
    bb = tiny_backbone()
    tok = bb.processor.tokenizer
    ids, mask = bb.t2i_inputs(PROMPTS)
    assert ids.shape[0] == 2 and mask[0, 0] == 0 and mask[1].all()  # left-padded
    row = ids[0][mask[0].bool()]
    assert row[0] == BOS and row[-1] == BOI
    assert tok.decode(row[1:]) == "<|User|>: a red circle\n\n<|Assistant|>:<begin_of_image>"
    un = bb.uncond_ids(ids)
    keep = (ids == BOS) | (ids == BOI)
    assert (un[keep] == ids[keep]).all() and (un[~keep] == PAD).all() and keep.sum() == 4
    und = bb.und_prompt_ids()[0]
    assert (und == IMG).sum() == NUM_IMAGE_TOKENS and (und == BOI).sum() == 1 and (und == EOI).sum() == 1
    text = tok.decode(und[und != IMG])
    assert text.startswith(tok.bos_token + "You are a helpful language and vision assistant.")  # system
    assert text.endswith("<|User|>: <begin_of_image><end_of_image>\nDescribe this image.\n\n<|Assistant|>:")


# ------------------------------------------------------------------------------------------ text -> image
@pytest.mark.parametrize(
    "policy,scale,temperature", [("guided", 5.0, 1.0), ("guided", 3.0, 0.7), ("cond", 1.0, 1.0)]
)
def test_image_sampling_logps_equal_teacher_forced(policy, scale, temperature):
    bb = tiny_backbone()
    s = bb.sample_image(PROMPTS, num_samples=2, generator=gen(), guidance_scale=scale,
                        temperature=temperature)
    assert s.tokens.shape == (4, NUM_IMAGE_TOKENS) and s.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert int(s.tokens.max()) < 256 and s.guidance_scale == scale
    lp = bb.logp_image_given_text(s, s.prompts, policy=policy, guidance_scale=scale, temperature=temperature)
    assert lp.values.shape == s.logps.shape and lp.mask.all()
    assert (lp.values - s.logps).abs().max() <= TOL
    if policy == "guided":  # the other policy scores another distribution: the comparison can fail
        other = bb.logp_image_given_text(s, s.prompts, policy="cond", temperature=temperature)
        assert (other.values - s.logps).abs().max() > 0.1


def test_image_sampling_honours_generator_and_defaults():
    bb = tiny_backbone(guidance_scale=3.0)
    a = bb.sample_image(PROMPTS[:1], num_samples=2, generator=gen(1))
    b = bb.sample_image(PROMPTS[:1], num_samples=2, generator=gen(1))
    c = bb.sample_image(PROMPTS[:1], num_samples=2, generator=gen(2))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens[0], a.tokens[1])  # a group's samples differ
    assert a.guidance_scale == 3.0  # the backbone's default scale and policy score what was sampled
    assert (bb.logp_image_given_text(a, a.prompts).values - a.logps).abs().max() <= TOL
    greedy = bb.sample_image(PROMPTS[:1], num_samples=2, generator=gen(1), temperature=0)
    assert torch.equal(greedy.tokens[0], greedy.tokens[1])
    assert (bb.logp_image_given_text(greedy, greedy.prompts).values - greedy.logps).abs().max() <= TOL
    images = a.images
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"


@pytest.mark.parametrize("sampler", ["fast", "fast-eager", "reference"])
def test_temperature_zero_is_greedy_in_both_directions(sampler):
    """The conformance check of ``suder.testing``, with guidance, in every image sampler and in captions; the
    greedy ``.logps`` are the temperature-1 log-probs of the same CFG policy (teacher forcing at 0 or 1)."""
    from suder.testing import check_temperature_zero_is_greedy

    bb = tiny_backbone(max_caption_tokens=8, image_sampler=sampler)
    check_temperature_zero_is_greedy(bb, PROMPTS, random_images(2), guidance_scale=5.0)
    s = bb.sample_image(PROMPTS, num_samples=2, generator=gen(), guidance_scale=5.0, temperature=0)
    sampled = bb.sample_image(PROMPTS, num_samples=2, generator=gen(), guidance_scale=5.0).tokens
    assert not torch.equal(sampled, s.tokens)  # temperature 1 is not greedy: the check can fail
    for t in (0, 1.0):
        lp = bb.logp_image_given_text(s, s.prompts, policy="guided", guidance_scale=5.0, temperature=t)
        assert (lp.values - s.logps).abs().max() <= TOL


@pytest.mark.parametrize("policy", ["guided", "cond"])
def test_left_padded_image_batch_equals_unpadded(policy):
    bb = tiny_backbone()
    codes = torch.randint(0, 256, (2, NUM_IMAGE_TOKENS), generator=gen(3))
    both = bb.logp_image_given_text(codes, PROMPTS, policy=policy).values
    for i, p in enumerate(PROMPTS):
        alone = bb.logp_image_given_text(codes[i : i + 1], [p], policy=policy).values
        assert (both[i] - alone[0]).abs().max() <= 1e-5


def test_pil_images_are_vq_encoded():
    bb = tiny_backbone()
    pics = random_images(2)
    codes = bb.encode_images(pics)
    assert codes.shape == (2, NUM_IMAGE_TOKENS) and codes.dtype == torch.long
    assert 0 <= codes.min() <= codes.max() < 256
    from_pil = bb.logp_image_given_text(pics, PROMPTS, policy="cond").values
    assert torch.equal(from_pil, bb.logp_image_given_text(codes, PROMPTS, policy="cond").values)
    # different images, different codes: the encoder reads the pixels
    assert not torch.equal(codes[0], codes[1])


# ------------------------------------------------------------------------------------------ image -> text
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_caption_sampling_logps_equal_teacher_forced(temperature):
    bb = tiny_backbone()
    pics = random_images(2)
    s = bb.sample_text(pics, num_samples=4, generator=gen(), temperature=temperature, max_new_tokens=12)
    lengths = s.mask.sum(-1)
    assert s.tokens.shape[0] == 8 and s.images[0] is pics[0] and s.images[4] is pics[1]
    assert lengths.min() < 12 and lengths.max() == 12  # right-padded: ended early and truncated in one batch
    ended = s.tokens[torch.arange(8), lengths - 1] == EOS
    assert ended.any() and (ended | (lengths == 12)).all()
    lp = bb.logp_text_given_image(s, s.images, temperature=temperature)
    assert (lp.values - s.logps).abs().max() <= TOL and torch.equal(lp.mask, s.mask)
    assert (lp.values[~lp.mask] == 0).all()


def test_image_tokens_are_suppressed_in_captions():
    bb = tiny_backbone()
    with torch.no_grad():  # make the image special tokens the most likely next tokens everywhere
        bb.model.lm_head.weight[[IMG, BOI, EOI]] = bb.model.model.language_model.norm.weight.detach() * 50
    s = bb.sample_text(random_images(1), num_samples=4, generator=gen(), max_new_tokens=8)
    assert not torch.isin(s.tokens, torch.tensor([IMG, BOI, EOI])).any()
    lp = bb.logp_text_given_image(s, s.images)
    assert (lp.values - s.logps).abs().max() <= TOL
    greedy = bb.sample_text(random_images(1), num_samples=2, temperature=0, max_new_tokens=8)
    assert torch.equal(greedy.tokens[0], greedy.tokens[1])


def test_string_captions_and_sampled_images():
    bb = tiny_backbone()
    images = bb.sample_image(PROMPTS, generator=gen(), guidance_scale=1.0)
    lp = bb.logp_text_given_image(PROMPTS, images)  # the generation-direction reward's call
    tok = bb.processor.tokenizer
    n0 = len(tok(" " + PROMPTS[0], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert lp.lengths().tolist()[0] == n0 and lp.mask[0, :n0].all() and torch.isfinite(lp.sum()).all()
    # each row reads its own image: swapping the images changes the scores
    swapped = bb.logp_text_given_image(PROMPTS, images.select([1, 0]))
    assert (swapped.values - lp.values).abs().max() > 1e-3
    # the same captions right-padded in a batch score as they do alone
    for i, p in enumerate(PROMPTS):
        alone = bb.logp_text_given_image([p], images.select([i]))
        n = int(alone.lengths()[0])
        assert (lp.values[i, :n] - alone.values[0]).abs().max() <= 1e-5


def test_sampling_in_chunks_bounds_memory_without_changing_results():
    whole, chunked = tiny_backbone(), tiny_backbone(sample_batch_size=3)  # 8 rows -> chunks of 3, 3, 2
    a = whole.sample_image(PROMPTS, num_samples=4, temperature=0)
    b = chunked.sample_image(PROMPTS, num_samples=4, temperature=0)
    assert torch.equal(a.tokens, b.tokens) and (a.logps - b.logps).abs().max() <= 1e-5
    pics = random_images(2)
    a = whole.sample_text(pics, num_samples=4, temperature=0, max_new_tokens=10)
    b = chunked.sample_text(pics, num_samples=4, temperature=0, max_new_tokens=10)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and a.texts == b.texts
    s = chunked.sample_text(pics, num_samples=4, generator=gen(), max_new_tokens=12)
    assert s.mask[:, -1].any()  # trimmed to the longest caption of all chunks
    assert (chunked.logp_text_given_image(s, s.images).values - s.logps).abs().max() <= TOL


# ------------------------------------------------------------------------------------------ training
def _grad_names(bb, loss) -> set[str]:
    loss.backward()
    return {n for n, p in bb.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _loss(bb, direction):
    if direction == "gen":
        codes = torch.randint(0, 256, (2, NUM_IMAGE_TOKENS), generator=gen(4))
        return -bb.logp_image_given_text(codes, PROMPTS, policy="guided").sum().sum()
    return -bb.logp_text_given_image(PROMPTS, random_images(2)).sum().sum()


@pytest.mark.parametrize("direction", ["gen", "und"])
def test_gradients_reach_exactly_the_trained_modules(direction):
    bb = tiny_backbone()
    trainable = {id(p) for p in bb.trainable_parameters(direction)}
    for p in bb.parameters():
        p.requires_grad_(id(p) in trainable)
    bb.train()
    assert not bb.model.model.vqmodel.training and not bb.model.model.vision_model.training
    assert bb.model.model.language_model.training
    got = _grad_names(bb, _loss(bb, direction))
    want = {n for n, p in bb.named_parameters() if id(p) in trainable}
    assert got == want, (sorted(want - got)[:5], sorted(got - want)[:5])
    own = {"gen": ("model.model.generation_",), "und": ("model.lm_head", "model.model.aligner")}
    prefixes = own[direction]
    assert any(n.startswith(prefixes) for n in got) and any(".language_model.layers." in n for n in got)
    assert not any(".vqmodel." in n or ".vision_model." in n or "embed_tokens" in n for n in want)


def test_all_parameters_free_only_the_used_path_gets_gradients():
    bb = tiny_backbone()
    for p in bb.model.parameters():
        p.requires_grad_(True)
    got = _grad_names(bb, _loss(bb, "gen"))
    unused = ("model.model.vqmodel.", "model.model.vision_model.", "model.model.aligner.", "model.lm_head.")
    assert got and not any(n.startswith(unused) for n in got)
    assert any(n.startswith("model.model.generation_head.") for n in got)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        bb = tiny_backbone()
        if checkpointing:
            bb.gradient_checkpointing_enable()
        bb.train()
        _loss(bb, "gen").backward()
        grads.append({n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) <= 1e-6


def _perturb_lora(bb, seed=0):
    g = gen(seed)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_lora_reference_is_the_adapter_switched_off():
    base = tiny_backbone()
    bb = tiny_backbone(lora={"r": 4})
    n_base = sum(p.numel() for p in base.parameters())
    lora = bb.trainable_parameters("gen")
    assert bb.trainable_parameters("und") == lora
    assert len(lora) == 2 * 7 * 2  # A and B x 7 projections x 2 layers
    assert sum(p.numel() for p in bb.parameters()) == n_base + sum(p.numel() for p in lora)  # no second copy
    assert all(p.dtype == torch.float32 for p in lora)
    _perturb_lora(bb)
    codes = torch.randint(0, 256, (2, NUM_IMAGE_TOKENS), generator=gen(5))
    pics = random_images(2)
    ref_img = base.logp_image_given_text(codes, PROMPTS).values
    ref_txt = base.logp_text_given_image(PROMPTS, pics).values
    assert (bb.logp_image_given_text(codes, PROMPTS).values - ref_img).abs().max() > 1e-2
    flags = [p.requires_grad for p in lora]
    with bb.reference_scope():
        assert (bb.logp_image_given_text(codes, PROMPTS).values - ref_img).abs().max() <= 1e-6
        assert (bb.logp_text_given_image(PROMPTS, pics).values - ref_txt).abs().max() <= 1e-6
    assert [p.requires_grad for p in lora] == flags
    for p in bb.parameters():
        p.requires_grad_(any(p is q for q in lora))
    got = _grad_names(bb, _loss(bb, "gen"))
    assert got == {n for n, p in bb.named_parameters() if "lora_" in n}


# ------------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip(tmp_path):
    from suder import load_backbone

    bb = tiny_backbone(guidance_scale=3.0, caption_instruction="What is in this picture?",
                       max_caption_tokens=20)
    bb.save_pretrained(tmp_path)
    again = load_backbone("janus-pro", model=str(tmp_path), dtype="float32", device="cpu")
    assert again.settings() == bb.settings()
    assert torch.equal(again.und_prompt_ids(), bb.und_prompt_ids())
    s = bb.sample_image(PROMPTS, generator=gen())
    assert (again.logp_image_given_text(s, s.prompts).values - s.logps).abs().max() <= TOL
    t = bb.sample_text(random_images(2), generator=gen(), max_new_tokens=6)
    assert (again.logp_text_given_image(t, t.images).values - t.logps).abs().max() <= TOL


def test_dtype_defaults_to_float32_on_cpu_and_bfloat16_on_gpu(tmp_path):
    """A bfloat16 checkpoint (as released) loads in float32 on CPU unless bfloat16 or ``auto`` is asked for."""
    from janus_tiny import tiny_model, tiny_processor

    from suder import load_backbone
    from suder.backbones.janus_pro import JanusProBackbone, resolve_dtype

    JanusProBackbone.from_model(tiny_model(dtype=torch.bfloat16), tiny_processor()).save_pretrained(tmp_path)
    asks = [{}, {"dtype": "bfloat16"}, {"dtype": "auto"}, {"dtype": None}]
    dtypes = [load_backbone("janus-pro", model=str(tmp_path), device="cpu", **ask).model.dtype for ask in asks]
    assert dtypes == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32], dtypes
    assert resolve_dtype(None, "cuda") == torch.bfloat16 and resolve_dtype(None, "cuda:1") == torch.bfloat16
    assert resolve_dtype("fp32", "cuda") == torch.float32 and resolve_dtype(None, "cpu") == torch.float32


def test_lora_save_load_round_trip_and_merged_export(tmp_path):
    from transformers import JanusForConditionalGeneration

    from suder import load_backbone

    bb = tiny_backbone(lora={"r": 4})
    base_weights = tiny_backbone().model.state_dict()
    _perturb_lora(bb)
    codes = torch.randint(0, 256, (2, NUM_IMAGE_TOKENS), generator=gen(6))
    want = bb.logp_image_given_text(codes, PROMPTS).values
    with bb.reference_scope():
        want_ref = bb.logp_image_given_text(codes, PROMPTS).values
    bb.save_pretrained(tmp_path / "adapter-run")
    again = load_backbone("janus-pro", model=str(tmp_path / "adapter-run"), dtype="float32", device="cpu")
    assert (again.logp_image_given_text(codes, PROMPTS).values - want).abs().max() <= 1e-6
    with again.reference_scope():
        assert (again.logp_image_given_text(codes, PROMPTS).values - want_ref).abs().max() <= 1e-6
    bb.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = load_backbone("janus-pro", model=str(tmp_path / "merged"), dtype="float32", device="cpu")
    assert not callable(getattr(merged, "reference_scope", None))
    assert (merged.logp_image_given_text(codes, PROMPTS).values - want).abs().max() <= 1e-4
    plain = JanusForConditionalGeneration.from_pretrained(tmp_path / "merged")  # a plain transformers folder
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(plain.state_dict()[q], merged.model.state_dict()[q])
    assert not torch.equal(plain.state_dict()[q], base_weights[q])  # the adapter is in the merged weights


# ------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory):
    """Four prompts and four images (unpaired), the inputs of a real-backbone run."""
    root = tmp_path_factory.mktemp("janus-data")
    (root / "prompts.txt").write_text("\n".join(PROMPTS + ["two purple cats", "a dog in the rain"]) + "\n")
    (root / "images").mkdir()
    for i, im in enumerate(random_images(4, seed=1)):
        im.save(root / "images" / f"{i}.png")
    return {"prompts": str(root / "prompts.txt"), "images": str(root / "images")}


@pytest.mark.parametrize("algo", ["simpo", "grpo"])
@pytest.mark.parametrize("strategy,lora", [("unified", None), ("gen", None), ("und", None),
                                           ("separate", None), ("unified", {"r": 4})])
def test_trainer_runs_two_steps(tmp_path, unpaired_data, algo, strategy, lora):
    import math

    import suder

    bb = tiny_backbone(max_caption_tokens=8, **({"lora": lora} if lora else {}))
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    res = suder.train(bb, algo=algo, strategy=strategy, steps=2, group_size=2, gen_batch_size=2,
                      und_batch_size=2, grad_accum=1, switch_every=1, lr=1e-3, sample_every=1, save_every=0,
                      output_dir=str(tmp_path / "run"), **unpaired_data)
    assert len(res.metrics) == 2
    losses = [v for m in res.metrics for k, v in m.items() if k.endswith("/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    # in the separate strategy ``bb`` is the "gen" model (trained at step 1; the "und" copy at step 2)
    directions = {"unified": ("gen", "und"), "separate": ("gen",)}.get(strategy, (strategy,))
    trained = {id(p) for d in directions for p in bb.trainable_parameters(d)}
    for name, p in bb.named_parameters():
        if id(p) in trained and "lora_A" not in name:  # LoRA A has no gradient while B is still 0
            assert not torch.equal(p, before[name]), f"{name} did not change"
        if ".vqmodel." in name or ".vision_model." in name:
            assert torch.equal(p, before[name]), f"{name} changed"
    folders = ["gen", "und"] if strategy == "separate" else [""]
    for sub in folders:
        again = suder.load_backbone("janus-pro", model=os.path.join(res.final_model, sub), dtype="float32",
                                    device="cpu")
        assert callable(getattr(again, "reference_scope", None)) == bool(lora)


def test_trainer_reports_the_sampled_vs_teacher_forced_logp_drift(tmp_path, unpaired_data):
    """GRPO recomputes old log-probs teacher-forced; the gap to the sampled ``.logps`` is logged per direction:
    float rounding in float32. Guided samples scored under ``cfg_policy="cond"`` differ on purpose: no gen drift."""
    import suder

    kw = dict(algo="grpo", steps=1, group_size=2, gen_batch_size=2, und_batch_size=2, grad_accum=1, lr=1e-3,
              sample_every=0, save_every=0, **unpaired_data)
    res = suder.train(tiny_backbone(max_caption_tokens=8), output_dir=str(tmp_path / "a"), **kw)
    drift = {k: v for k, v in res.metrics[0].items() if "logp_drift" in k}
    assert set(drift) == {f"{d}/logp_drift_{s}" for d in ("gen", "und") for s in ("max", "mean")}, drift
    assert all(0 <= v < 1e-4 for v in drift.values()), drift
    res = suder.train(tiny_backbone(max_caption_tokens=8), output_dir=str(tmp_path / "b"), cfg_policy="cond", **kw)
    assert "und/logp_drift_max" in res.metrics[0] and "gen/logp_drift_max" not in res.metrics[0]
