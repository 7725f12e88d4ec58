"""FSDP2 (torch's ``fully_shard``, one unit per decoder layer) on CPU processes with gloo: sampling on the whole-weights
view (``whole_weights``) gives the unsharded model's samples, even where the processes' captions end at different
lengths (so their layers run a different number of times); a loss through the wrapped forward afterwards gives the
unsharded model's gradient; and ``save_pretrained`` from the view writes the unsharded files.

    torchrun --nproc_per_node 2 tests/distributed_scripts/fsdp2.py MODEL OUT
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import suder
from suder.distributed import whole_weights
from suder.engine import Dispatch
from suder.worlds import shapes

model_path, out = sys.argv[1:3]
dist.init_process_group("gloo")
rank = dist.get_rank()
plain = suder.load_backbone("toy", model=model_path).eval()
sharded = suder.load_backbone("toy", model=model_path).eval()
wrapped = Dispatch(sharded)
for layer in sharded.lm.model.layers:
    fully_shard(layer)
fully_shard(wrapped)
assert any(isinstance(p, DTensor) for p in sharded.parameters()), "nothing was sharded"
prompts = shapes.sample_prompts(2, seed=1)
# captions of 16 tokens on rank 0 and 5 on rank 1 (seeds picked for that): the layers run 16 and 5 times
images = [shapes.render(s) for s in shapes.sample_scenes(1, seed=10 + 7 * rank)]
with torch.no_grad():
    a = plain.sample_image(prompts, num_samples=2, generator=torch.Generator().manual_seed(3))
    want = plain.sample_text(images, num_samples=2, generator=torch.Generator().manual_seed(5 + 7 * rank))
    with whole_weights(wrapped, sharded) as whole:
        b = whole.sample_image(prompts, num_samples=2, generator=torch.Generator().manual_seed(3))
        got = whole.sample_text(images, num_samples=2, generator=torch.Generator().manual_seed(5 + 7 * rank))
assert torch.equal(a.tokens, b.tokens) and got.texts == want.texts, (got.texts, want.texts)
lengths = [None, None]
dist.all_gather_object(lengths, got.tokens.shape[1])
assert lengths[0] != lengths[1], f"the processes' captions should differ in length: {lengths}"

# a training loss through the wrapped forward: the gradient of every parameter equals the unsharded one
plain.train()
sharded.train()
loss_a = plain.logp_image_given_text(a, a.prompts).sum().sum()
loss_a.backward()
loss_b = wrapped(lambda m: m.logp_image_given_text(b, b.prompts).sum().sum())
loss_b.backward()
assert torch.allclose(loss_a, loss_b, atol=1e-4), (loss_a, loss_b)
for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
    if p.grad is None:
        continue
    g = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
    assert torch.allclose(p.grad, g, atol=1e-5), name

# save_pretrained from a whole-weights view writes the same files as the unsharded model
with whole_weights(wrapped, sharded) as whole:
    if rank == 0:
        whole.save_pretrained(out + "/sharded")
assert any(isinstance(p, DTensor) for p in sharded.parameters()), "the view did not give the shards back"
if rank == 0:
    plain.save_pretrained(out + "/plain")
dist.barrier()
print("FSDP2_OK", rank)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as suder's CLI does: no interpreter teardown, where torch.distributed's threads can still abort
