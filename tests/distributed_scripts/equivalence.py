"""One training update on N processes x a micro-batches of b groups, or on 1 process x N*a*b groups, from the same
rollouts; writes the losses, every metric of the step (as ``Trainer.step`` reduces them), learning rates,
gradients before and after clipping, and optimizer step counts it saw (rank 0) to OUT, and the
trained model (``save_pretrained`` from the trainer's whole-weights view) to OUT.final/. At the last step one group
has equal rewards (skipped): on 2 processes it is all that rank 1 has in its first micro-batch. With sharded weights
(FSDP2), OUT.torch/ also gets the model saved from torch's own full state dict of the same weights.

ALGO is one algorithm, or GEN/UND (e.g. ``simpo/grpo``) for one per direction (``gen_algo`` / ``und_algo``).
``SUDER_TEST_BACKWARD_SCALE`` (for testing this test) scales every backward on more than one process, as a wrong
loss scale for N processes would.

    python tests/distributed_scripts/equivalence.py MODEL OUT ALGO STRATEGY                       # 1 process
    torchrun --nproc_per_node 2 tests/distributed_scripts/equivalence.py MODEL OUT ALGO STRATEGY  # 2 processes, DDP
    accelerate launch --config_file FSDP2.yaml tests/distributed_scripts/accelerate_fsdp2.py \
        tests/distributed_scripts/equivalence.py MODEL OUT ALGO STRATEGY                          # 2 processes, FSDP2
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

import suder.trainer
from suder import rewards
from suder.config import resolve
from suder.distributed import StepMetrics, reduce_metrics
from suder.rollout import Rollout, derive_seed
from suder.trainer import Trainer, plan
from suder.worlds import shapes

model, out, algo, strategy = sys.argv[1:5]
G, B_PER_MICRO, STEPS = 4, 1, 2
torch.manual_seed(0)
probe = resolve(model=model, output_dir=out + ".run", steps=STEPS)
# the world is the same for every process count: N * a * b groups per direction and step

N = int(os.environ.get("WORLD_SIZE", "1"))
ACCUM = 2 if N > 1 else 1
TOTAL = 2 * 2 * B_PER_MICRO  # groups per direction and step (N=2, a=2, b=1)
per_micro = TOTAL // (N * ACCUM)
gen_algo, und_algo = algo.split("/") if "/" in algo else (algo, algo)
cfg = resolve(
    model=model,
    output_dir=out + f".run{N}",
    algo=gen_algo,
    und_algo=und_algo,
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
    # the settings these checks were written for (the toy's preset before it scored captions with the frozen base
    # on every pair): the half-size-backward check needs both sides' gradients at the clip
    reward_scorer=None if strategy == "separate" else "policy",  # separate: each model scores the other's
    und={"simpo_pairs": "best-worst"},
    sample_every=0,
    save_every=0,
    overwrite=True,
)
tr = Trainer(cfg)
rank = tr.acc.process_index
BROKEN = float(os.environ.get("SUDER_TEST_BACKWARD_SCALE", "1"))
if BROKEN != 1 and N > 1:
    backward = tr.acc.backward
    tr.acc.backward = lambda loss, **kw: backward(loss * BROKEN, **kw)


def full(grads):
    return torch.cat([(g.full_tensor() if isinstance(g, DTensor) else g).detach().flatten().clone() for g in grads])


unclipped = {}
clip = suder.trainer.clip_grad_norm


def capture_unclipped(acc, params, max_norm):  # the gradient as the backward left it, before clipping
    unclipped["grad"] = full([p.grad for p in params])
    return clip(acc, params, max_norm)


suder.trainer.clip_grad_norm = capture_unclipped
record = []
for step in range(STEPS):
    micro = [dict() for _ in range(ACCUM)]
    collected = StepMetrics()  # the rollouts' metrics, as Trainer.step gathers them
    whole = tr.whole(tr.engines)  # as Trainer.step: sharded weights gathered once for the rollouts
    whole.__enter__()
    for key, direction, scorer_key in plan(cfg, step):
        policy = tr.engines[key]  # whole weights on every process, whatever the engine shards
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
        if step == STEPS - 1:  # (the last step: a changed update would also change later rewards, hence later losses)
            r[G : 2 * G] = 0.0  # group 1 skipped (equal rewards): rank 1's whole first micro-batch on 2 processes
        policy.train()
        for m in range(ACCUM):
            first = (m * N + rank) * per_micro
            rows = list(range(first * G, (first + per_micro) * G))
            roll = Rollout(direction, samples.select(rows), r[rows], G)
            seeds = [derive_seed(5, step, it) for it in range(cfg.grpo_iterations)]
            batch, rm = tr.prepare(key, roll, seeds)  # the algorithm is cfg.algo_for(direction)
            micro[m][(key, direction)] = batch
            collected.add(rm)
    whole.__exit__(None, None, None)
    norm = tr.normalizers(micro)
    entry = {"step": step}
    for key in sorted({k for k, _, _ in plan(cfg, step)}):
        opt = tr.engines[key].optimizer
        inner = getattr(opt, "optimizer", opt)
        grads = {}
        original = inner.step

        def capture(*a, _orig=original, _key=key, _grads=grads, **k):
            _grads[_key] = full([p.grad for p in tr.engines[_key].params])
            return _orig(*a, **k)

        inner.step = capture
        step_metrics = tr.update(key, micro, norm)
        step_metrics.merge(collected)  # as Trainer.step: one key per step in every plan used here
        metrics = reduce_metrics(tr.acc, step_metrics)
        inner.step = original
        entry[key] = {
            "loss": {k: v for k, v in metrics.items() if k.endswith("/loss")},
            "lr": metrics["lr"],
            "optimizer_steps": metrics.get("optimizer_steps", 0),
            "grad": grads[key],
            "grad_unclipped": unclipped["grad"],
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")},
            "adam_steps": max(float(s["step"]) for s in inner.state.values()),
        }
    record.append(entry)
if rank == 0:
    torch.save(record, out)
tr.writer.save_models(tr.saved_models(), Path(out + ".final"))
if tr.sharded:  # the same weights through torch's own full state dict, saved by an unsharded model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import suder

    for key in tr.engines:
        full = get_model_state_dict(tr.engines[key].wrapped, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            plain = suder.load_backbone("toy", model=model)
            plain.load_state_dict({k.removeprefix("backbone."): v for k, v in full.items()})
            plain.save_pretrained(str(Path(out + ".torch") / ("" if key == "policy" else key)))
print("DONE", rank)
tr.acc.wait_for_everyone()
if torch.distributed.is_initialized():  # a gloo group left to interpreter shutdown can abort the process
    torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as suder's CLI does: no interpreter teardown, where torch.distributed's threads can still abort
