"""``benchmarks/gpu_suite.sh --tiny`` runs as written on a CPU (the tests' tiny models, the full suite's code
path) and writes the JSON the full suite writes; its numbers are not checked (tests never time)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "tiny" and result["environment"]["device"] == "cpu"
    assert set(result) >= {"janus_pro_rollout", "show_o_rollout", "dsr_step", "distributed", "seconds"}
    baselines = {"janus_pro_rollout": "transformers generate", "show_o_rollout": "Show-o MaskGIT loop"}
    for section, baseline in baselines.items():
        methods = result[section]["methods"]
        assert methods["baseline"] == baseline and set(methods) == {"baseline", "suder sample_group", baseline}
        for name in ("suder sample_group", baseline):
            assert methods[name]["images_per_s"] > 0 and methods[name]["speedup_vs_baseline"] > 0
        assert methods[baseline]["speedup_vs_baseline"] == 1.0
    step = result["dsr_step"]
    phases = {"time/rollout", "time/update", "time/gen_sample", "time/und_sample", "time/gen_reward"}
    assert phases <= set(step["step"]["time"]) and step["step"]["rollout/chunk_size"] == 2.0
    assert step["step"]["peak_memory_GiB"] is None and "memory_plan" in step  # CPU: no CUDA peak
    assert result["distributed"] == {"ran": False, "reason": "--tiny (CPU)"}
    assert set(result["embedded_defaults"]) == {"toy", "show-o", "janus-pro"}
    for backbone, run in result["embedded_defaults"].items():  # each shipped base, as `suder run` starts from it
        assert run["returncode"] == 0, run.get("stderr_tail")
        assert run["base_sha256"] == run["shipped_base_sha256"] and len(run["base_sha256"]) == 64, backbone
        assert 0 <= run["before"]["t2i"] <= 1 and 0 <= run["after"]["captions_greedy"] <= 1
