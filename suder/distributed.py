"""Distributed engines: what ``accelerate launch`` asked for, whether this machine can do it, and views of the
weights that every process enters (see ``docs/scaling.md``).

DDP and DeepSpeed ZeRO-2 are supported and tested on 2 CPU processes (``tests/test_distributed.py``). Engines that
shard the weights (FSDP, ZeRO-3) are refused at start with the reason: the fast samplers call decoder layers one
by one, outside the hooks that gather each layer's shards. ``whole_weights`` (used for saving) already works for
both: FSDP2 saves are byte-identical to unsharded ones.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from torch import nn

from .config import TrainConfig
from .errors import ConfigError


def launched_engine() -> str:
    """What ``accelerate launch`` asked for: ``deepspeed``, ``fsdp`` or ``ddp`` (also plain torchrun, 1 process)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def check_engine(acc: Any, engine: str, cfg: TrainConfig) -> None:
    """A launch config that cannot do what it says fails here, instead of quietly training with DDP; DeepSpeed
    gets our accumulation (one optimizer step per training step, whatever its config file says)."""
    from accelerate.utils import DistributedType

    got = {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(acc.distributed_type, "ddp")
    if engine != got:
        why = " (FSDP through accelerate needs GPUs)" if engine == "fsdp" else ""
        raise ConfigError(
            f"The launch config asks for {engine} but accelerate set up {got}{why}; use a config this machine can "
            "run (see docs/scaling.md)."
        )
    if engine == "fsdp" or (engine == "deepspeed" and int(acc.state.deepspeed_plugin.zero_stage) == 3):
        name = "FSDP" if engine == "fsdp" else "DeepSpeed ZeRO-3"
        raise ConfigError(
            f"{name} shards the weights, which suder does not support yet: the fast samplers call decoder layers "
            "one by one, outside the hooks that gather the shards. Use DDP or DeepSpeed ZeRO-2 (with LoRA for "
            "large models); see docs/scaling.md."
        )
    if engine == "deepspeed":
        if cfg.strategy == "separate":
            raise ConfigError("The separate strategy trains two models; with DeepSpeed use unified, gen or und.")
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        if not isinstance(ds.get("train_micro_batch_size_per_gpu"), int):
            ds["train_micro_batch_size_per_gpu"] = 1  # rollouts are batched by us; DeepSpeed only needs a number
        acc.gradient_accumulation_steps = cfg.grad_accum


@contextlib.contextmanager
def whole_weights(wrapped: nn.Module, backbone: nn.Module):
    """Every process enters; inside, ``backbone``'s parameters are whole tensors: DeepSpeed ZeRO-3 gathers them
    (``GatheredParameters``), FSDP2's sharded (``DTensor``) parameters are replaced by their full tensors for
    the duration, anything else is already whole. For no-grad use (sampling, scoring, saving)."""
    if any(hasattr(p, "ds_id") for p in backbone.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=None):
            yield backbone
        return
    from torch.distributed.tensor import DTensor

    # FSDP2: swap each sharded parameter for its whole tensor (an all-gather, in the same order on every process;
    # tied parameters stay tied), and back afterwards
    swapped, whole = [], {}
    for module in backbone.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in whole:
                    whole[id(param)] = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    try:
        yield backbone
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
