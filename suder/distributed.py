"""Distributed engines: what ``accelerate launch`` asked for, whether this machine can do it, and views of the
weights that every process enters (see ``docs/scaling.md``).

DDP, DeepSpeed ZeRO-2 and ZeRO-3, and FSDP2 are supported, each tested on 2 CPU processes through ``accelerate
launch`` (``tests/test_distributed.py``; accelerate engages FSDP only with GPUs, so the FSDP2 tests change that one
answer in a test-only shim). With sharded weights (ZeRO-3, FSDP2) the training forward goes through the engine's
hooks, and everything else that reads the weights (sampling, rewards, old and reference log-probs, evaluation,
saving) runs on ``whole_weights``: gathered once, with the engine's hooks off meanwhile, as TRL does for generation
under ZeRO-3. FSDP version 1 (flat parameters) is refused at start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import ConfigError


def launched_engine() -> str:
    """What ``accelerate launch`` asked for: ``deepspeed``, ``fsdp`` or ``ddp`` (also plain torchrun, 1 process)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if importlib.util.find_spec("deepspeed") is None:  # the user install leaves it out: an extra
            raise ConfigError("The launch config asks for DeepSpeed, which is not installed: pip install "
                              "'suder[deepspeed]', or launch with a DDP or FSDP2 config (see docs/scaling.md).")
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
    if engine == "fsdp":
        plugin = acc.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ConfigError(
                f"FSDP version {plugin.fsdp_version} is not supported: suder gathers sharded weights for sampling "
                "through FSDP2's per-parameter shards; set fsdp_version: 2 in the accelerate config (see "
                "examples/accelerate/fsdp2.yaml)."
            )
        # every process loads the whole model before prepare, so rank-0-only loading saves nothing here, and
        # accelerate's version of it breaks on persistent buffers (the toy's codebook): keep the loaded weights
        plugin.cpu_ram_efficient_loading = False
    if engine == "deepspeed":
        if cfg.strategy == "separate":
            raise ConfigError("The separate strategy trains two models; with DeepSpeed use unified, gen or und.")
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        if not isinstance(ds.get("train_micro_batch_size_per_gpu"), int):
            ds["train_micro_batch_size_per_gpu"] = 1  # rollouts are batched by us; DeepSpeed only needs a number
        acc.gradient_accumulation_steps = cfg.grad_accum


def is_sharded(acc: Any) -> bool:
    """The weights are sharded across processes (ZeRO-3, FSDP): every read of them needs every process."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return plugin is not None and int(plugin.zero_stage) == 3


def compute_dtype(acc: Any) -> torch.dtype | None:
    """FSDP2's compute dtype under mixed precision (its ``param_dtype``); ``None`` elsewhere."""
    policy = getattr(getattr(acc.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    return getattr(policy, "param_dtype", None)


def clip_grad_norm(acc: Any, params: list[nn.Parameter], max_norm: float) -> Any:
    """``accelerator.clip_grad_norm_``, except under FSDP, where accelerate 1.15 looks the model up with
    ``params == list(model.parameters())``, which raises for a second prepared model of the same shape (the
    separate strategy); with FSDP2's single mesh its answer is torch's ``clip_grad_norm_`` anyway."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return acc.clip_grad_norm_(params, max_norm)
    acc.unscale_gradients()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


_WHOLE: set[int] = set()  # backbones inside a whole_weights view now (an inner view of the same one does nothing)


@contextlib.contextmanager
def whole_weights(wrapped: nn.Module, backbone: nn.Module, compute_dtype: torch.dtype | None = None):
    """Every process enters; inside, ``backbone``'s parameters are whole tensors: DeepSpeed ZeRO-3 gathers them
    (``GatheredParameters``), FSDP2's sharded (``DTensor``) parameters are replaced by their full tensors for
    the duration, anything else is already whole. For no-grad use (sampling, scoring, saving). Re-entrant: a view
    entered inside another of the same backbone gathers nothing. ``compute_dtype``: FSDP2's whole tensors in that
    dtype, the one its mixed-precision forward computes in (so that log-probs from the view and from the training
    forward agree, as GRPO's first ratio needs); ``None`` keeps the stored dtype (for saving).

    The collectives happen here, on entry, in the same order on every process; inside, each process may call its
    layers as often as its own samples need (captions end at different lengths). For that, FSDP2's forward hooks
    are taken off for the duration: they would all-gather again at every layer call (a count that differs between
    processes, so they would wait on each other forever), and the first layer called would make itself FSDP's root.
    """
    if id(backbone) in _WHOLE:
        yield backbone
        return
    _WHOLE.add(id(backbone))
    try:
        with _gather(wrapped, backbone, compute_dtype):
            yield backbone
    finally:
        _WHOLE.discard(id(backbone))


@contextlib.contextmanager
def _gather(wrapped: nn.Module, backbone: nn.Module, compute_dtype: torch.dtype | None):
    if any(hasattr(p, "ds_id") for p in backbone.parameters()):
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        # TRL's way for generation under ZeRO-3 (``unwrap_model_for_generation``): gather, and take the engine's
        # fetch/release hooks off meanwhile, or the first layer's forward would release the gathered weights
        with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=None):
            remove_hooks(wrapped)
            try:
                yield backbone
            finally:
                add_hooks(wrapped)
        return
    from torch.distributed.tensor import DTensor

    # FSDP2: swap each sharded parameter for its whole tensor (an all-gather, in the same order on every process;
    # tied parameters stay tied), and back afterwards
    swapped, whole = [], {}
    for module in backbone.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in whole:
                    full = param.full_tensor().detach()
                    if compute_dtype is not None and full.is_floating_point():
                        full = full.to(compute_dtype)
                    whole[id(param)] = nn.Parameter(full, requires_grad=False)
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    hooks = _without_fsdp_hooks(wrapped) if swapped else []
    try:
        yield backbone
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        for module, pre, post in hooks:
            module._forward_pre_hooks, module._forward_hooks = pre, post


def _without_fsdp_hooks(wrapped: nn.Module) -> list[tuple[nn.Module, Any, Any]]:
    """Take FSDP2's forward hooks off every ``fully_shard``-ed module under ``wrapped``; returns what to put back.
    torch (2.13) has no public switch for this: the hooks are found by the handles FSDP keeps on its state
    (``_pre_forward_hook_handle``, ``_post_forward_hook_handle``, a ``_MultiHandle`` for grouped modules);
    ``tests/test_distributed.py`` runs sampling on per-layer-sharded models, so a change there fails loudly."""
    from torch.distributed.fsdp import FSDPModule

    kept = []
    for module in wrapped.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        ids = set()
        for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
            ids.update(h.id for h in getattr(handle, "handles", (handle,)))
        pre, post = module._forward_pre_hooks, module._forward_hooks
        kept.append((module, pre, post))
        module._forward_pre_hooks = type(pre)((k, v) for k, v in pre.items() if k not in ids)
        module._forward_hooks = type(post)((k, v) for k, v in post.items() if k not in ids)
    return kept


# ------------------------------------------------------------------------------------------ metrics
COUNT_METRICS = {
    "groups",
    "groups_identical",
    "groups_paired",
    "groups_ranked",
    "groups_skipped",
    "groups_within_gap",
    "judge_decisive",
    "drift_tokens",
    "pairs",
    "tokens",
}

# a mean's key (last part) -> the count in the same report that it is a mean over (the key's prefix kept)
WEIGHTED_BY = {
    **dict.fromkeys(("clip_low_frac", "clip_high_frac", "clip_frac", "ratio_mean", "kl", "mean"), "tokens"),
    **dict.fromkeys(("margin", "accuracy", "chosen_logp", "rejected_logp", "nll"), "pairs"),
    **dict.fromkeys(
        ("reward_mean", "reward_spread", "distinct", "caption_words", "judge_acc", "greedy_chosen",
         "greedy_rejected", "greedy_judge_acc"),
        "groups",
    ),
    "judge_agree": "judge_decisive",
    "logp_drift_mean": "drift_tokens",
    "pairs_per_group": "groups_paired",
    "rejected_is_worst": "groups_ranked",
}


class StepMetrics:
    """A training step's metrics, gathered over micro-batches, GRPO inner iterations and processes so that they do
    not depend on how the batch was split (1 process x batch 4 reads as 2 processes x accumulation 2).

    By the key's last part: ``COUNT_METRICS`` and ``*/loss`` (each micro-batch's share of one global loss) are
    summed; ``*max*`` keys are maxed; every other number is a mean over the reports (micro-batches, iterations,
    processes) that have it, each weighted by the count it averages over in the same report (``WEIGHTED_BY``:
    ``grpo/ratio_mean`` by ``grpo/tokens``, ``simpo/accuracy`` by ``simpo/pairs``, ...; 1 for others). NaN and
    empty means (count 0) report nothing; a key with no report reads NaN. Counts are added once per rollout
    (``counts=False`` for the later inner iterations over the same batch). ``state`` is plain data, merged across
    processes. ``reward_std`` (a std over all rewards) is pooled from each report's ``reward_mean`` and ``groups``
    (Chan et al.'s parallel variance; G is fixed within a direction); a single report keeps its value as it is.
    """

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, Any, float]] = {}  # key -> (kind, value or weighted sum, weight)

    def add(self, values: dict[str, Any], counts: bool = True) -> None:
        for k, v in values.items():
            prefix, _, last = k.rpartition("/")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                self._merge(k, ("other", v, 0.0))
            elif last in COUNT_METRICS or k.endswith("/loss"):
                if counts or last not in COUNT_METRICS:
                    self._merge(k, ("sum", float(v), 0.0))
            elif last == "reward_std" and math.isfinite(float(v)):
                n, mean = float(values[f"{prefix}/groups"]), float(values[f"{prefix}/reward_mean"])
                self._merge(k, ("std", (mean, n * float(v) ** 2, float(v), 1), n))
            elif "max" in last:
                if math.isfinite(float(v)):
                    self._merge(k, ("max", float(v), 0.0))
            else:  # NaN (e.g. no decisive group) reports nothing, but the key stays
                by = f"{prefix}/{WEIGHTED_BY[last]}" if prefix and last in WEIGHTED_BY else None
                w = float(values.get(by, 1.0)) if math.isfinite(float(v)) else 0.0
                self._merge(k, ("mean", float(v) * w if w else 0.0, w))

    def merge(self, other: StepMetrics | dict) -> None:
        for k, entry in (other.state if isinstance(other, StepMetrics) else other).items():
            self._merge(k, tuple(entry))

    def _merge(self, key: str, entry: tuple) -> None:
        old = self.state.get(key)
        if old is None:
            self.state[key] = entry
        elif entry[0] == "sum":
            self.state[key] = ("sum", old[1] + entry[1], 0.0)
        elif entry[0] == "max":
            self.state[key] = ("max", max(old[1], entry[1]), 0.0)
        elif entry[0] == "mean":
            self.state[key] = ("mean", old[1] + entry[1], old[2] + entry[2])
        elif entry[0] == "std":  # Chan et al. (1979): pooled mean and sum of squared deviations
            (ma, m2a, _, ka), na, (mb, m2b, _, kb), nb = old[1], old[2], entry[1], entry[2]
            n = na + nb
            mean = ma + (mb - ma) * nb / n
            m2 = m2a + m2b + (mb - ma) ** 2 * na * nb / n
            self.state[key] = ("std", (mean, m2, math.sqrt(m2 / n), ka + kb), n)

    def result(self) -> dict[str, Any]:
        out = {}
        for k, (kind, value, weight) in sorted(self.state.items()):
            if kind == "mean":
                out[k] = value / weight if weight else float("nan")
            elif kind == "std":
                out[k] = value[2]  # the single report's own value, or the pooled one
            else:
                out[k] = value
        return out


def reduce_metrics(acc: Any, metrics: StepMetrics) -> dict[str, Any]:
    """The same metrics on every process, as one process with the whole batch would read them (``StepMetrics``:
    counts summed, ``*max*`` keys maxed, means weighted by their items)."""
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        everyone = gather_object([metrics.state])
        metrics = StepMetrics()
        for state in everyone:
            metrics.merge(state)
    return metrics.result()


def sum_over_processes(acc: Any, local: torch.Tensor) -> torch.Tensor:
    """``local`` (on the CPU) summed over every process."""
    if acc.num_processes > 1:
        return acc.reduce(local.to(acc.device), reduction="sum").cpu()
    return local
