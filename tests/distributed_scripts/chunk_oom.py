"""One training step on 2 processes where rank 1 runs out of memory at its first sampling call of more than 4
rows (injected); writes, per rank, to ``OUT/../rank-N.txt`` the chunk size it kept, the ``rollout/chunk_size``
metric, how many ``ChunkSizeWarning``s it gave and whether its retried rollout equals the whole group's (sampled
before). A file per rank, not stdout: two processes printing to one pipe can interleave their lines.

    torchrun --nproc_per_node 2 tests/distributed_scripts/chunk_oom.py MODEL OUT
"""

import os
import sys
import warnings
from pathlib import Path

import torch

from suder.backbones.toy import ToyUnifiedLM
from suder.config import resolve
from suder.rollout import Chunks, ChunkSizeWarning
from suder.trainer import Trainer, Work

model, out = sys.argv[1:3]
cfg = resolve(model=model, output_dir=out, steps=1, group_size=4, batch_size=2, sample_every=0, save_every=0,
              overwrite=True)
tr = Trainer(cfg)
rank = tr.acc.process_index
work = Work("policy", "gen", "policy")
with tr.sampling("policy"):  # the whole group of step 0, before anything runs out of memory
    expected = tr.roll_out(work, 0, 0)
tr.chunks = Chunks("auto")

if rank == 1:
    real = ToyUnifiedLM.sample_image

    def flaky(self, prompts, *, num_samples=1, **options):
        if len(prompts) * num_samples > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1)")
        return real(self, prompts, num_samples=num_samples, **options)

    ToyUnifiedLM.sample_image = flaky

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    metrics = tr.step(0)
halvings = sum(issubclass(w.category, ChunkSizeWarning) for w in caught)
got = next(r.samples for r in tr.last_rollouts if r.direction == "gen")
same = torch.equal(got.tokens, expected.tokens)
result = (f"size={tr.chunks.size} metric={metrics.get('rollout/chunk_size')} warnings={halvings} same={same}\n")
(Path(out).parent / f"rank-{rank}.txt").write_text(result)
tr.acc.wait_for_everyone()
if torch.distributed.is_initialized():  # a gloo group left to interpreter shutdown can abort the process
    torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)
