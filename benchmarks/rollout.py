"""Rollout cost: image samplers against transformers' ``generate``, DSR rewards batched vs one by one, and one
trainer step split by phase. Writes JSON; asserts nothing about time (see ``docs/performance.md``).

    HF_HUB_OFFLINE=1 python benchmarks/rollout.py cpu   # tiny 576-token Janus, toy, rewards, trainer (1 thread)
    HF_HUB_OFFLINE=1 python benchmarks/rollout.py cpu --janus-only   # the Janus sampler tables only
    HF_HUB_OFFLINE=1 python benchmarks/rollout.py gpu   # Janus-Pro-1B architecture, random bf16 weights, CUDA

Equal work everywhere: 2 prompts of different lengths (left-padded) x G=8 images, CFG 5, 576 tokens, full
softmax (``top_k=0`` for ``generate``, whose default hides ``top_k=50``). Each method runs once to warm up,
then ``--repeats`` times interleaved with the others; the median is reported (the CPU machine is shared).
``cpu`` times the Janus samplers in float32 and in bfloat16 (the same weights, rounded), side by side, each with
the gap between sampled and teacher-forced log-probs of the same codes. ``gpu`` also states the
memory-bandwidth bound of the decode loop (weights + KV cache read per step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # suder without an install; the tests' tiny random Janus

PROMPT_LENGTHS = (20, 30)  # tokens, BOS ... BOI: two prompts, the shorter left-padded
GROUP, SCALE, TOKENS = 8, 5.0, 576
TOY_TOKENS = 64
SPEC_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


# ------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(methods: dict, repeats: int, device: str) -> dict:
    """Median seconds of each method (one warm-up call each, then ``repeats`` interleaved rounds): wall clock,
    and this process's CPU time (``cpu_median_s``: with one thread on a shared CPU, the time not spent waiting
    for a core that others hold)."""
    for fn in methods.values():
        fn()
    runs: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            runs[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "runs_s": v,
                   "cpu_median_s": statistics.median(cpu[name]), "cpu_runs_s": cpu[name]}
            for name, v in runs.items()}


def environment(device: str) -> dict:
    env = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
    import transformers

    env["transformers"] = transformers.__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        env["cpu"], env["cores"] = (names[0] if names else platform.processor()), os.cpu_count()
    return env


# ------------------------------------------------------------------------------------------ models
def tiny576():
    """The tests' tiny Janus with the real image geometry (384 px, 24 x 24 = 576 tokens): 3.5M parameters."""
    from janus_tiny import BOI, BOS, EOS, PAD, TINY_CONFIG
    from transformers import JanusConfig, JanusForConditionalGeneration

    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["vision_config"].update(image_size=384, patch_size=16, num_image_tokens=576)
    cfg["vq_config"]["channel_multiplier"] = [1, 1, 2, 2, 4]
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig(**cfg)).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(20.0)  # not near-uniform, as in the tests
    return _generation_config(model, BOS, EOS, PAD, BOI), (BOS, PAD, BOI, 300)


def janus_pro_1b(device: str):
    """Janus-Pro-1B's architecture (2.08B parameters; its config.json's sizes) with random bf16 weights."""
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    text = LlamaConfig(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                       max_position_embeddings=16384, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=100000,
                       eos_token_id=100001, pad_token_id=100015, tie_word_embeddings=False)
    cfg = JanusConfig(text_config=text, vision_config=JanusVisionConfig(), vq_config=JanusVQVAEConfig(),
                      image_token_id=100581, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    return _generation_config(model, 100000, 100001, 100015, 100016), (100000, 100015, 100016, 90000)


def _generation_config(model, bos, eos, pad, boi):
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = bos, eos, pad
    gc.generation_kwargs = {"boi_token_id": boi}  # where image-mode generate looks for it (as hub files set it)
    gc.guidance_scale = SCALE
    return model


def prompts(special, device):
    """(2, L) left-padded prompt ids and mask; the sampler's [cond x G; uncond x G] rows and mask."""
    bos, pad, boi, vocab = special
    width = max(PROMPT_LENGTHS)
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.full((2, width), pad), torch.zeros(2, width, dtype=torch.long)
    for i, n in enumerate(PROMPT_LENGTHS):
        ids[i, width - n :] = torch.cat([torch.tensor([bos]), torch.randint(10, vocab, (n - 2,), generator=g),
                                         torch.tensor([boi])])
        mask[i, width - n :] = 1
    rows, rmask = ids.repeat_interleave(GROUP, 0), mask.repeat_interleave(GROUP, 0)
    uncond = torch.where((rows == bos) | (rows == boi), rows, torch.full_like(rows, pad))
    both = torch.cat([rows, uncond]).to(device), torch.cat([rmask, rmask]).to(device)
    return (ids.to(device), mask.to(device)), both


# ------------------------------------------------------------------------------------------ samplers
def hf_static_loop(model, embeds, mask, *, num_tokens, guidance_scale, temperature, generator):
    """The reference loop on transformers' ``StaticCache`` through transformers' forward (measured only)."""
    from transformers import StaticCache

    from suder.backbones.janus_pro.sampling import draw, image_logits

    lm = model.model.language_model
    rows, length = mask.shape
    n = rows // 2
    cache = StaticCache(config=lm.config, max_cache_len=length + num_tokens)
    full = torch.cat([mask, mask.new_ones(rows, num_tokens)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    position = positions[:, -1:]
    tokens = torch.empty(n, num_tokens, dtype=torch.long, device=embeds.device)
    logps = torch.empty(n, num_tokens, device=embeds.device)
    for t in range(num_tokens):
        token, logp = draw(image_logits(model, out.last_hidden_state[:, -1], guidance_scale), temperature, generator)
        tokens[:, t], logps[:, t] = token, logp
        if t + 1 == num_tokens:
            break
        position = position + 1
        step = model.prepare_embeddings_for_image_generation(token.repeat(2))[:, None]
        out = lm(inputs_embeds=step, attention_mask=full[:, : length + t + 1], position_ids=position, cache=cache,
                 use_cache=True)
    return tokens, logps


def sampler_methods(model, device: str, special) -> tuple[dict, dict]:
    """The methods to time (same work each) and their (tokens, logps) for one CPU generator seed."""
    from suder.backbones.janus_pro.sampling import IMAGE_SAMPLERS

    (ids, mask), (rows, rmask) = prompts(special, device)
    embeds = model.get_input_embeddings()(rows)
    kw = dict(num_tokens=TOKENS, guidance_scale=SCALE, temperature=1.0)
    ours = {"suder reference": IMAGE_SAMPLERS["reference"], "suder fast": IMAGE_SAMPLERS["fast"],
            "hf StaticCache loop": hf_static_loop}
    if device == "cuda":
        ours["suder fast (no CUDA graphs)"] = IMAGE_SAMPLERS["fast-eager"]

    def ours_call(fn):
        return lambda: fn(model, embeds, rmask, generator=torch.Generator().manual_seed(0), **kw)

    methods = {name: ours_call(fn) for name, fn in ours.items()}
    methods["hf generate(image, top_k=0)"] = lambda: model.generate(
        input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=True, top_k=0,
        num_return_sequences=GROUP, guidance_scale=SCALE)
    outputs = {name: ours_call(fn)() for name, fn in ours.items()}
    return methods, outputs


def compare(outputs: dict, base: str) -> dict:
    ref_tokens, ref_logps = outputs[base]
    return {name: {"tokens_equal_fraction": (tokens == ref_tokens).float().mean().item(),
                   "max_abs_logp_diff": (logps - ref_logps).abs().max().item()}
            for name, (tokens, logps) in outputs.items() if name != base}


def teacher_forced(model, embeds, mask, tokens) -> torch.Tensor:
    """(n, N) guided log-probs of sampled codes from one forward, as ``logp_image_given_text`` computes them."""
    from suder.backbones.janus_pro.sampling import image_logits

    feed = model.prepare_embeddings_for_image_generation(tokens.repeat(2, 1)[:, :-1])
    full = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - 1)], 1)
    hidden = model.model.language_model(inputs_embeds=torch.cat([embeds, feed], 1), attention_mask=full,
                                        position_ids=(full.cumsum(-1) - 1).clamp_min(0),
                                        use_cache=False).last_hidden_state[:, mask.shape[1] - 1 :]
    return torch.log_softmax(image_logits(model, hidden, SCALE), -1).gather(-1, tokens[..., None]).squeeze(-1)


def drift(model, device, special, outputs: dict) -> dict:
    """|sampled .logps - teacher-forced log-probs| of the same codes, per sampler (the trainer's logp_drift)."""
    (_, _), (rows, rmask) = prompts(special, device)
    embeds = model.get_input_embeddings()(rows)
    out = {}
    for name, (tokens, logps) in outputs.items():
        gap = (logps - teacher_forced(model, embeds, rmask, tokens)).abs()
        out[name] = {"max": gap.max().item(), "mean": gap.mean().item()}
    return out


@torch.no_grad()
def sampler_table(model, device, special, repeats) -> dict:
    methods, outputs = sampler_methods(model, device, special)
    times = timed(methods, repeats, device)
    hf = times["hf generate(image, top_k=0)"]["median_s"]
    images = len(PROMPT_LENGTHS) * GROUP
    hf_cpu = times["hf generate(image, top_k=0)"]["cpu_median_s"]
    for row in times.values():
        row["image_tokens_per_s"] = images * TOKENS / row["median_s"]
        row["speedup_vs_hf_generate"] = hf / row["median_s"]
        row["cpu_speedup_vs_hf_generate"] = hf_cpu / row["cpu_median_s"]
    return {"work": {"prompts": len(PROMPT_LENGTHS), "prompt_tokens": list(PROMPT_LENGTHS), "group": GROUP,
                     "guidance_scale": SCALE, "image_tokens": TOKENS, "rows_per_step": 2 * images},
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "seconds": times,
            "agreement_with_suder_reference": compare(outputs, "suder reference"),
            "logp_drift_vs_teacher_forced": drift(model, device, special, outputs)}


def dtype_tables(model, device, special, repeats) -> dict:
    """``sampler_table`` in float32 and in bfloat16 (the same random weights, rounded), side by side."""
    tables = {name: sampler_table(model.to(dtype), device, special, repeats)
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    fp32, bf16 = tables["float32"]["seconds"], tables["bfloat16"]["seconds"]
    for key in ("median_s", "cpu_median_s"):
        tables[f"bfloat16_over_float32_{key}"] = {k: bf16[k][key] / fp32[k][key] for k in fp32}
    return tables


# ------------------------------------------------------------------------------------------ GPU bound
def bandwidth_bound(model, times: dict, bucket: int = 64) -> dict:
    """Decode-loop lower bound: bytes each step must read (the weights it uses once, the KV cache up to the
    current length) over the device's memory bandwidth. Prefill (one 30-token pass) is not in the bound."""
    lm, m = model.model.language_model, model.model
    weights = sum(p.numel() * p.element_size() for mod in (lm.layers, lm.norm, m.generation_head,
                                                           m.generation_aligner) for p in mod.parameters())
    cfg = lm.config
    rows, length = 2 * len(PROMPT_LENGTHS) * GROUP, max(PROMPT_LENGTHS)
    size = next(lm.parameters()).element_size()
    per_slot = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * cfg.head_dim * size  # K and V
    spans = [length + i + 1 for i in range(TOKENS - 1)]
    exact = sum(weights + per_slot * s for s in spans)
    bucketed = sum(weights + per_slot * min(length + -(-(s - length) // bucket) * bucket, length + TOKENS)
                   for s in spans)
    measured = copy_bandwidth()
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in SPEC_BANDWIDTH.items() if k in name), None)
    fast = times["suder fast"]["median_s"]
    out = {"weight_bytes_per_step": weights, "kv_bytes_per_slot": per_slot, "bytes_exact": exact,
           "bytes_read_by_bucketed_graphs": bucketed, "copy_bandwidth_Bps": measured, "spec_bandwidth_Bps": spec}
    for label, bw in (("measured", measured), ("spec", spec)):
        if bw:
            out[f"bound_s_{label}"] = exact / bw
            out[f"fast_over_bound_{label}"] = fast / (exact / bw)
    return out


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), best of 5."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() / best


# ------------------------------------------------------------------------------------------ toy
def toy_base(steps: int, out: str):
    """A default-size toy (1.07M parameters) after ``steps`` pre-training steps (short captions, like a base)."""
    from suder.backbones.toy import build_toy
    from suder.pretrain import pretrain

    if steps:
        pretrain("toy", out=out, steps=steps, seed=0, warmup_steps=min(20, steps))
        return build_toy(out)
    return build_toy()


def toy_sampler_table(toy, repeats: int) -> dict:
    """ms per group batch of ``suder run`` (8 prompts x 8 images x 64 codes = 64 rows), reference vs fast."""
    from suder.worlds import shapes

    batch = shapes.sample_prompts(8, seed=0)
    out = {}
    for scale in (1.0, 3.0):  # the toy samples at 1 (its default); 3 doubles the rows

        def run(sampler, scale=scale):
            return toy.sample_image(batch, num_samples=GROUP, generator=torch.Generator().manual_seed(0),
                                    guidance_scale=scale, sampler=sampler)

        a, b = run("reference"), run("fast")
        methods = {s: (lambda s=s: run(s)) for s in ("reference", "fast")}
        methods["matrix products only"] = toy_products(toy, rows=len(batch) * GROUP * (2 if scale != 1 else 1))
        times = timed(methods, repeats, "cpu")
        out[f"guidance_{scale:g}"] = {
            "rows_per_step": len(batch) * GROUP * (2 if scale != 1 else 1),
            "ms_per_group_batch": {k: 1000 * v["median_s"] for k, v in times.items()},
            "speedup": times["reference"]["median_s"] / times["fast"]["median_s"],
            "tokens_equal": bool(torch.equal(a.tokens, b.tokens)),
            "max_abs_logp_diff": (a.logps - b.logps).abs().max().item(), "seconds": times}
    return out


def toy_products(toy, rows: int):
    """The decode loop's linear layers alone (63 steps x every projection and MLP + the code head): the part
    of a toy sampling call no loop restructuring removes in float32 on one CPU thread."""
    lm, codes = toy.lm, len(toy._code_ids)
    x = torch.randn(rows, 1, lm.config.hidden_size)
    mid = torch.randn(rows, 1, lm.config.intermediate_size)
    head = lm.lm_head.weight[:codes]

    @torch.no_grad()
    def run():
        for _ in range(TOY_TOKENS - 1):
            for layer in lm.model.layers:
                a, mlp = layer.self_attn, layer.mlp
                a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(x), mlp.gate_proj(x), mlp.up_proj(x)
                mlp.down_proj(mid)
            torch.nn.functional.linear(x, head)

    return run


# ------------------------------------------------------------------------------------------ rewards
def reward_table(model, prompts_, images, repeats: int) -> dict:
    """DSR rewards of one group batch: one batched pass vs one pass per sample (same values)."""
    from suder import rewards

    gen = torch.Generator().manual_seed(0)
    ctx = rewards.RewardContext(scorer=model)
    with torch.no_grad():
        pictures = model.sample_image(prompts_, num_samples=GROUP, generator=gen)
        _ = pictures.images  # decoded once, outside the timing (the trainer decodes for the reward too)
        captions = model.sample_text(images, num_samples=GROUP, generator=gen)
    cases = {"gen (log p(prompt | image))": (rewards.dsr_generation, pictures),
             "und (log p(image | caption))": (rewards.dsr_understanding, captions)}
    out = {}
    for name, (fn, samples) in cases.items():
        rows = len(samples)

        def batched(fn=fn, samples=samples):
            return fn(ctx, samples)

        def one_by_one(fn=fn, samples=samples, rows=rows):
            return torch.cat([fn(ctx, samples.select([i])) for i in range(rows)])

        with torch.no_grad():
            diff = (batched() - one_by_one()).abs().max().item()
            times = timed({"batched": batched, "one_by_one": one_by_one}, repeats, model.device.type)
        out[name] = {"rows": rows, "ms": {k: 1000 * v["median_s"] for k, v in times.items()},
                     "speedup": times["one_by_one"]["median_s"] / times["batched"]["median_s"],
                     "max_abs_reward_diff": diff}
    return out


def rewards_all(toy, repeats: int) -> dict:
    from janus_tiny import random_images, tiny_backbone

    from suder.worlds import shapes

    scenes = shapes.sample_scenes(8, seed=1)
    return {"toy (8 inputs x G=8)": reward_table(toy, shapes.sample_prompts(8, seed=0),
                                                 [shapes.render(s) for s in scenes], repeats),
            "tiny janus-pro, 64 tokens (2 inputs x G=8)": reward_table(
                tiny_backbone(max_caption_tokens=16), ["a red circle", "a green triangle left of a yellow star"],
                random_images(2), repeats)}


# ------------------------------------------------------------------------------------------ trainer
def trainer_table(base: str, steps: int) -> dict:
    """Per-phase seconds of toy trainer steps (median over steps 2..), fast vs reference image sampler."""
    import suder
    from suder.backbones.toy import ToyUnifiedLM

    fast = ToyUnifiedLM._sample_codes_fast
    out = {}
    for sampler in ("reference", "fast"):
        for algo in ("simpo", "grpo"):
            metrics: list[dict] = []
            ToyUnifiedLM._sample_codes_fast = fast if sampler == "fast" else ToyUnifiedLM._sample_codes_reference
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    suder.train("toy", algo, model=base, output_dir=tmp, steps=steps, sample_every=0,
                                save_every=0, eval_num=8, callback=metrics.append)
            finally:
                ToyUnifiedLM._sample_codes_fast = fast
            keys = sorted(k for k in metrics[0] if k.startswith("time/"))
            out[f"{algo}, {sampler} sampler"] = {
                k: statistics.median(m[k] for m in metrics[1:]) for k in keys}
    return {"config": "suder run defaults: 8 prompts + 8 images x G=8, toy, CFG 1, batch 64", "steps_timed":
            steps - 1, "seconds_per_step": out}


# ------------------------------------------------------------------------------------------ main
def run_cpu(args) -> dict:
    torch.set_num_threads(1)
    result = {"environment": environment("cpu")}
    model, special = tiny576()
    result["janus_tiny576_sampler"] = dtype_tables(model, "cpu", special, args.repeats)
    if args.janus_only:
        result["environment"]["load_average_end"] = list(os.getloadavg())
        return result
    with tempfile.TemporaryDirectory() as tmp:
        toy = toy_base(args.toy_pretrain_steps, os.path.join(tmp, "toy")).eval()
        result["toy_sampler"] = toy_sampler_table(toy, args.repeats)
        result["dsr_rewards"] = rewards_all(toy, args.repeats)
        if args.trainer_steps:
            result["trainer_step"] = trainer_table(os.path.join(tmp, "toy"), args.trainer_steps)
    result["environment"]["load_average_end"] = list(os.getloadavg())
    return result


def run_gpu(args) -> dict:
    from suder.backbones.janus_pro.sampling import IMAGE_SAMPLERS

    assert torch.cuda.is_available(), "the gpu benchmark needs CUDA"
    result = {"environment": environment("cuda")}
    tiny, special = tiny576()  # exactness on this GPU in float32: graphs vs the reference loop
    (_, _), (rows, rmask) = prompts(special, "cuda")
    tiny = tiny.to("cuda")
    with torch.no_grad():
        embeds = tiny.get_input_embeddings()(rows)
        outs = {name: IMAGE_SAMPLERS[name](tiny, embeds, rmask, num_tokens=TOKENS, guidance_scale=SCALE,
                                           temperature=1.0, generator=torch.Generator().manual_seed(0))
                for name in ("reference", "fast", "fast-eager")}
    result["tiny576_fp32_agreement_with_reference"] = compare(outs, "reference")
    result["dsr_rewards"] = rewards_on_gpu(args.repeats)
    del tiny
    model, special = janus_pro_1b("cuda")
    table = sampler_table(model, "cuda", special, args.repeats)
    table["memory_bandwidth_bound"] = bandwidth_bound(model, table["seconds"])
    result["janus_pro_1b_bf16_sampler"] = table
    result["environment"]["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def rewards_on_gpu(repeats: int) -> dict:
    """The reward table with the models on the GPU (a random default-size toy, the tiny Janus)."""
    from janus_tiny import random_images, tiny_backbone

    from suder.backbones.toy import build_toy
    from suder.worlds import shapes

    out = {}
    try:
        out["toy, random weights (8 inputs x G=8)"] = reward_table(
            build_toy(device="cuda").eval(), shapes.sample_prompts(8, seed=0),
            [shapes.render(s) for s in shapes.sample_scenes(8, seed=1)], repeats)
        out["tiny janus-pro, 64 tokens (2 inputs x G=8)"] = reward_table(
            tiny_backbone(max_caption_tokens=16).to("cuda"), ["a red circle", "a green triangle left of a yellow star"],
            random_images(2), repeats)
    except Exception as exc:  # a failure here must not cost the sampler numbers of a short GPU lease
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["cpu", "gpu"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--toy-pretrain-steps", type=int, default=100)
    parser.add_argument("--trainer-steps", type=int, default=4, help="0 skips the trainer step")
    parser.add_argument("--janus-only", action="store_true", help="cpu: only the Janus sampler tables")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/rollout-<target>.json")
    args = parser.parse_args()
    result = run_cpu(args) if args.target == "cpu" else run_gpu(args)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"rollout-{args.target}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
