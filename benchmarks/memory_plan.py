"""The memory plan (``suder.memory``) against measurement: tiny configs of each backbone at their real image geometry.

    HF_HUB_OFFLINE=1 python benchmarks/memory_plan.py                 # -> benchmarks/results/memory-plan.json
    HF_HUB_OFFLINE=1 python benchmarks/memory_plan.py --only janus-pro-576 --out /tmp/plan.json
    HF_HUB_OFFLINE=1 python benchmarks/memory_plan.py table          # docs/performance.md's table of full models

Each case saves a tiny random model of the backbone (Janus-Pro: 2 layers, hidden 64, at 384 px = 576 image tokens;
Show-o: 2 layers, hidden 32, at 256 and 1024 image tokens; the toy: its default 1M-parameter model at its own 64
tokens) to a folder, plans a run on it, then runs that run (two training steps: the second holds the optimizer
states) and measures its peak: on CPU the largest total of live tensor bytes that ``torch.profiler`` records
(``profile_memory=True``: every allocation and free of the CPU allocator while profiling, from before the model
loads); on CUDA the allocator's ``max_memory_allocated``. The JSON gives estimate, measurement and their ratio
per case, the plan's phases and the versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny model builders


# ------------------------------------------------------------------------------------------ measurement
def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def measured_peak(fn, device: str = "cpu") -> tuple[float, object]:
    """(peak bytes of live tensors while ``fn()`` runs, its result). CPU: ``torch.profiler`` with
    ``profile_memory=True`` reports each allocation with the total allocated since profiling started; CUDA: the
    caching allocator's peak statistic."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - start), result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    peak = 0
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        extra = node.extra_fields
        if isinstance(extra, torch._C._profiler._ExtraFields_Allocation):
            peak = max(peak, extra.total_allocated)
    return float(peak), result


# ------------------------------------------------------------------------------------------ tiny models
def save_tiny_janus(folder: Path, *, caption_tokens: int = 8) -> None:
    """The tests' tiny Janus at Janus-Pro's geometry: 384 px, 24 x 24 = 576 image tokens."""
    from janus_tiny import TINY_CONFIG, tiny_processor
    from transformers import JanusConfig, JanusForConditionalGeneration

    from suder.backbones.janus_pro import JanusProBackbone

    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["vision_config"].update(image_size=384, patch_size=16, num_image_tokens=576)
    cfg["vq_config"]["channel_multiplier"] = [1, 1, 2, 2, 4]
    torch.manual_seed(0)
    net = JanusForConditionalGeneration(JanusConfig(**cfg)).eval()
    proc = tiny_processor()
    proc.num_image_tokens = 576
    proc.image_processor.size = {"height": 384, "width": 384}
    JanusProBackbone.from_model(net, proc, max_caption_tokens=caption_tokens).save_pretrained(folder)


def save_tiny_show_o(folder: Path, *, tokens: int = 256) -> None:
    """The tests' tiny Show-o (2 layers, hidden 32) with ``tokens`` image tokens (256: 256 px; 1024: 512 px)."""
    import show_o_tiny

    from suder.backbones.show_o.factory import from_parts
    from suder.backbones.show_o.magvit import MAGVITv2
    from suder.backbones.show_o.modeling import Showo

    tokenizer = show_o_tiny.tiny_tokenizer()
    llm = dict(show_o_tiny.TINY_LLM, num_vq_tokens=tokens, max_position_embeddings=2 * tokens + 64)
    torch.manual_seed(0)
    vocab = len(tokenizer) + 10 + llm["codebook_size"] + 1
    showo = Showo(llm_vocab_size=len(tokenizer), vocab_size=vocab, **llm)
    vq = MAGVITv2(**show_o_tiny.TINY_VQ)
    from_parts(showo.eval(), vq.eval(), tokenizer, guidance_scale=1.5, max_caption_tokens=8).save_pretrained(folder)


def save_toy(folder: Path) -> None:
    from suder.backbones.toy import build_toy

    torch.manual_seed(0)
    build_toy().save_pretrained(folder)


def data(folder: Path) -> dict[str, str]:
    """Four prompts and four random images."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("a red square\ntwo green triangles above a circle\na photo of a cat\na dog\n")
    (folder / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    return {"prompts": str(folder / "prompts.txt"), "images": str(folder / "images")}


CASES = {
    # name: (backbone, builder, builder options, backbone options)
    "toy": ("toy", save_toy, {}, {}),
    "janus-pro-576": ("janus-pro", save_tiny_janus, {}, {"device": "cpu", "dtype": "float32"}),
    # one image per VQ decode: the language model's terms, not the decoder's, decide the peak
    "janus-pro-576-decode1": ("janus-pro", save_tiny_janus, {}, {"device": "cpu", "dtype": "float32",
                                                                 "decode_batch_size": 1}),
    "show-o-256": ("show-o", save_tiny_show_o, {"tokens": 256}, {"device": "cpu"}),
    "show-o-1024": ("show-o", save_tiny_show_o, {"tokens": 1024}, {"device": "cpu"}),
}
RUN = dict(steps=2, batch_size=2, group_size=4, grad_accum=1, lr=1e-4, sample_every=0, save_every=0, eval_every=0)


def run_case(name: str, root: Path, algo: str = "grpo", **settings) -> dict:
    """Plan and measure one case: the run ``RUN`` (+ ``settings``) on the tiny model of ``name``."""
    from suder.config import resolve
    from suder.memory import plan
    from suder.trainer import Trainer

    backbone, build, build_options, options = CASES[name]
    folder = root / build.__name__ / "-".join(f"{k}{v}" for k, v in build_options.items())
    if not (folder / "config.json").is_file():
        build(folder, **build_options)
    inputs = {} if backbone == "toy" else data(root / "data")
    kw = dict(RUN, algo=algo, model=str(folder), backbone_options=options, **inputs, **settings)
    out = root / f"run-{name}-{algo}-{time.monotonic_ns()}"
    cfg = resolve(None, None, backbone=backbone, output_dir=str(out), **kw)
    estimate = plan(cfg, device="cpu")
    def two_steps() -> None:  # the model loads inside the measurement; evaluation and saving are not planned
        trainer = Trainer(cfg)
        for step in range(RUN["steps"]):
            trainer.step(step)

    t = time.perf_counter()
    peak, _ = measured_peak(two_steps)
    return {
        "case": name,
        "algo": algo,
        "settings": {k: v for k, v in kw.items() if k not in ("prompts", "images", "model")},
        "estimate_bytes": estimate.peak,
        "estimate_phase": estimate.peak_phase,
        "measured_bytes": peak,
        "ratio": estimate.peak / peak,
        "plan": estimate.to_dict(),
        "seconds": time.perf_counter() - t,
    }


TABLE_MODELS = [
    ("janus-pro", "deepseek-community/Janus-Pro-1B", "Janus-Pro-1B"),
    ("janus-pro", "deepseek-community/Janus-Pro-7B", "Janus-Pro-7B"),
    ("show-o", "showlab/show-o", "Show-o"),
]
TABLE_LAUNCHES = [("ddp", 1), ("ddp", 8), ("zero2", 8), ("zero3", 8)]


def table() -> str:
    """docs/performance.md's table: the plan's peak per GPU for the full-size models (bf16), GRPO in both directions
    (its KL reference kept), one prompt and one image per micro-batch (batch_size 1), G = 8 and 16."""
    from suder.config import resolve
    from suder.memory import GiB, model_facts, plan

    data = dict(prompts=str(ROOT / "README.md"), images=str(ROOT / "docs"))
    lines = ["| model | tuning | engine | G=8 | G=8, ckpt | G=16 | G=16, ckpt | peak phase (G=16, ckpt) |",
             "|---|---|---|---|---|---|---|---|"]
    for backbone, model, label in TABLE_MODELS:
        for tuning in ("full", "LoRA") if backbone == "janus-pro" else ("full",):
            options = {"dtype": "bfloat16"} | ({"lora": True} if tuning == "LoRA" else {})
            facts = model_facts(backbone, model, options)
            for engine, n in TABLE_LAUNCHES:
                cells, phase = [], ""
                for group in (8, 16):
                    for ckpt in (False, True):
                        cfg = resolve(None, None, backbone=backbone, model=model, algo="grpo", batch_size=1,
                                      group_size=group, gradient_checkpointing=ckpt, backbone_options=options, **data)
                        p = plan(cfg, facts, engine=engine, processes=n)
                        cells.append(f"{p.peak / GiB:.1f}")
                        phase = p.peak_phase
                lines.append(f"| {label} | {tuning} | {engine} x {n} | " + " | ".join(cells) + f" | {phase} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        print(table())
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run (default: all)")
    p.add_argument("--algos", nargs="*", default=["simpo", "grpo"])
    p.add_argument("--checkpointing", nargs="*", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory-plan.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="suder-memory-plan-") as tmp:
        for name in args.only or list(CASES):
            for algo in args.algos:
                for checkpointing in args.checkpointing:
                    r = run_case(name, Path(tmp), algo, gradient_checkpointing=checkpointing == "on")
                    results.append(r)
                    print(f"{name:22s} {algo:5s} ckpt={checkpointing:3s} estimate {r['estimate_bytes'] / 2**20:8.1f}"
                          f" MiB ({r['estimate_phase']})  measured {r['measured_bytes'] / 2**20:8.1f} MiB  "
                          f"ratio {r['ratio']:.3f}", flush=True)
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": info, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
