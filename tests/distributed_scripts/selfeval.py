"""A run with the held-out self-evaluation, select_final best and a stop guard on 2 processes; each rank writes
the self-evaluation metrics it logged, and whether it stopped, to ``OUT/rank-N.json`` (a file per rank: two
processes printing to one pipe can interleave their lines).

    torchrun --nproc_per_node 2 tests/distributed_scripts/selfeval.py MODEL OUT
"""

import json
import os
import sys
from pathlib import Path

import torch

from suder.config import resolve
from suder.trainer import Trainer

model, out = sys.argv[1:3]
cfg = resolve(model=model, output_dir=str(Path(out) / "run"), steps=3, group_size=4, batch_size=1, eval_num=8,
              sample_every=0, save_every=0, eval_every=1, selfeval_num=4, select_final="best", guard_drop=1e9,
              lr=1e-2, overwrite=True)
trainer = Trainer(cfg)
result = trainer.run()
rank = trainer.acc.process_index
logged = [{k: v for k, v in m.items() if k.startswith(("selfeval/", "drift/"))} for m in result.metrics]
record = {"metrics": logged, "stopped": result.stopped_early, "held": trainer.held.prompts}
(Path(out) / f"rank-{rank}.json").write_text(json.dumps(record))
trainer.acc.wait_for_everyone()
if torch.distributed.is_initialized():  # a gloo group left to interpreter shutdown can abort the process
    torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)
