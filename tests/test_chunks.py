"""Rollouts in chunks (``rollout_chunk_size``): the same samples whatever the chunk size, for every backbone
(the emu3 plugin's too, where it is installed), guided and unguided; log-prob passes in chunks; the
out-of-memory back-off (one process here, two in ``test_two_processes_agree_on_the_chunk_size_after_an_oom``).

What is exactly identical and what only to float rounding: each sample draws from its own generator
(``row_generators``), so the tokens and captions of a group are the same for every chunk size. The log-probs
are the same function of the same rows, but CPU matrix kernels round a row differently in batches of
different sizes (a (1, K) x (K, N) product is not bit-equal to row 0 of a (6, K) one), so they agree to 1e-5;
bit for bit, a chunk's results are those of the same rows sampled or scored in one call of their own.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from suder.config import resolve  # noqa: E402
from suder.errors import TrainingError  # noqa: E402
from suder.protocol import TextSamples  # noqa: E402
from suder.rollout import Chunked, Chunks, ChunkSizeWarning, row_generators, sample_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle above a blue square", "two green triangles"]
G = 3  # 6 rows: chunks of 1, 2, 4 (4 + 2 across the inputs) and 6


def _toy():
    from suder import load_backbone

    return load_backbone("toy", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _janus():
    import janus_tiny

    return janus_tiny.tiny_backbone()


def _show_o():
    import show_o_tiny

    return show_o_tiny.tiny_backbone()


def _emu3():
    import emu3_tiny

    return emu3_tiny.tiny_backbone()


def _images(name: str) -> list:
    if name == "emu3":
        import emu3_tiny

        return emu3_tiny.random_images(2)
    if name == "janus-pro":
        import janus_tiny

        return janus_tiny.random_images(2)
    if name == "show-o":
        import show_o_tiny

        return show_o_tiny.tiny_images(2)
    from suder.testing import random_images

    return random_images(2)


BACKBONES = {"toy": _toy, "janus-pro": _janus, "show-o": _show_o}
if importlib.util.find_spec("suder_emu3") is not None:  # the outside plugin, where it is installed
    sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "suder-emu3" / "tests"))
    BACKBONES["emu3"] = _emu3
UNGUIDED = {"toy": 1.0, "janus-pro": 1.0, "show-o": 0.0, "emu3": 1.0}  # Show-o's "no guidance" is 0


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone(request):
    torch.manual_seed(0)
    return BACKBONES[request.param]()


def _assert_same_samples(got, want, atol: float = 1e-5) -> None:
    """Tokens, captions and masks equal; log-probs equal to float rounding (module docstring)."""
    assert type(got) is type(want) and len(got) == len(want) and got.num_samples == want.num_samples
    if isinstance(want, TextSamples):
        assert got.texts == want.texts
        assert torch.equal(got.mask, want.mask)
        assert torch.equal(got.tokens * got.mask, want.tokens * want.mask)
    else:
        assert got.prompts == want.prompts
        assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logps, want.logps, atol=atol, rtol=0)


@pytest.mark.parametrize("direction", ["gen", "und"])
@pytest.mark.parametrize("guided", [False, True])
def test_chunked_rollout_equals_one_call(backbone, direction, guided):
    """sample_group with chunks of 1, 2, 4 and 6 rows gives the whole group's samples (6 rows, 2 inputs x 3)."""
    if direction == "und" and guided:
        pytest.skip("captions are never guided")
    scale = 3.0 if guided else UNGUIDED[backbone.name]
    cfg = resolve(steps=1, group_size=G, guidance_scale=scale)
    inputs = PROMPTS if direction == "gen" else _images(backbone.name)
    whole = sample_group(backbone, direction, inputs, cfg, torch.Generator().manual_seed(5))
    assert len(whole) == 2 * G
    for size in (1, 2, 4, 6):
        chunks = Chunks(size)
        got = sample_group(backbone, direction, inputs, cfg, torch.Generator().manual_seed(5), chunks)
        _assert_same_samples(got, whole)
        assert chunks.metrics() == {"rollout/chunk_size": float(size)}
    other = sample_group(backbone, direction, inputs, cfg, torch.Generator().manual_seed(6), Chunks(2))
    assert not torch.equal(other.tokens, whole.tokens)  # the seed matters: not a constant sampler


def test_a_chunk_is_its_rows_sampled_alone(backbone):
    """Bit for bit: in chunks of 2, row 2 (a chunk of its own: input 0's last sample) and rows 3..4 (input 1's
    first two samples) are what one call for those rows alone draws with their generators."""
    scale = 3.0
    cfg = resolve(steps=1, group_size=G, guidance_scale=scale)
    got = sample_group(backbone, "gen", PROMPTS, cfg, torch.Generator().manual_seed(5), Chunks(2))
    streams = row_generators(torch.Generator().manual_seed(5), 2 * G, salt=0)
    alone = backbone.sample_image([PROMPTS[0]], num_samples=1, generator=[streams[2]], guidance_scale=scale)
    assert torch.equal(got.tokens[2], alone.tokens[0]) and torch.equal(got.logps[2], alone.logps[0])
    pair = backbone.sample_image([PROMPTS[1]], num_samples=2, generator=streams[3:5], guidance_scale=scale)
    assert torch.equal(got.tokens[3:5], pair.tokens) and torch.equal(got.logps[3:5], pair.logps)


def test_log_prob_passes_in_chunks(backbone):
    """Both log-prob methods in chunks of 1..6 rows: the whole call's values to 1e-5 and its mask exactly; each
    chunk bit for bit the call on its own rows."""
    cfg = resolve(steps=1, group_size=G, guidance_scale=2.0)
    images = sample_group(backbone, "gen", PROMPTS, cfg, torch.Generator().manual_seed(1))
    captions = sample_group(backbone, "und", _images(backbone.name), cfg, torch.Generator().manual_seed(2))
    calls = [
        ("logp_image_given_text", images, images.prompts, {"guidance_scale": 2.0}),
        ("logp_text_given_image", captions, captions.images, {}),
    ]
    for method, first, second, options in calls:
        whole = getattr(backbone, method)(first, second, **options)
        for size in (1, 2, 4, 6):
            got = getattr(Chunked(backbone, Chunks(size)), method)(first, second, **options)
            assert torch.equal(got.mask, whole.mask)
            torch.testing.assert_close(got.values, whole.values, atol=1e-5, rtol=0)
        own = getattr(backbone, method)(first.select([4, 5]), second[4:6], **options)
        got = getattr(Chunked(backbone, Chunks(4)), method)(first, second, **options)
        assert torch.equal(got.values[4:6, : own.values.shape[1]], own.values)


class OutOfMemory:
    """A backbone stand-in whose calls of more than ``fits`` rows raise CUDA's out-of-memory error."""

    def __init__(self, model, fits: int):
        self.model, self.fits, self.calls = model, fits, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def sample_image(self, prompts, *, num_samples=1, **options):
        rows = len(prompts) * num_samples
        self.calls.append(rows)
        if rows > self.fits:  # mid-rollout: the streams have been drawn from
            for g in options["generator"]:
                torch.rand(3, generator=g)
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {rows} rows)")
        return self.model.sample_image(prompts, num_samples=num_samples, **options)


def test_out_of_memory_halves_the_chunk_and_keeps_it(tiny_toy):
    """auto: the whole group (8 rows) and then 4 run out of memory, 2 fits: the samples are the whole group's
    (bit for bit those of a run that starts at 2), each halving warns once, the size stays 2 for the next pass."""
    cfg = resolve(steps=1, group_size=4, guidance_scale=2.0)
    flaky, chunks = OutOfMemory(tiny_toy, fits=2), Chunks("auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sample_group(flaky, "gen", PROMPTS, cfg, torch.Generator().manual_seed(3), chunks)
    halvings = [str(w.message) for w in caught if issubclass(w.category, ChunkSizeWarning)]
    assert len(halvings) == 2 and "8 rows" in halvings[0] and "retrying with 2" in halvings[1]
    assert flaky.calls == [8, 4, 2, 2, 2, 2] and chunks.size == 2
    assert chunks.metrics() == {"rollout/chunk_size": 2.0}
    from_two = sample_group(tiny_toy, "gen", PROMPTS, cfg, torch.Generator().manual_seed(3), Chunks(2))
    assert torch.equal(got.tokens, from_two.tokens) and torch.equal(got.logps, from_two.logps)
    whole = sample_group(tiny_toy, "gen", PROMPTS, cfg, torch.Generator().manual_seed(3))
    _assert_same_samples(got, whole)
    flaky.calls.clear()
    sample_group(flaky, "gen", PROMPTS, cfg, torch.Generator().manual_seed(4), chunks)
    assert flaky.calls == [2, 2, 2, 2]  # remembered: no new attempt at 8


def test_out_of_memory_at_one_row_is_a_one_line_error(tiny_toy):
    cfg = resolve(steps=1, group_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChunkSizeWarning)
        with pytest.raises(TrainingError) as info:
            sample_group(OutOfMemory(tiny_toy, fits=0), "gen", PROMPTS, cfg, torch.Generator(), Chunks("auto"))
    message = str(info.value)
    assert "\n" not in message and "memory plan" in message and "LoRA" in message and "group_size" in message


def test_chunk_size_setting():
    from suder.config import coerce
    from suder.errors import ConfigError

    assert resolve(steps=1).rollout_chunk_size == "auto"
    assert resolve(steps=1, rollout_chunk_size="8").rollout_chunk_size == 8
    assert coerce("rollout_chunk_size", "auto") == "auto" and coerce("rollout_chunk_size", "4") == 4
    for bad in (0, -2, "half", True):
        with pytest.raises(ConfigError, match="rollout_chunk_size"):
            resolve(steps=1, rollout_chunk_size=bad)
    from suder.run_options import parse_run

    for flag, want in (("auto", "auto"), ("4", 4)):
        assert resolve(steps=1, flags=parse_run(["--rollout-chunk-size", flag])[1]).rollout_chunk_size == want


def test_trainer_step_logs_the_chunk_size(tiny_toy_path, tmp_path):
    """A training step in chunks of 3 rows (4 x 2-sample groups per direction) runs and logs
    rollout/chunk_size; the same step with the whole group gives the same rewards."""
    from suder.trainer import Trainer

    def first_step(size):
        cfg = resolve(model=tiny_toy_path, steps=1, group_size=2, batch_size=4, rollout_chunk_size=size,
                      output_dir=str(tmp_path / str(size)), sample_every=0, save_every=0)
        trainer = Trainer(cfg)
        metrics = trainer.step(0)
        return metrics, [r.rewards for r in trainer.last_rollouts]

    chunked, rewards = first_step(3)
    whole, whole_rewards = first_step("auto")
    assert chunked["rollout/chunk_size"] == 3.0 and whole["rollout/chunk_size"] == 8.0
    for got, want in zip(rewards, whole_rewards, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes_agree_on_the_chunk_size_after_an_oom(tiny_toy_path, tmp_path):
    """Rank 1 runs out of memory at its first sampling call: both ranks retry with half the rows and keep the
    same size, nobody hangs (the command has a timeout), and the warning is given once, on rank 1."""
    script = ROOT / "tests" / "distributed_scripts" / "chunk_oom.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29711",
           str(script), tiny_toy_path, str(tmp_path / "run")]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    import os

    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {path.stem.split("-")[1]: path.read_text() for path in tmp_path.glob("rank-*.txt")}
    assert set(lines) == {"0", "1"}, proc.stdout + proc.stderr[-3000:]
    for rank, line in lines.items():
        fields = dict(f.split("=") for f in line.split())
        assert fields["size"] == "4" and fields["metric"] == "4.0", line
        assert fields["warnings"] == ("1" if rank == "1" else "0"), line
        assert fields["same"] == "True", line


def test_janus_sample_batch_size_keeps_each_rows_stream():
    """Janus-Pro's own ``sample_batch_size`` (rows per sampler call inside one backbone call) hands each call its
    rows' generators: images and captions are those of one call for all rows."""
    import janus_tiny

    cfg = resolve(steps=1, group_size=G, guidance_scale=3.0)
    whole, split = janus_tiny.tiny_backbone(), janus_tiny.tiny_backbone(sample_batch_size=4)
    for direction, inputs in (("gen", PROMPTS), ("und", janus_tiny.random_images(2))):
        want = sample_group(whole, direction, inputs, cfg, torch.Generator().manual_seed(8))
        got = sample_group(split, direction, inputs, cfg, torch.Generator().manual_seed(8))
        _assert_same_samples(got, want)
