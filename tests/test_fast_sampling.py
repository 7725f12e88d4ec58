"""The fast image samplers against the reference loops: same generator seed, identical tokens, log-probs within
1e-5 (float32), for the toy and the tiny Janus-Pro, with and without guidance, greedy and sampled, on left-padded
prompts of different lengths; the CUDA-graph protocol (run eagerly on CPU) and LoRA included. Timings live in
``benchmarks/rollout.py``, never here."""

from __future__ import annotations

import pytest
import torch
from janus_tiny import NUM_IMAGE_TOKENS as JANUS_TOKENS
from janus_tiny import tiny_backbone

from suder.backbones.toy import NUM_IMAGE_TOKENS as TOY_TOKENS
from suder.fast_sampling import StaticDecoder, attention_dtype, distinct_rows, supports, uniforms

TOL = 1e-5
TOY_PROMPTS = ["a red square", "a green circle to the left of a blue triangle", "three white squares"]
JANUS_PROMPTS = ["a red circle", "a green triangle left of a yellow star"]
CASES = [(1.0, 1.0), (3.0, 1.0), (3.0, 0.7), (3.0, 0.0)]  # (guidance scale, temperature); 0 is greedy


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops gain nothing from a second thread, and the two cores are shared (see test_janus_pro.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(a_tokens, a_logps, b_tokens, b_logps):
    assert torch.equal(a_tokens, b_tokens), f"{(a_tokens != b_tokens).sum().item()} tokens differ"
    assert (a_logps - b_logps).abs().max().item() <= TOL


def test_uniforms_are_the_reference_draws_in_order():
    """One CPU draw of (steps, rows, 1) equals ``steps`` draws of (rows, 1), and leaves the generator where
    they leave it (the reference loop draws per step; the fast one before the loop)."""
    for steps, rows in [(3, 1), (64, 7), (576, 32)]:
        a, b = gen(5), gen(5)
        bulk = uniforms(a, steps, rows, torch.device("cpu"))
        one_by_one = torch.stack([torch.rand((rows, 1), generator=b) for _ in range(steps)])
        assert torch.equal(bulk, one_by_one) and bulk.shape == (steps, rows, 1)
        assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ------------------------------------------------------------------------------------------ toy
@pytest.mark.parametrize("scale,temperature", CASES)
def test_toy_fast_sampler_equals_reference(tiny_toy, scale, temperature):
    kw = dict(num_samples=3, guidance_scale=scale, temperature=temperature)
    ids, mask = tiny_toy._t2i_prefix(TOY_PROMPTS)
    assert (mask == 0).any(), "the prompts must be left-padded"
    ref = tiny_toy.sample_image(TOY_PROMPTS, generator=gen(1), sampler="reference", **kw)
    fast = tiny_toy.sample_image(TOY_PROMPTS, generator=gen(1), sampler="fast", **kw)
    assert fast.tokens.shape == (9, TOY_TOKENS)
    assert_same(ref.tokens, ref.logps, fast.tokens, fast.logps)
    if temperature:  # a seed decides: another seed gives other images (the comparison can fail)
        other = tiny_toy.sample_image(TOY_PROMPTS, generator=gen(2), sampler="fast", **kw)
        assert not torch.equal(other.tokens, fast.tokens)


def test_toy_default_sampler_is_fast_and_scores_like_teacher_forcing(tiny_toy):
    s = tiny_toy.sample_image(TOY_PROMPTS, num_samples=2, generator=gen(3), guidance_scale=3.0)
    ref = tiny_toy.sample_image(TOY_PROMPTS, num_samples=2, generator=gen(3), guidance_scale=3.0,
                                sampler="reference")
    assert_same(ref.tokens, ref.logps, s.tokens, s.logps)
    tf = tiny_toy.logp_image_given_text(s, s.prompts, policy="guided", guidance_scale=3.0)
    assert (tf.values - s.logps).abs().max().item() <= TOL


def test_unknown_sampler_lists_the_options(tiny_toy):
    from suder.errors import BackboneError

    with pytest.raises(BackboneError, match="Available: fast, reference"):
        tiny_toy.sample_image(TOY_PROMPTS, sampler="quick")
    with pytest.raises(BackboneError, match="Available: fast, fast-eager, reference"):
        tiny_backbone().sample_image(JANUS_PROMPTS, sampler="quick")


# ------------------------------------------------------------------------------------------ janus-pro
def _janus_inputs(bb, scale):
    rows = [p for p in JANUS_PROMPTS for _ in range(3)]
    ids, mask = bb._t2i_batch(rows, scale != 1.0)
    assert (mask == 0).any(), "the prompts must be left-padded"
    with torch.no_grad():
        return bb.model.get_input_embeddings()(ids), mask


@pytest.mark.parametrize("loop,bucket", [("eager", 64), ("graphs", 64), ("graphs", 7)])
@pytest.mark.parametrize("scale,temperature", CASES)
def test_janus_fast_sampler_equals_reference(loop, bucket, scale, temperature):
    """``graphs`` on CPU runs the CUDA-graph protocol eagerly: warm-up and state restore, every token fed,
    attention over a bucket's end with the unwritten slots masked (bucket 7: ten buckets of 64 tokens)."""
    from suder.backbones.janus_pro.sampling import sample_image_tokens, sample_image_tokens_fast

    bb = tiny_backbone()
    embeds, mask = _janus_inputs(bb, scale)
    kw = dict(num_tokens=JANUS_TOKENS, guidance_scale=scale if scale != 1.0 else None, temperature=temperature)
    with torch.no_grad():
        ref = sample_image_tokens(bb.model, embeds, mask, generator=gen(4), **kw)
        fast = sample_image_tokens_fast(bb.model, embeds, mask, generator=gen(4), loop=loop, bucket=bucket, **kw)
    assert fast[0].shape == (6, JANUS_TOKENS)
    assert_same(*ref, *fast)


def test_janus_default_sampler_is_fast_and_scores_like_teacher_forcing():
    bb = tiny_backbone()
    assert bb.image_sampler == "fast"
    s = bb.sample_image(JANUS_PROMPTS, num_samples=2, generator=gen(5))
    ref = bb.sample_image(JANUS_PROMPTS, num_samples=2, generator=gen(5), sampler="reference")
    assert_same(ref.tokens, ref.logps, s.tokens, s.logps)
    assert (bb.logp_image_given_text(s, s.prompts).values - s.logps).abs().max() <= 1e-4  # test_janus_pro's TOL


def test_janus_fast_sampler_runs_the_lora_adapter_and_its_reference():
    bb = tiny_backbone(lora={"r": 4})
    g = gen(0)
    # 0.1, not test_janus_pro's 0.5: that makes the heads so sharp that float32 rounding alone moves CFG-5
    # log-probs by 1e-4 (the reference loop against teacher forcing too)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    on = [bb.sample_image(JANUS_PROMPTS, generator=gen(6), sampler=s) for s in ("reference", "fast")]
    with bb.reference_scope():
        off = [bb.sample_image(JANUS_PROMPTS, generator=gen(6), sampler=s) for s in ("reference", "fast")]
    assert_same(on[0].tokens, on[0].logps, on[1].tokens, on[1].logps)
    assert_same(off[0].tokens, off[0].logps, off[1].tokens, off[1].logps)
    assert not torch.equal(on[1].tokens, off[1].tokens)  # the adapter matters, so the comparison can fail


# ------------------------------------------------------------------------------------------ the decoder
def test_static_decoder_equals_a_full_forward_with_grouped_query_heads():
    """Each decode step's hidden state equals one teacher-forced forward over prompt + fed tokens, for a
    Llama with 2 kv heads for 4 query heads and left padding (the reshape that replaces ``repeat_kv``)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    lm = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=16, max_position_embeddings=64)).eval()
    prompt = torch.randn(2, 5, 32)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    fed = torch.randn(2, 4, 32)
    with torch.no_grad():
        decoder = StaticDecoder(lm, prompt, mask, new_tokens=4)
        steps = [decoder.step(fed[:, i : i + 1], 5 + i + 1).clone() for i in range(4)]
        for i in range(4):
            full_mask = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], 1)
            want = lm(inputs_embeds=torch.cat([prompt, fed[:, : i + 1]], 1), attention_mask=full_mask,
                      position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state[:, -1]
            assert (steps[i] - want).abs().max().item() <= TOL


def test_bfloat16_model_attends_over_a_float32_cache_on_cpu():
    """On CPU a bfloat16 Llama's keys and values are kept and multiplied in float32 (bf16 products of one query
    with a sliced, transposed cache copy the cache and run 3-4x slower); each step still matches one
    teacher-forced bfloat16 forward to bf16 rounding, and returns the model's dtype."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    lm = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=16, max_position_embeddings=64))
    lm = lm.to(torch.bfloat16).eval()
    prompt = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    fed = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        decoder = StaticDecoder(lm, prompt, mask, new_tokens=3)
        assert {t.dtype for t in decoder.keys + decoder.values} == {torch.float32}
        cpu, cuda = torch.device("cpu"), torch.device("cuda")  # float64 stays; CUDA keeps the model's dtype
        assert attention_dtype(torch.float64, cpu) == torch.float64
        assert attention_dtype(torch.bfloat16, cuda) == torch.bfloat16
        for i in range(3):
            got = decoder.step(fed[:, i : i + 1], 5 + i + 1)
            full_mask = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], 1)
            want = lm(inputs_embeds=torch.cat([prompt, fed[:, : i + 1]], 1), attention_mask=full_mask,
                      position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state[:, -1]
            assert got.dtype == torch.bfloat16
            assert (got.float() - want.float()).abs().max().item() <= 0.05 * want.float().abs().max().item()


def test_distinct_rows_finds_the_runs_of_a_group():
    a, b = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    embeds = torch.cat([a, a, b, b, b, a])
    mask = torch.ones(6, 3, dtype=torch.long)
    mask[5, 0] = 0  # the same embeddings under another mask are another prompt
    first, inverse = distinct_rows(embeds, mask)
    assert first.tolist() == [0, 2, 5] and inverse.tolist() == [0, 0, 1, 1, 1, 2]


def test_only_static_rope_llamas_are_supported():
    from transformers import LlamaConfig, LlamaModel

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=8)
    assert supports(LlamaModel(LlamaConfig(**small)))
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not supports(LlamaModel(LlamaConfig(**small, rope_parameters=dynamic)))
    assert not supports(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_the_eager_loop_on_gpu():
    bb = tiny_backbone().to("cuda")
    kw = dict(num_samples=4, guidance_scale=5.0)
    graphs = bb.sample_image(JANUS_PROMPTS, generator=gen(7), sampler="fast", **kw)
    eager = bb.sample_image(JANUS_PROMPTS, generator=gen(7), sampler="fast-eager", **kw)
    assert_same(eager.tokens, eager.logps, graphs.tokens, graphs.logps)
