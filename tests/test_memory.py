"""The memory plan (``suder.memory``): config facts, each term's arithmetic, the fit check and its advice, ``suder
plan``, the start of ``suder run``, and the estimate against measured peaks of tiny runs at real image geometry."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from suder import memory
from suder.config import resolve
from suder.errors import BackboneError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
JANUS_7B = "deepseek-community/Janus-Pro-7B"


@functools.cache
def facts(backbone: str, model: str | None = None, device: str = "cuda") -> memory.ModelFacts:
    return memory.model_facts(backbone, model, {}, device)


def janus_cfg(**kw):
    data = dict(prompts=str(ROOT / "README.md"), images=str(ROOT / "docs"))
    return resolve(None, None, backbone="janus-pro", model=JANUS_7B, **(data | kw))


def bench():
    spec = importlib.util.spec_from_file_location("memory_plan_bench", ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ facts
@pytest.mark.parametrize("model,params,layers,hidden", [
    ("deepseek-community/Janus-Pro-1B", 2.0766e9, 24, 2048),  # model.safetensors: 4.15 GB in bf16
    (JANUS_7B, 7.4078e9, 30, 4096),  # 14.8 GB in bf16
])
def test_janus_pro_config_facts_give_the_released_checkpoints_sizes(model, params, layers, hidden):
    f = facts("janus-pro", model)
    assert f.weights == pytest.approx(params, rel=1e-3)
    assert f.weight_bytes == pytest.approx(2 * params, rel=1e-3)  # bf16 on a GPU
    assert (f.lm.layers, f.lm.hidden, f.image_tokens, f.image_vocab, f.text_vocab) == (layers, hidden, 576, 16384,
                                                                                        102400)
    # the language model's layers and norm in both directions, never the VQ model or the text embeddings
    assert f.trainable["gen"] < f.trainable["unified"] < f.weights - 102400 * hidden
    assert facts("janus-pro", model, "cpu").weight_bytes == pytest.approx(2 * f.weight_bytes, rel=1e-6)  # float32


def test_show_o_full_size_is_phi_1_5_with_its_image_tokens():
    f = facts("show-o", "showlab/show-o")
    assert (f.lm.layers, f.lm.hidden, f.lm.intermediate, f.lm.heads) == (24, 2048, 8192, 32)
    assert (f.image_tokens, f.image_vocab, f.image_sampler, f.sampling_steps) == (256, 8192, "masked", 18)
    assert 1.40e9 < f.trainable["unified"] < 1.46e9  # Phi-1.5 (1.42B) with Show-o's larger vocabulary
    assert facts("show-o", "showlab/show-o-512x512").image_tokens == 1024


def test_a_plugin_backbone_without_memory_facts_has_no_plan(monkeypatch):
    from suder import registry

    toy = facts("toy")
    spec = registry.BackboneSpec("nofacts", lambda **kw: None, "", "p", "d")
    monkeypatch.setattr(registry, "get_backbone_spec", lambda name: spec)
    with pytest.raises(BackboneError, match="memory_facts"):
        memory.model_facts("nofacts")
    spec.factory.memory_facts = lambda **kw: toy  # the optional hook of docs/writing-a-plugin.md
    assert memory.model_facts("nofacts") is toy


# ------------------------------------------------------------------------------------------ terms
def test_the_kv_cache_of_an_image_rollout_is_layers_x_2_x_heads_x_dim_x_tokens_x_rows_x_bytes():
    """Janus-Pro-7B, one prompt x G=16 with guidance (32 rows), 48 + 576 tokens, bf16: 30 x 2 x 32 x 128 x 624 x
    32 x 2 bytes = 9.80 GB, the 'several GB' of the issue."""
    f = facts("janus-pro", JANUS_7B)

    def kv(cfg, **kw) -> float:
        return next(t.bytes for t in memory.plan(cfg, f, **kw).phases["rollout"] if t.name == "gen KV cache")

    cfg = janus_cfg(batch_size=1, group_size=16, strategy="gen")
    assert kv(cfg) == 30 * 2 * 32 * 128 * 624 * 32 * 2
    assert kv(janus_cfg(batch_size=1, group_size=16, strategy="gen", guidance_scale=1.0)) == kv(cfg) / 2  # no CFG
    # a rollout chunk of 4 samples holds a quarter of it: as an argument, or the run's rollout_chunk_size
    assert kv(cfg, chunk=4) == kv(cfg) / 4
    whole = kv(cfg)
    cfg.rollout_chunk_size = 4
    assert kv(cfg) == whole / 4
    cfg.rollout_chunk_size = "auto"  # chosen at run time: the plan keeps the whole group
    assert kv(cfg) == whole


def _terms(p: memory.MemoryPlan, phase: str = "update") -> dict[str, float]:
    return {t.name: t.bytes for t in p.persistent + p.phases[phase]}


def test_engines_shard_what_they_shard():
    """DDP: nothing (and a second gradient copy in its buckets); ZeRO-2: gradients and optimizer; ZeRO-3 and FSDP2:
    weights too. AdamW in bf16 keeps two bf16 moments per trained parameter."""
    f = facts("janus-pro", JANUS_7B)
    cfg = janus_cfg(algo="grpo")  # GRPO's KL term keeps a frozen reference
    one = _terms(memory.plan(cfg, f))
    trained = f.trainable["unified"]
    assert one["weights"] == one["reference"] == f.weight_bytes
    assert one["optimizer"] == trained * 2 * 2 and one["gradients"] == trained * 2
    ddp = _terms(memory.plan(cfg, f, engine="ddp", processes=8))
    assert ddp["weights"] == f.weight_bytes and ddp["gradients"] == 2 * one["gradients"]
    zero2 = _terms(memory.plan(cfg, f, engine="zero2", processes=8))
    assert zero2["weights"] == f.weight_bytes
    assert zero2["gradients"] == one["gradients"] / 8 and zero2["optimizer"] == one["optimizer"] / 8
    for engine in ("zero3", "fsdp2"):
        sharded = memory.plan(cfg, f, engine=engine, processes=8)
        assert _terms(sharded)["weights"] == f.weight_bytes / 8 and _terms(sharded)["gradients"] == one["gradients"] / 8
        # the rollout reads whole weights: the rest of them is gathered on top of the shard
        assert _terms(sharded, "rollout")["gathered weights"] == f.weight_bytes * 7 / 8
    mixed = _terms(memory.plan(janus_cfg(mixed_precision="bf16"), facts("janus-pro", JANUS_7B, "cpu"),
                               engine="zero2", processes=2, device="cpu"))
    assert mixed["master weights"] == trained * 4 / 2 and mixed["optimizer"] == trained * 8 / 2  # float32


def test_lora_trains_the_adapters_and_its_reference_is_the_adapters():
    f = facts("janus-pro", JANUS_7B)
    assert f.lora == 30 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r 16 on q,k,v,o and gate,up,down
    lora = _terms(memory.plan(janus_cfg(algo="grpo", backbone_options={"lora": True}), f))
    assert lora["reference"] == f.lora * 4 and lora["optimizer"] == f.lora * 8 and lora["gradients"] == f.lora * 4
    assert "reference" not in _terms(memory.plan(janus_cfg(strategy="gen", grpo_beta=0.0), f))  # nothing reads one
    # the held-out self-evaluation is scored by the frozen base
    held = janus_cfg(strategy="gen", grpo_beta=0.0, eval_every=50, heldout=0.05)
    assert _terms(memory.plan(held, f))["reference"] == f.weight_bytes


def test_gradient_checkpointing_keeps_each_layers_input_and_one_layer():
    f = facts("janus-pro", JANUS_7B)
    g, seq, rows = f.lm, f.prompt_tokens + f.image_tokens, 2 * 8 * 2  # SimPO pairs of 8 prompts, with guidance
    per_layer = g.saved_per_token(seq, 2)
    off = _terms(memory.plan(janus_cfg(strategy="gen"), f))["activations"]
    on = _terms(memory.plan(janus_cfg(strategy="gen", gradient_checkpointing=True), f))["activations"]
    assert off == rows * seq * (g.layers * per_layer + 2 * g.hidden * 2)
    assert on == rows * seq * (g.layers * g.hidden * 2 + per_layer + 2 * g.hidden * 2)
    assert off / on > 10
    # both directions: each keeps its layers' inputs; the backward recomputes one layer of one forward at a time
    both = _terms(memory.plan(janus_cfg(strategy="unified", gradient_checkpointing=True), f))["activations"]
    und = _terms(memory.plan(janus_cfg(strategy="und", gradient_checkpointing=True), f))["activations"]
    und_seq, und_rows = f.und_prefix + f.caption_tokens, 2 * 8
    und_recompute = und_rows * und_seq * g.saved_per_token(und_seq, 2)
    assert both == pytest.approx(on + und - min(rows * seq * per_layer, und_recompute))


def test_the_input_images_of_a_micro_batch_are_encoded_in_one_call():
    """Captioning rewards encode a micro-batch's images in one call (``decode_batch_size`` chunks the decoding of
    samples only), at ``CODEC_ENCODE`` x channels x pixels x bytes per image."""
    f = facts("janus-pro", JANUS_7B)
    small = memory.dataclasses.replace(f.lm, layers=1, hidden=8, intermediate=8, heads=1, kv_heads=1, head_dim=8)
    for decode in (1, 8):  # a small language model: the encoding is the scoring phase's largest term
        f1 = memory.dataclasses.replace(f, codec_batch=decode, lm=small, text_vocab=16, image_vocab=16)
        for images in (2, 4):
            scoring = _terms(memory.plan(janus_cfg(strategy="und", batch_size=images), f1), "scoring")
            assert scoring["und image encoding"] == pytest.approx(
                memory.CODEC_ENCODE * f.codec_channels * f.image_size**2 * 2 * images)


def test_a_plan_that_does_not_fit_says_what_would():
    f = facts("janus-pro", JANUS_7B)
    cfg = janus_cfg(batch_size=1, group_size=16)
    p = memory.plan(cfg, f)
    with pytest.raises(ConfigError) as err:
        memory.check_fits(p, cfg, 80 * memory.GiB, "cuda:0")
    message = str(err.value)
    assert "\n" not in message and f"{p.peak / memory.GiB:.1f} GiB" in message and "what would fit" in message
    assert "LoRA" in message
    # each suggestion fits when applied
    lora = memory.plan(janus_cfg(batch_size=1, group_size=16, backbone_options={"lora": True}), f)
    assert lora.peak <= 0.9 * 80 * memory.GiB
    memory.check_fits(lora, cfg, 80 * memory.GiB, "cuda:0")  # fits: no error


def test_parse_bytes():
    assert memory.parse_bytes("80GiB") == 80 * 2**30
    assert memory.parse_bytes("24GB") == 24 * 10**9
    assert memory.parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ConfigError, match="80GiB"):
        memory.parse_bytes("lots")


# ------------------------------------------------------------------------------------------ the commands
def test_suder_plan_prints_the_table_or_json(tiny_toy_path, capsys):
    from suder.cli import main

    assert main(["plan", "--model", str(tiny_toy_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backbone"] == "toy" and out["peak_phase"] in out["phases"] and out["fits"] is None  # CPU
    assert main(["plan", "--model", str(tiny_toy_path), "--device-memory", "1MiB"]) == 0
    text = capsys.readouterr().out
    assert "Memory plan: toy" in text and "Does not fit" in text and "a 1MiB device has 0.0 GiB" in text


def test_suder_run_stops_before_loading_weights_when_the_gpu_is_too_small(tiny_toy_path, tmp_path, monkeypatch,
                                                                         capsys):
    import suder.trainer
    from suder.cli import main

    monkeypatch.setattr(memory, "device_memory", lambda: ("cuda:0", float(2**20)))
    monkeypatch.setattr(suder.trainer, "train", lambda *a, **k: pytest.fail("the run loaded its model"))
    code = main(["run", "--model", str(tiny_toy_path), "--output-dir", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Memory plan: toy" in err
    assert "Error: The memory plan needs" in err and "cuda:0 has 0.0 GiB" in err


def test_auto_rollout_chunk_is_the_largest_whose_plan_fits(tiny_toy_path):
    """``rollout_chunk_size: auto`` on a GPU: the whole group when the plan fits; else the largest halving of the
    group batch that fits; None when no chunk helps (the update decides the peak) or a number is given."""
    # best-worst caption pairs: the update forwards 2 rows, so the rollout's 64 decide the peak
    cfg = resolve(model=str(tiny_toy_path), group_size=64, batch_size=1, steps=1, und={"simpo_pairs": "best-worst"})
    f = memory.facts_for(cfg, "cuda")

    def device_for(peak: float) -> float:  # the device whose usable memory is just above ``peak``
        return peak / memory.FIT_MARGIN * 1.001

    assert memory.auto_chunk(cfg, device_for(memory.plan(cfg, f).peak), facts=f) is None
    sizes = []
    for k in (32, 8, 2):
        device = device_for(memory.plan(cfg, f, chunk=k).peak)
        got = memory.auto_chunk(cfg, device, facts=f)
        limit = device * memory.FIT_MARGIN
        assert got is not None and memory.plan(cfg, f, chunk=got).peak <= limit
        assert got >= k and memory.plan(cfg, f, chunk=2 * got).peak > limit  # the largest that fits
        sizes.append(got)
    assert sizes[0] > sizes[-1]  # smaller devices, smaller chunks
    assert memory.auto_chunk(cfg, device_for(memory.plan(cfg, f, chunk=1).peak) * 0.98, facts=f) is None
    fixed = memory.dataclasses.replace(cfg, rollout_chunk_size=4)
    assert memory.auto_chunk(fixed, device_for(memory.plan(cfg, f, chunk=2).peak), facts=f) is None


def test_suder_run_starts_auto_chunks_where_the_plan_fits(tiny_toy_path, tmp_path, monkeypatch, capsys):
    """On a GPU too small for the whole group's rollout, ``suder run`` does not stop: it prints the chunk the plan
    fits and the run samples in chunks of that size from its first step (the ``rollout/chunk_size`` metric)."""
    from suder.cli import main

    cfg = resolve(model=str(tiny_toy_path), group_size=64, batch_size=1, steps=1, und={"simpo_pairs": "best-worst"})
    f = memory.facts_for(cfg, "cuda")
    device = memory.plan(cfg, f, chunk=16).peak / memory.FIT_MARGIN * 1.001
    expected = memory.auto_chunk(cfg, device, facts=f)
    assert expected is not None and expected < 64
    monkeypatch.setattr(memory, "device_memory", lambda: ("cuda:0", device))
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_toy_path), "--output-dir", str(out), "--steps", "1", "--group-size",
                 "64", "--batch-size", "1", "--und.simpo-pairs", "best-worst", "--sample-every", "0",
                 "--save-every", "0"])
    text = capsys.readouterr()
    assert code == 0, text.err[-2000:]
    assert f"rollout_chunk_size auto: {expected} samples per call" in text.out + text.err
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step["rollout/chunk_size"] == expected


# ------------------------------------------------------------------------------------------ measured
@pytest.mark.parametrize("case,checkpointing", [("toy", False), ("show-o-256", False), ("show-o-256", True),
                                                  ("janus-pro-576", False)])
def test_the_estimate_is_within_15_percent_of_the_measured_peak(case, checkpointing, tmp_path):
    """Two GRPO steps of a tiny model at the backbone's real image geometry, profiled from before the model loads
    (``benchmarks/memory_plan.py``); Janus-Pro's peak is its VQ decoder at 384 px, the others' the update (with
    gradient checkpointing, Show-o's peak is its VQ decoding of the samples)."""
    small = {"janus-pro-576": dict(batch_size=1, group_size=2)}.get(case, {})
    result = bench().run_case(case, tmp_path, "grpo", gradient_checkpointing=checkpointing, **small)
    assert 0.85 <= result["ratio"] <= 1.15, result


def test_resume_holds_one_copy_of_the_optimizer_state(tiny_toy_path, tmp_path):
    """accelerate's load_state while resuming: the peak of new allocations is the optimizer state itself, not two
    copies of it (a loaded state dict and the optimizer's own)."""
    import suder
    from suder.trainer import Trainer

    kw = dict(model=str(tiny_toy_path), steps=2, batch_size=2, group_size=2, grad_accum=1, sample_every=0,
              save_every=1, eval_num=4, output_dir=str(tmp_path / "run"))
    suder.train("toy", **kw)
    trainer = Trainer(resolve(None, None, backbone="toy", **(kw | {"resume": True, "steps": 3})))
    peak, _ = bench().measured_peak(lambda: trainer.writer.restore(trainer.acc, trainer.resume_from))
    state = trainer.engines["policy"].optimizer.state
    held = sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))
    assert held > 0 and peak <= 1.15 * held, (peak, held)
