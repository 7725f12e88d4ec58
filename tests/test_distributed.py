"""The same update on 1 or 2 processes (torchrun, gloo on CPU), and no rank left waiting for rank 0's decisions.

The invariant TRL holds for its trainers: for the same rollouts, N processes x micro-batch b x accumulation a give
the same loss, gradient, optimizer step count and learning rate at every step as 1 process x N*b*a.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_scripts" / "equivalence.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
PORT = iter(range(29620, 29700))


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORT))]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["unified", "separate"])
@pytest.mark.parametrize("algo", ["simpo", "grpo"])
def test_two_processes_with_accumulation_equal_one_big_batch(tiny_toy_path, tmp_path, algo, strategy):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    single = subprocess.run(
        [sys.executable, str(SCRIPT), tiny_toy_path, str(one), algo, strategy],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    dist = _torchrun([str(SCRIPT), tiny_toy_path, str(two), algo, strategy])
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert len(a) == len(b) == 2
    for sa, sb in zip(a, b):
        keys = [k for k in sa if k != "step"]
        assert keys == [k for k in sb if k != "step"]
        for k in keys:
            x, y = sa[k], sb[k]
            assert x["lr"] == pytest.approx(y["lr"], rel=1e-12), (k, x["lr"], y["lr"])
            assert x["optimizer_steps"] == y["optimizer_steps"] == 1
            assert x["adam_steps"] == y["adam_steps"]
            assert x["loss"].keys() == y["loss"].keys() and x["loss"]
            for name in x["loss"]:
                # abs: GRPO's first-step loss is a sum of +-A terms that cancel to ~1e-6 (float32 noise)
                assert x["loss"][name] == pytest.approx(y["loss"][name], rel=1e-5, abs=1e-5), name
            # relative to the gradient's norm: GRPO's gradient sums +-A-weighted terms, so single elements that cancel
            # to ~1e-6 carry float32 noise; a wrong scale or a missing rank would be off by O(1)
            err = ((x["grad"] - y["grad"]).norm() / x["grad"].norm()).item()
            assert x["grad"].norm() > 0 and err < 1e-4, (k, err)


@pytest.mark.slow
def test_early_stopping_on_two_processes_ends_every_rank(tiny_toy_path, tmp_path):
    """Only rank 0 evaluates; its decision to stop reaches rank 1, so the run ends instead of hanging."""
    out = tmp_path / "run"
    args = ["-m", "suder", "run", "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "6"]
    args += ["--group-size", "4", "--gen-batch-size", "1", "--und-batch-size", "1", "--eval-num", "8"]
    args += ["--lr", "1e-12", "--eval-every", "1", "--early-stopping-patience", "1", "--early-stopping-num", "4"]
    args += ["--sample-every", "0", "--save-every", "0"]
    proc = _torchrun(args, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["stopped_early"] is True and run["steps"] == 2 and run["num_processes"] == 2


def _accelerate_launch(config: str, args: list[str], timeout: int = 240, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config)]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(next(PORT))]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=ENV | env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_processes_steps_once_per_training_step(tiny_toy_path, tmp_path):
    """The shipped zero2.yaml, as a user launches it (2 processes, no GPU): DeepSpeed really
    runs, its engine steps once per training step with grad_accum 2, the lr follows our schedule, and the final
    model saves and loads."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    args = ["-m", "suder", "run", "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "3"]
    args += ["--group-size", "4", "--gen-batch-size", "1", "--und-batch-size", "1", "--eval-num", "8"]
    args += ["--grad-accum", "2", "--save-every", "2", "--sample-every", "0", "--lr", "1e-3", "--warmup-steps", "2"]
    proc = _accelerate_launch("examples/accelerate/zero2.yaml", args, DS_ACCELERATOR="cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["engine_steps"] for m in metrics] == [1, 2, 3]  # not 2 per step (one per micro-batch)
    assert [m["lr"] for m in metrics] == pytest.approx([5e-4, 1e-3, 1e-3])
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2 and (out / "checkpoints" / "step-000002" / "state").is_dir()
    import suder

    suder.load_backbone("toy", model=str(out / "final"))


@pytest.mark.slow
def test_a_launch_config_that_cannot_run_here_fails_loudly(tiny_toy_path, tmp_path):
    """accelerate's FSDP does not engage without GPUs (it quietly gives DDP); the run must stop instead."""
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n"
        "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: false\n"
    )
    args = ["-m", "suder", "run", "--model", tiny_toy_path, "--output-dir", str(tmp_path / "run"), "--steps", "1"]
    proc = _accelerate_launch(str(fsdp), args)
    assert proc.returncode != 0 and "asks for fsdp but accelerate set up ddp" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_fsdp2_gradient_and_saving_match_the_unsharded_model(tiny_toy_path, tmp_path):
    """torch's fully_shard under gloo: the loss through the wrapped forward has the unsharded gradient, and the
    whole-weights view saves byte-identical files."""
    proc = _torchrun([str(ROOT / "tests" / "distributed_scripts" / "fsdp2.py"), tiny_toy_path, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FSDP2_OK") == 2
    plain, sharded = (tmp_path / d / "model.safetensors" for d in ("plain", "sharded"))
    assert plain.read_bytes() == sharded.read_bytes()


@pytest.mark.slow
def test_sharded_engines_are_refused_with_the_reason(tiny_toy_path, tmp_path):
    pytest.importorskip("deepspeed")
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text(
        (ROOT / "examples" / "accelerate" / "zero2.yaml").read_text().replace("zero_stage: 2", "zero_stage: 3")
    )
    args = ["-m", "suder", "run", "--model", tiny_toy_path, "--output-dir", str(tmp_path / "run"), "--steps", "1"]
    proc = _accelerate_launch(str(zero3), args, DS_ACCELERATOR="cpu")
    assert proc.returncode != 0 and "DeepSpeed ZeRO-3 shards the weights" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
