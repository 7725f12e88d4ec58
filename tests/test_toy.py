"""The toy backbone: protocol conformance, exact tokenizer, sampling log-probs = teacher-forced log-probs,
padding invariance, gradients, CFG, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import suder
from suder.backbones.toy import EOS, NUM_IMAGE_TOKENS, PatchTokenizer, build_codebook
from suder.protocol import ImageSamples, TextSamples, UnifiedLMM, check_backbone
from suder.worlds import shapes


def test_protocol_conformance(tiny_toy):
    assert isinstance(tiny_toy, UnifiedLMM)
    check_backbone(tiny_toy)
    s = tiny_toy.sample_image(
        ["a red square", "two blue circles"], num_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(s, ImageSamples) and len(s) == 6 and s.prompts[:3] == ["a red square"] * 3
    assert s.tokens.shape == s.logps.shape == (6, NUM_IMAGE_TOKENS) and s.tokens.dtype == torch.long
    assert len(s.images) == 6 and s.images[0].size == (32, 32)
    t = tiny_toy.sample_text(s.images[:2], num_samples=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(t, TextSamples) and len(t.texts) == 4
    assert t.tokens.shape == t.logps.shape == t.mask.shape
    lp = tiny_toy.logp_text_given_image(["a red square", "a blue circle"], s.images[:2])
    assert lp.values.shape[0] == 2 and lp.mean().shape == (2,) and lp.sum().shape == (2,)


def test_codebook_is_lossless_on_the_world():
    tok = PatchTokenizer(build_codebook())
    scenes = shapes.sample_scenes(100, seed=3)
    arrays = np.stack([shapes.render_array(s) for s in scenes])
    codes = tok.encode(list(arrays))
    assert np.array_equal(tok.decode_arrays(codes), arrays)
    # off-world pixels map to the nearest code
    noisy = arrays[0].astype(int) + 3
    assert np.array_equal(tok.decode_arrays(tok.encode([np.clip(noisy, 0, 255).astype(np.uint8)]))[0], arrays[0])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_image_logps_recorded_equal_teacher_forced(tiny_toy, scale):
    prompts = ["a red square", "a green circle to the left of a blue triangle", "three white squares"]
    s = tiny_toy.sample_image(prompts, num_samples=2, generator=torch.Generator().manual_seed(1), guidance_scale=scale)
    tf = tiny_toy.logp_image_given_text(s, s.prompts, policy="guided", guidance_scale=scale)
    assert (tf.values - s.logps).abs().max().item() <= 1e-5
    if scale != 1.0:  # the conditional policy is a different distribution
        cond = tiny_toy.logp_image_given_text(s, s.prompts, policy="cond")
        assert (cond.values - s.logps).abs().max().item() > 1e-3


def test_text_logps_recorded_equal_teacher_forced(tiny_toy):
    images = [shapes.render(sc) for sc in shapes.sample_scenes(4, seed=5)]
    t = tiny_toy.sample_text(images, num_samples=3, generator=torch.Generator().manual_seed(2))
    tf = tiny_toy.logp_text_given_image(t, t.images)
    assert torch.equal(tf.mask, t.mask)
    assert (tf.values - t.logps).abs().max().item() <= 1e-5
    # the same from the decoded strings (re-tokenised), for the captions that finished with <eos>
    finished = [i for i in range(len(t)) if t.tokens[i][t.mask[i]][-1].item() == EOS]
    assert finished
    again = tiny_toy.logp_text_given_image([t.texts[i] for i in finished], [t.images[i] for i in finished])
    assert torch.allclose(again.sum(), t.logps[finished].sum(-1), atol=1e-4)


def test_greedy_caption_is_teacher_forced_argmax(tiny_toy):
    images = [shapes.render(sc) for sc in shapes.sample_scenes(6, seed=7)]
    a = tiny_toy.sample_text(images, temperature=0)
    b = tiny_toy.sample_text(images, temperature=0)
    assert a.texts == b.texts
    tf = tiny_toy.logp_text_given_image(a, images)
    # a greedy token has the highest probability among the V allowed ones, so at least 1/V
    assert (tf.values[a.mask] >= np.log(1 / len(tiny_toy._text_ids)) - 1e-6).all()


def test_left_padding_does_not_change_logps(tiny_toy):
    short, long = "a red square", "a green circle to the left of a blue triangle"
    s = tiny_toy.sample_image([short], num_samples=1, generator=torch.Generator().manual_seed(3))
    alone = tiny_toy.logp_image_given_text(s, [short]).values
    batched = tiny_toy.logp_image_given_text(
        ImageSamples([short, long], s.tokens.repeat(2, 1), s.logps.repeat(2, 1)), [short, long]
    ).values[0]
    assert (alone[0] - batched).abs().max().item() <= 1e-5


def test_gradients_reach_every_trained_parameter(tiny_toy):
    images = [shapes.render(sc) for sc in shapes.sample_scenes(3, seed=9)]
    loss = -(
        tiny_toy.logp_text_given_image(["a red square"] * 3, images).mean().sum()
        + tiny_toy.logp_image_given_text(images, ["a red square", "", "two blue circles"]).mean().sum()
    )
    loss.backward()
    for d in ("gen", "und"):
        for p in tiny_toy.trainable_parameters(d):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_seeded_sampling_is_deterministic(tiny_toy):
    a = tiny_toy.sample_image(["a red square"], num_samples=4, generator=torch.Generator().manual_seed(11))
    b = tiny_toy.sample_image(["a red square"], num_samples=4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.tokens, b.tokens)


def test_save_load_round_trip(tiny_toy, tmp_path):
    tiny_toy.config.guidance_scale = 2.5
    tiny_toy.save_pretrained(tmp_path / "m")
    again = suder.load_backbone("toy", model=str(tmp_path / "m"))
    assert again.config.guidance_scale == 2.5
    for (n, p), (_, q) in zip(tiny_toy.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_missing_model_folder_is_one_line_error(tmp_path):
    with pytest.raises(suder.SuderError, match="No toy model at"):
        suder.load_backbone("toy", model=str(tmp_path / "nope"))


def test_unknown_word_is_a_data_error(tiny_toy):
    with pytest.raises(suder.SuderError, match="cannot read 'dog'"):
        tiny_toy.logp_image_given_text([shapes.render(shapes.sample_scenes(1, 0)[0])], ["a red dog"])


@pytest.mark.parametrize("sampler", ["fast", "reference"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_temperature_zero_is_greedy(tiny_toy, sampler, scale):
    """The shared conformance check, on both image samplers, with and without guidance; plus the toy's own
    contract: the greedy ``.logps`` equal the teacher-forced log-probs at temperature 0 (read as 1)."""
    from functools import partial

    from suder.testing import check_temperature_zero_is_greedy

    images = [shapes.render(sc) for sc in shapes.sample_scenes(3, seed=7)]
    model = tiny_toy
    original = model.sample_image
    model.sample_image = partial(original, sampler=sampler)
    try:
        check_temperature_zero_is_greedy(model, ["a red square", "two blue circles"], images, guidance_scale=scale)
    finally:
        model.sample_image = original
    s = model.sample_image(["a red square"], num_samples=2, guidance_scale=scale, temperature=0.0, sampler=sampler)
    for temperature in (0.0, 1.0):
        tf = model.logp_image_given_text(s, s.prompts, guidance_scale=scale, temperature=temperature)
        assert torch.isfinite(tf.values).all() and (tf.values - s.logps).abs().max().item() <= 1e-5
    t = model.sample_text(images, num_samples=2, temperature=0.0)
    for temperature in (0.0, 1.0):
        tf = model.logp_text_given_image(t, t.images, temperature=temperature)
        assert torch.isfinite(tf.values).all() and (tf.values - t.logps).abs().max().item() <= 1e-5
    with pytest.raises(suder.errors.BackboneError, match="temperature must be >= 0"):
        model.sample_text(images, temperature=-1.0)
