"""One training update on N processes x a micro-batches of b groups, or on 1 process x N*a*b groups, from the same
rollouts; writes the losses, learning rates, gradients and optimizer step counts it saw (rank 0) to OUT.

    python tests/distributed_scripts/equivalence.py MODEL OUT ALGO STRATEGY                       # 1 process
    torchrun --nproc_per_node 2 tests/distributed_scripts/equivalence.py MODEL OUT ALGO STRATEGY  # 2 processes
"""

import sys

import torch

from suder import rewards
from suder.config import TrainConfig
from suder.rollout import ALGORITHMS, Rollout
from suder.trainer import Trainer, derive_seed, plan
from suder.worlds import shapes

model, out, algo, strategy = sys.argv[1:5]
G, B_PER_MICRO, STEPS = 4, 1, 2
torch.manual_seed(0)
probe = TrainConfig(model=model, output_dir=out + ".run", steps=STEPS)
# the world is the same for every process count: N * a * b groups per direction and step
import os  # noqa: E402

N = int(os.environ.get("WORLD_SIZE", "1"))
ACCUM = 2 if N > 1 else 1
TOTAL = 2 * 2 * B_PER_MICRO  # groups per direction and step (N=2, a=2, b=1)
per_micro = TOTAL // (N * ACCUM)
cfg = TrainConfig(
    model=model,
    output_dir=out + f".run{N}",
    algo=algo,
    strategy=strategy,
    steps=STEPS,
    switch_every=1,
    group_size=G,
    gen_batch_size=per_micro,
    und_batch_size=per_micro,
    grad_accum=ACCUM,
    lr=1e-3,
    warmup_steps=1,
    lr_schedule="cosine",
    grpo_beta=0.04,
    sample_every=0,
    save_every=0,
    overwrite=True,
)
tr = Trainer(cfg)
rank = tr.acc.process_index
algo_obj = ALGORITHMS[algo]
record = []
for step in range(STEPS):
    micro = [dict() for _ in range(ACCUM)]
    for key, direction, scorer_key in plan(cfg, step):
        policy = tr.unwrapped(key)
        policy.eval()
        gen = torch.Generator().manual_seed(derive_seed(11, step, direction == "und"))
        if direction == "gen":
            inputs = shapes.sample_prompts(TOTAL, seed=100 + step)
            samples = policy.sample_image(inputs, num_samples=G, generator=gen)
            r = rewards.dsr_generation(rewards.RewardContext(scorer=tr.scorer(scorer_key)), samples)
        else:
            inputs = [shapes.render(s) for s in shapes.sample_scenes(TOTAL, seed=200 + step)]
            samples = policy.sample_text(inputs, num_samples=G, generator=gen)
            r = rewards.dsr_understanding(rewards.RewardContext(scorer=tr.scorer(scorer_key)), samples)
        policy.train()
        for m in range(ACCUM):
            first = (m * N + rank) * per_micro
            rows = list(range(first * G, (first + per_micro) * G))
            roll = Rollout(direction, samples.select(rows), r[rows], G)
            seeds = [derive_seed(5, step, it) for it in range(cfg.grpo_iterations)]
            micro[m][(key, direction)] = algo_obj.prepare(tr.routed(key), roll, cfg, tr.models["reference"], seeds)[0]
    norm = tr.normalizers(micro)
    entry = {"step": step}
    for key in sorted({k for k, _, _ in plan(cfg, step)}):
        opt = tr.models[key]["opt"]
        inner = getattr(opt, "optimizer", opt)
        grads = {}
        original = inner.step

        def capture(*a, _orig=original, _key=key, _grads=grads, **k):
            _grads[_key] = torch.cat([p.grad.detach().flatten().clone() for p in tr.models[_key]["params"]])
            return _orig(*a, **k)

        inner.step = capture
        metrics = tr.reduce_metrics(tr.update(key, algo_obj, micro, norm))
        inner.step = original
        entry[key] = {
            "loss": {k: v for k, v in metrics.items() if k.endswith("/loss")},
            "lr": metrics["lr"],
            "optimizer_steps": metrics.get("optimizer_steps", 0),
            "grad": grads[key],
            "adam_steps": max(float(s["step"]) for s in inner.state.values()),
        }
    record.append(entry)
if rank == 0:
    torch.save(record, out)
print("DONE", rank)
tr.acc.wait_for_everyone()
if torch.distributed.is_initialized():  # a gloo group left to interpreter shutdown can abort the process
    torch.distributed.destroy_process_group()
