#!/usr/bin/env bash
# The distributed stepping contract on a machine with 2 or more GPUs: 13 short launches of a tiny toy model (no
# downloads), about 4 minutes.
#   bash benchmarks/distributed_gpu.sh [NUM_GPUS]     -> benchmarks/results/distributed-gpu.json
# 1. 1-vs-2-process equivalence (loss, gradient, optimizer and Adam steps, lr) with NCCL: DDP (torchrun) for
#    SimPO/GRPO x unified/separate, and accelerate's FSDP2 (examples/accelerate/fsdp2.yaml) for simpo-separate and
#    grpo-unified, whose save from the gathered view must equal torch's full state dict byte for byte;
# 2. `suder run` through examples/accelerate/zero2.yaml (SimPO), zero3.yaml and fsdp2.yaml (GRPO) on NUM_GPUS
#    processes with bf16 and grad_accum 2: one optimizer (DeepSpeed: engine) step per training step, evaluation,
#    checkpoints and final/, and GRPO's first-step ratio within its tolerance (the run stops otherwise).
# Any broken contract stops the script (set -e, asserts); the CPU tests (tests/test_distributed.py) check the same.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
WORK=$(mktemp -d)
S=tests/distributed_scripts
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
python -c "from suder.pretrain import pretrain; pretrain('toy', out='$WORK/tiny', steps=30, batch_size=16, warmup_steps=5, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)"

compare() {  # compare ONE.pt TWO.pt -> the worst relative gradient error; asserts the step contract
  python - "$1" "$2" <<'PY'
import sys, torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
worst = 0.0
for sa, sb in zip(a, b):
    for k in sa:
        if k == "step":
            continue
        x, y = sa[k], sb[k]
        assert abs(x["lr"] - y["lr"]) <= 1e-12 * x["lr"], (k, x["lr"], y["lr"])
        assert x["optimizer_steps"] == y["optimizer_steps"] == 1 and x["adam_steps"] == y["adam_steps"], k
        worst = max(worst, ((x["grad"] - y["grad"]).norm() / x["grad"].norm()).item())
assert worst < 1e-3, worst
print(worst)
PY
}

results="{"
for algo in simpo grpo; do
  for strategy in unified separate; do
    python $S/equivalence.py "$WORK/tiny" "$WORK/one-$algo-$strategy.pt" $algo $strategy
    torchrun --nproc_per_node 2 $S/equivalence.py "$WORK/tiny" "$WORK/ddp-$algo-$strategy.pt" $algo $strategy
    results="$results\"ddp/$algo-$strategy/grad_rel_err\": $(compare "$WORK/one-$algo-$strategy.pt" "$WORK/ddp-$algo-$strategy.pt"), "
  done
done
for pair in simpo:separate grpo:unified; do
  algo=${pair%:*} strategy=${pair#*:}
  out="$WORK/fsdp2-$algo-$strategy.pt"
  accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
    $S/equivalence.py "$WORK/tiny" "$out" $algo $strategy
  results="$results\"fsdp2/$algo-$strategy/grad_rel_err\": $(compare "$WORK/one-$algo-$strategy.pt" "$out"), "
  for f in $(cd "$out.final" && find . -name model.safetensors); do cmp "$out.final/$f" "$out.torch/$f"; done
done

FLAGS="--model $WORK/tiny --steps 3 --group-size 4 --gen-batch-size 2 --und-batch-size 2 --eval-num 16 --grad-accum 2"
FLAGS="$FLAGS --mixed-precision bf16 --save-every 2 --sample-every 0 --lr 1e-4"
for run in zero2:simpo zero3:grpo fsdp2:grpo; do
  engine=${run%:*} algo=${run#*:}
  accelerate launch --config_file examples/accelerate/$engine.yaml --num_processes "$N" \
    -m suder run $FLAGS --algo $algo --output-dir "$WORK/$engine-$algo"
  summary=$(python - "$WORK/$engine-$algo/metrics.jsonl" "$engine" <<'PY'
import json, sys
metrics = [json.loads(line) for line in open(sys.argv[1])]
steps = [m["engine_steps"] for m in metrics] if "zero" in sys.argv[2] else [
    sum(m["optimizer_steps"] for m in metrics[: i + 1]) for i in range(len(metrics))]
assert steps == [1, 2, 3], steps  # one optimizer step per training step, with grad_accum 2
ratio = max(m.get(f"{d}/grpo/ratio_max_abs_dev", 0.0) for m in metrics for d in ("gen", "und"))
print(json.dumps({"steps": steps, "ratio_max_abs_dev": ratio}))
PY
)
  results="$results\"$engine/$algo\": $summary, "
done
results="$results\"num_gpus\": $N}"
mkdir -p benchmarks/results
echo "$results" | python -m json.tool > benchmarks/results/distributed-gpu.json
cat benchmarks/results/distributed-gpu.json
