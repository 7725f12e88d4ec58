"""The GPU suite in one command (``bash benchmarks/gpu_suite.sh``): rollout speed, one DSR step by phase, peak
memory and the distributed checks, written as one JSON. Asserts nothing about time (``docs/performance.md``).

    bash benchmarks/gpu_suite.sh                 # a GPU: full-size models, random bf16 weights (under 8 minutes)
    bash benchmarks/gpu_suite.sh --tiny          # CPU: the tests' tiny models, the same code path (under a minute)
    bash benchmarks/gpu_suite.sh --out FILE      # default: benchmarks/results/gpu-suite[-tiny].json

Sections of the JSON:

- ``janus_pro_rollout``: images/s of suder's rollout (``sample_group``: per-sample generators, chunks, the fast
  sampler with CUDA graphs) against transformers' ``generate(generation_mode="image", top_k=0)`` on the same
  prompts and group, guided (CFG 5). Full: Janus-Pro-1B's architecture (the sizes of
  deepseek-community/Janus-Pro-1B's config.json: Llama 24 x 2048, 16 heads, vocabulary 102400, 576 image tokens,
  SigLIP-L 384 px) with random bf16 weights and a small real ``JanusProcessor`` (its tokenizer is the tests' tiny
  one: prompts are shorter than real ones, the network is full size).
- ``show_o_rollout``: images/s of suder's rollout against a plain loop of Show-o's MaskGIT sampler as its
  ``t2i_generate`` runs it (one forward of [cond; uncond] per step, guided logits, multinomial draw, Gumbel
  re-masking), which is ``suder.backbones.show_o.sampling.maskgit_sample`` on the model's logits without suder's
  per-sample streams, chunks or the log-prob pass. Full: Show-o's Phi-1.5 geometry (24 x 2048, 32 heads,
  vocabulary 58498, 256 image tokens at 256 px, MAGVIT-v2 with 8192 codes), random bf16 weights.
- ``dsr_step``: two training steps of the Janus-Pro model above (``Trainer.step``, unified SimPO on ShapesWorld
  prompts and scenes), the second one's ``time/*`` phases (the first one warms up: CUDA graph capture, allocator),
  and the peak memory of the step (``torch.cuda.max_memory_allocated``) against the memory plan (``suder.memory``
  when the installed suder has one, else null).
- ``embedded_defaults``: ``suder run --backbone NAME`` for a few steps (full: 5 steps, 64 judged prompts and
  scenes; ``--tiny``: 1 step, 4) on each built-in's shipped ShapesWorld base: the digest of the base the run trained
  (the same weights as on a CPU), the judge before and after, the time.
- ``distributed``: ``benchmarks/distributed_gpu.sh`` (its JSON) on a machine with 2 or more GPUs; on one GPU or
  with ``--tiny``, the reason it did not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # suder from this checkout; the tests' tiny models and processor

PROMPTS = ["a red circle above a blue square", "two green triangles left of a yellow star"]
SIZES = {  # group per prompt, Show-o MaskGIT steps, caption tokens of the DSR step, timed repeats
    "full": {"group": 16, "show_o_steps": 18, "caption_tokens": 64, "repeats": 2, "batch": 2},
    "tiny": {"group": 2, "show_o_steps": 4, "caption_tokens": 8, "repeats": 1, "batch": 1},
}
GUIDANCE = 5.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(methods: dict[str, Any], repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median seconds of each method: one warm-up call each, then ``repeats`` rounds, interleaved."""
    for fn in methods.values():
        fn()
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(v), "runs_s": v} for name, v in runs.items()}


def images_per_second(times: dict, images: int, baseline: str) -> dict:
    """Each method's images/s and its speedup over ``baseline`` (``> 1``: faster than the baseline)."""
    base = times[baseline]["median_s"]
    return {"baseline": baseline, **{name: {"images_per_s": images / row["median_s"], "speedup_vs_baseline":
                                            base / row["median_s"], **row} for name, row in times.items()}}


# ------------------------------------------------------------------------------------------ models
def janus_processor(image_size: int, image_tokens: int):
    """A real ``JanusProcessor`` over the tests' tiny tokenizer, at ``image_size`` px and ``image_tokens``."""
    import janus_tiny
    from tokenizers import Tokenizer
    from transformers import JanusProcessor, PreTrainedTokenizerFast
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(janus_tiny._tokenizer_json()), bos_token=janus_tiny.BOS_TOKEN,
        eos_token=janus_tiny.EOS_TOKEN, pad_token=janus_tiny.PAD_TOKEN, padding_side="left",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})
    images = JanusImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)
    return JanusProcessor(image_processor=images, tokenizer=tokenizer, chat_template=janus_tiny.CHAT_TEMPLATE,
                          use_default_system_prompt=True, num_image_tokens=image_tokens)


def janus_backbone(tiny: bool, device: torch.device, caption_tokens: int):
    """(backbone, description): the tests' tiny Janus (CPU, float32) or Janus-Pro-1B's architecture (bf16)."""
    import janus_tiny
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    from suder.backbones.janus_pro import JanusProBackbone

    if tiny:
        model, processor = janus_tiny.tiny_model(), janus_tiny.tiny_processor()
        about = {"model": "tests/janus_tiny.py", "image_tokens": janus_tiny.NUM_IMAGE_TOKENS, "dtype": "float32"}
    else:  # deepseek-community/Janus-Pro-1B config.json: text_config (Llama) and the default vision / VQ configs
        text = LlamaConfig(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                           max_position_embeddings=16384, rms_norm_eps=1e-6, hidden_act="silu",
                           tie_word_embeddings=False)
        config = JanusConfig(text_config=text, vision_config=JanusVisionConfig(), vq_config=JanusVQVAEConfig(),
                             image_token_id=janus_tiny.IMG, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = JanusForConditionalGeneration(config).to(torch.bfloat16).eval()
        processor = janus_processor(384, 576)
        about = {"model": "Janus-Pro-1B architecture, random weights", "image_tokens": 576, "dtype": "bfloat16",
                 "parameters": sum(p.numel() for p in model.parameters())}
    gc = model.generation_config  # what image-mode generate reads (as the hub's generation_config.json sets)
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = janus_tiny.BOS, janus_tiny.EOS, janus_tiny.PAD
    gc.generation_kwargs = {"boi_token_id": janus_tiny.BOI}
    backbone = JanusProBackbone.from_model(model.to(device), processor, guidance_scale=GUIDANCE,
                                           max_caption_tokens=caption_tokens)
    return backbone, about


def show_o_backbone(tiny: bool, device: torch.device):
    """(backbone, description): the tests' tiny Show-o, or Show-o's Phi-1.5 geometry with random bf16 weights
    (the tests' tokenizer padded to Phi-1.5's 50295 tokens, so that every id sits where Show-o's does)."""
    import show_o_tiny

    from suder.backbones.show_o.factory import from_parts
    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.backbones.show_o.modeling import Showo

    if tiny:
        showo, vq, tokenizer = show_o_tiny.tiny_parts()
        about = {"model": "tests/show_o_tiny.py", "image_tokens": show_o_tiny.TINY_LLM["num_vq_tokens"],
                 "dtype": "float32"}
    else:
        tokenizer = show_o_tiny.tiny_tokenizer()
        tokenizer.add_tokens([f"<unused{i}>" for i in range(50295 - len(tokenizer))])
        torch.manual_seed(0)
        with torch.device(device):
            showo, vq = Showo(llm_vocab_size=len(tokenizer)).to(torch.bfloat16).eval(), MAGVITv2().eval()
        about = {"model": "Show-o (Phi-1.5) architecture, random weights", "image_tokens": 256,
                 "dtype": "bfloat16", "parameters": sum(p.numel() for p in showo.parameters())}
    backbone = from_parts(showo.to(device), vq.to(device), tokenizer, guidance_scale=GUIDANCE)
    return backbone, about


# ------------------------------------------------------------------------------------------ sections
@torch.no_grad()
def janus_rollout(backbone, about: dict, size: dict, device: torch.device) -> dict:
    """suder's rollout vs transformers' image-mode ``generate`` (same prompts, group, guidance, full softmax)."""
    from suder.config import resolve
    from suder.rollout import sample_group

    group = size["group"]
    cfg = resolve(backbone="janus-pro", steps=1, group_size=group, guidance_scale=GUIDANCE)
    ids, mask = backbone.t2i_inputs(PROMPTS)
    methods = {
        "suder sample_group": lambda: sample_group(backbone, "gen", PROMPTS, cfg, torch.Generator().manual_seed(0)),
        "transformers generate": lambda: backbone.model.generate(
            input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=True, top_k=0,
            num_return_sequences=group, guidance_scale=GUIDANCE),
    }
    times = timed(methods, size["repeats"], device)
    work = {"prompts": len(PROMPTS), "group": group, "guidance_scale": GUIDANCE}
    return {**about, "work": work,
            "methods": images_per_second(times, len(PROMPTS) * group, "transformers generate")}


def show_o_loop(backbone, steps: int, group: int):
    """Show-o's MaskGIT sampler as its ``t2i_generate`` loop runs it: the whole batch, one generator."""
    from suder.backbones.show_o.sampling import maskgit_sample
    from suder.protocol import repeat_interleave

    rows = repeat_interleave(PROMPTS, group)
    n, mask_id, off = backbone.tokens.num_image_tokens, backbone.tokens.mask, backbone.tokens.image_offset
    start = torch.full((len(rows), n), -1, dtype=torch.long, device=backbone.device)
    ids, attn = backbone._t2i_inputs(rows, torch.full_like(start, mask_id), True)

    def image_logits(codes: torch.Tensor) -> torch.Tensor:
        image = torch.where(codes < 0, mask_id, codes + off)
        ids[:, -(n + 1) : -1] = image.repeat(2, 1)
        return backbone._image_logits(ids, attn, True, GUIDANCE)

    return maskgit_sample(image_logits, start, steps=steps, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def show_o_rollout(backbone, about: dict, size: dict, device: torch.device) -> dict:
    from suder.config import resolve
    from suder.rollout import sample_group

    group, steps = size["group"], size["show_o_steps"]
    cfg = resolve(backbone="show-o", steps=1, group_size=group, guidance_scale=GUIDANCE,
                  image_logp_options={}, backbone_options={})
    backbone.settings.steps = steps
    methods = {
        "suder sample_group": lambda: sample_group(backbone, "gen", PROMPTS, cfg, torch.Generator().manual_seed(0)),
        "Show-o MaskGIT loop": lambda: show_o_loop(backbone, steps, group),
    }
    times = timed(methods, size["repeats"], device)
    work = {"prompts": len(PROMPTS), "group": group, "guidance_scale": GUIDANCE, "maskgit_steps": steps}
    return {**about, "work": work, "methods": images_per_second(times, len(PROMPTS) * group, "Show-o MaskGIT loop")}


def memory_plan(cfg: Any) -> Any:
    """The memory planner's estimate for ``cfg`` when this suder has one (``suder.memory``), else None."""
    if importlib.util.find_spec("suder.memory") is None:
        return None
    import suder.memory as memory

    for name in ("plan", "estimate", "memory_plan"):
        fn = getattr(memory, name, None)
        if callable(fn):
            try:
                out = fn(cfg)
            except Exception as exc:  # the planner's own interface may differ: say so instead of failing
                return {"error": f"suder.memory.{name}(cfg): {type(exc).__name__}: {exc}"}
            return out if isinstance(out, (dict, int, float, str, list)) else repr(out)
    return {"error": "suder.memory has no plan/estimate function"}


def dsr_step(backbone, about: dict, size: dict, device: torch.device, out_dir: str) -> dict:
    """Two SimPO steps of the unified strategy (ShapesWorld prompts and scenes); the second one's phases."""
    from suder.config import resolve
    from suder.trainer import Trainer

    group, batch = size["group"], size["batch"]
    cfg = resolve(backbone="janus-pro", steps=2, group_size=group, gen_group_size=group, und_group_size=group,
                  batch_size=batch, gen_batch_size=batch, und_batch_size=batch, guidance_scale=GUIDANCE,
                  output_dir=out_dir, sample_every=0, save_every=0, overwrite=True)
    trainer = Trainer(cfg, backbone)
    trainer.judge = False  # ShapesWorld's exact judge reads 32 px pictures: this model's images are not those
    steps = []
    for step in range(2):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = trainer.step(step)
        steps.append({"wall_s": time.perf_counter() - start,
                      "time": {k: v for k, v in metrics.items() if k.startswith("time/")},
                      "rollout/chunk_size": metrics.get("rollout/chunk_size"),
                      "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                      else None})
    return {**about, "config": {"algo": cfg.algo, "strategy": cfg.strategy, "group_size": cfg.gen.group_size,
                                "batch_size": cfg.gen.batch_size, "guidance_scale": GUIDANCE,
                                "rollout_chunk_size": cfg.rollout_chunk_size},
            "warm_up_step": steps[0], "step": steps[1], "memory_plan": memory_plan(cfg)}


def embedded_defaults(tiny: bool, out_dir: str) -> dict:
    """``suder run --backbone NAME`` for a few steps on each built-in's shipped ShapesWorld base, as a user starts:
    the same weights on this device as on a CPU (``base_sha256``), the judge before and after, and the time."""
    from suder.pretrain import base_digest, shipped_base

    steps, num = (1, 4) if tiny else (5, 64)
    results = {}
    for backbone in ("toy", "show-o", "janus-pro"):
        run = os.path.join(out_dir, backbone)
        args = ["run", "--backbone", backbone, "--steps", str(steps), "--eval-num", str(num), "--save-every", "0",
                "--sample-every", "0", "--output-dir", run]
        if tiny:
            args += ["--group-size", "2", "--batch-size", "1", "--grad-accum", "1"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, cwd=ROOT)
        result = {"command": "suder " + " ".join(args[:-2]), "returncode": proc.returncode,
                  "seconds": time.perf_counter() - start,
                  "shipped_base_sha256": base_digest(shipped_base(backbone))}
        if proc.returncode == 0:
            record = json.loads(Path(run, "run.json").read_text())
            overall = {"t2i": "t2i", "captions_T1": "caption", "captions_greedy": "caption_greedy"}
            result["base_sha256"] = record.get("base_sha256")
            for when in ("before", "after"):
                result[when] = {k: (record[when] or {}).get(v, {}).get("overall") for k, v in overall.items()}
        else:
            result["stderr_tail"] = proc.stderr[-3000:]
        results[backbone] = result
    return results


def distributed(tiny: bool) -> dict:
    """``benchmarks/distributed_gpu.sh`` on 2 or more GPUs (its own JSON), else why it did not run."""
    gpus = torch.cuda.device_count()
    if tiny or gpus < 2:
        return {"ran": False, "reason": "--tiny (CPU)" if tiny else f"{gpus} GPU(s): the checks need 2 or more"}
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "distributed_gpu.sh"), str(gpus)],
                          capture_output=True, text=True, cwd=ROOT)
    result = {"ran": True, "returncode": proc.returncode, "seconds": time.perf_counter() - start}
    written = ROOT / "benchmarks" / "results" / "distributed-gpu.json"
    if proc.returncode == 0 and written.is_file():
        result["results"] = json.loads(written.read_text())
    else:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def environment(device: torch.device) -> dict:
    import transformers

    import suder

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "suder": getattr(suder, "__version__", None), "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["gpu"], env["gpus"] = torch.cuda.get_device_name(), torch.cuda.device_count()
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU: the tests' tiny models (the CI check)")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu-suite.json)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on a CPU")
    device = torch.device("cpu" if tiny else "cuda")
    size = SIZES["tiny" if tiny else "full"]
    if tiny:
        torch.set_num_threads(1)
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": "tiny" if tiny else "full", "environment": environment(device)}
    janus, about = janus_backbone(tiny, device, size["caption_tokens"])
    result["janus_pro_rollout"] = janus_rollout(janus, about, size, device)
    with tempfile.TemporaryDirectory() as tmp:
        result["dsr_step"] = dsr_step(janus, about, size, device, os.path.join(tmp, "run"))
    del janus
    if device.type == "cuda":
        torch.cuda.empty_cache()
    show_o, about = show_o_backbone(tiny, device)
    result["show_o_rollout"] = show_o_rollout(show_o, about, size, device)
    del show_o
    with tempfile.TemporaryDirectory() as tmp:
        result["embedded_defaults"] = embedded_defaults(tiny, tmp)
    result["distributed"] = distributed(tiny)
    result["seconds"] = time.perf_counter() - started
    name = "gpu-suite-tiny.json" if tiny else "gpu-suite.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
