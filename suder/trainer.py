"""The one DSR training loop, on accelerate: rollout -> reward -> pairs/groups -> update.

Read it top to bottom: ``train`` resolves the config and builds the models, ``Trainer.run`` evaluates the base,
loops over steps and evaluates the result. Strategies differ only in ``plan`` (which model trains which
direction this step, and who scores it); algorithms differ only in ``rollout.ALGORITHMS``.

Scaling is accelerate's: ``accelerate launch`` / ``torchrun`` give DDP, DeepSpeed ZeRO-2/ZeRO-3 or FSDP2
(``docs/scaling.md``). Every loss goes through the prepared module's ``forward`` (``Dispatch``), so the engine's
hooks see exactly one forward per backward. The no-grad calls (sampling, rewards, old and reference log-probs) go
through it too under DDP and ZeRO-2 (``Routed``); with sharded weights (ZeRO-3, FSDP2) they run on a whole-weights
view that every process gathers once per rollout phase (``Trainer.whole``), and a process whose groups were all
skipped trains on a zero-weight stand-in, so that every process runs the same sharded forwards.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import rewards as rewards_mod
from .config import TrainConfig, resolve
from .data import image_pool, prompt_pool
from .distributed import (
    StepMetrics,
    check_engine,
    clip_grad_norm,
    compute_dtype,
    is_sharded,
    launched_engine,
    whole_weights,
)
from .errors import SuderError, TrainingError
from .outputs import RunWriter, TrainResult, check_writable, resume_config
from .registry import get_reward_spec, load_backbone
from .rollout import ALGORITHMS, Batch, ReferenceScope, Rollout, group_size, policy_logps, sample_group


class Dispatch(nn.Module):
    """``forward(fn) = fn(backbone)``: routes any backbone method through the (DDP/ZeRO/FSDP-)wrapped forward."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        # what accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` shards layer by layer when the config names no class
        present = {type(m).__name__ for m in backbone.modules()}
        self._no_split_modules = sorted(
            {n for m in backbone.modules() for n in getattr(m, "_no_split_modules", None) or [] if n in present}
        )

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.backbone)


class Routed:
    """A backbone seen through its wrapped module, for the no-grad calls (sampling, rewards, old and reference
    log-probs): ``routed.sample_image(...)`` runs inside ``wrapped.forward``, so DDP and ZeRO-2 see every use; with
    sharded weights (``gather=True``: ZeRO-3, FSDP2) it runs on a whole-weights view instead (``whole_weights``),
    since samplers call layers one by one and read weights outside any module's forward. The trainer enters that
    view once per rollout phase (``Trainer.whole``), which makes each call's own gathering a no-op. Attributes that
    are not methods come from the backbone itself."""

    def __init__(self, wrapped: nn.Module, backbone: nn.Module, gather: bool = False):
        self._wrapped, self._backbone, self._gather = wrapped, backbone, gather

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backbone, name)
        if not callable(attr) or name in ("train", "eval", "reference_scope"):
            return attr
        if self._gather:

            def gathered_call(*args, **kwargs):
                with whole_weights(self._wrapped, self._backbone) as whole:
                    return getattr(whole, name)(*args, **kwargs)

            return gathered_call
        return lambda *args, **kwargs: self._wrapped(lambda m: getattr(m, name)(*args, **kwargs))


def train(
    model: Any = None,
    /,
    algo: str | None = None,
    *,
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    **config: Any,
) -> TrainResult:
    """Self-improve ``model`` (backbone name or ``UnifiedLMM``) with dual self-rewards; see ``docs/python-api.md``.

    Precedence: ``config_file`` (YAML) < ``flags`` < keywords, where only what the caller passed counts: with no
    ``model`` and no ``algo`` the YAML file or the flags decide, and only then the defaults (``toy``, ``simpo``).
    """
    policy = None
    if isinstance(model, str):
        config["backbone"] = model
    elif model is not None:
        policy = model
        if "backbone" not in config and "backbone" not in (flags or {}):
            config["backbone"] = getattr(model, "name", "custom")
    if algo is not None:
        config["algo"] = algo
    cfg = resume_config(resolve(config_file, flags, **config))  # a resumed run continues with its saved settings
    return Trainer(cfg, policy, callback).run()


def plan(cfg: TrainConfig, step: int) -> list[tuple[str, str, str]]:
    """This step's work as (trained model, direction, scoring model). ``separate`` alternates every
    ``switch_every`` steps: one model trains while the other, frozen, provides its dual rewards."""
    if cfg.strategy == "separate":
        if (step // cfg.switch_every) % 2 == 0:
            return [("gen", "gen", "und")]
        return [("und", "und", "gen")]
    return [("policy", d, scorer_of(cfg, d)) for d in cfg.directions]


def scorer_of(cfg: TrainConfig, direction: str) -> str:
    """Which model scores ``direction``'s rewards: ``frozen`` (the initial model) or ``policy``."""
    return cfg.side(direction).reward_scorer  # resolved by TrainConfig


def preflight(cfg: TrainConfig) -> Path | None:
    """Every check that needs no model: the backbone name, the data files, the output folder (and what
    ``resume``/``overwrite`` make of it). Raises one-line ``SuderError``s; returns the checkpoint to resume from.
    The CLI calls it before pre-training or loading anything; ``Trainer`` calls it again (main process)."""
    from .registry import get_backbone_spec

    get_backbone_spec(cfg.backbone)
    if "gen" in cfg.directions:
        prompt_pool(cfg.prompts, cfg.seed)
    if "und" in cfg.directions:
        image_pool(cfg.images, cfg.seed)
    check_writable(Path(cfg.output_dir))
    return RunWriter(Path(cfg.output_dir), True).plan_start(cfg)


class Trainer:
    def __init__(self, cfg: TrainConfig, policy: Any = None, callback=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs

        from .tracking import accelerator_kwargs

        self.cfg, self.callback = cfg, callback
        engine = launched_engine()
        handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=False)]
        if not torch.accelerator.is_available() and engine != "ddp":
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.acc = Accelerator(
            # without an accelerator, torchrun's processes still form a (gloo) group; accelerate only recognises
            # it with cpu=True, which would also turn a requested DeepSpeed into plain DDP: only for DDP
            cpu=not torch.accelerator.is_available() and engine == "ddp",
            mixed_precision=cfg.mixed_precision,
            kwargs_handlers=handlers,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.grad_accum, sync_with_dataloader=False, adjust_scheduler=False
            ),
            **accelerator_kwargs(cfg),  # report_to: log_with and project_dir
        )
        check_engine(self.acc, engine, cfg)
        self.out = Path(cfg.output_dir)
        self.writer = RunWriter(self.out, self.acc.is_main_process)
        # data and output folder are checked before the base model is built or loaded
        self.resume_from = self.decide(lambda: preflight(cfg))
        self.pools = {}
        if "gen" in cfg.directions:
            self.pools["gen"] = prompt_pool(cfg.prompts, cfg.seed)
        if "und" in cfg.directions:
            self.pools["und"] = image_pool(cfg.images, cfg.seed)
        self.base_path = cfg.model
        if policy is None:
            if cfg.model is None and (cfg.backbone == "toy" or cfg.shapes_world):
                from .pretrain import ensure_base

                self.base_path = str(ensure_base(cfg.backbone))
            policy = load_backbone(
                cfg.backbone, **({"model": self.base_path} if self.base_path else {}), **cfg.backbone_options
            )
        self.base_guidance = read_guidance(policy)  # the base's own scale, before the run's replaces it
        store_guidance(policy, cfg.guidance_scale)
        self.judge = cfg.shapes_world
        self.rewards = {d: self._reward(d) for d in cfg.directions}
        self.models = self._build_models(policy)

    def decide(self, fn: Callable[[], Any], whole: tuple[str, ...] = ()) -> Any:
        """Run ``fn`` on the main process and give its result, or its ``SuderError``, to every process, so that
        no rank waits forever for a decision (or an error) that only rank 0 saw. ``whole``: the models ``fn`` reads,
        whose sharded weights every process gathers first (``Trainer.whole``)."""
        result, error = None, None
        with self.whole(whole):
            if self.acc.is_main_process:
                try:
                    result = fn()
                except SuderError as exc:
                    error = exc
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            result, error = broadcast_object_list([result, error], from_process=0)
        if error is not None:
            raise error
        return result

    # ------------------------------------------------------------------ setup
    def _reward(self, direction: str):
        name = self.cfg.side(direction).reward
        spec = get_reward_spec(name)
        if direction not in spec.directions:
            from .errors import ConfigError

            raise ConfigError(
                f"Reward '{name}' does not score the {direction} direction (it scores {spec.directions})."
            )
        c = self.cfg
        return spec.factory(
            direction,
            reduction=c.reward_reduction,
            consensus_lambda=c.consensus_lambda,
            consensus_source=c.consensus_source,
        )

    def _needs_reference(self) -> bool:
        c = self.cfg
        und_ref = "und" in c.directions and rewards_mod.needs_reference(c.und.reward, c.to_dict())
        frozen_scorer = any(scorer_of(c, d) == "frozen" for d in c.directions)
        grpo_kl = c.grpo_beta > 0 and any(c.algo_for(d) == "grpo" for d in c.directions)
        return grpo_kl or c.simpo_kl_beta > 0 or und_ref or frozen_scorer

    def _build_models(self, policy: nn.Module) -> dict[str, Any]:
        from trl.trainer.utils import disable_dropout_in_model

        c = self.cfg
        disable_dropout_in_model(policy)  # GRPO's first ratio must be exactly 1; SimPO pairs must be comparable
        if c.gradient_checkpointing and hasattr(policy, "gradient_checkpointing_enable"):
            policy.gradient_checkpointing_enable()
        frozen = None
        if self._needs_reference():
            if callable(getattr(policy, "reference_scope", None)):
                if callable(getattr(policy, "snapshot_reference", None)):  # e.g. a previous LoRA run's adapter
                    policy.snapshot_reference()  # the reference is the run's initial model, not the base under it
                frozen = ReferenceScope(policy)
            else:
                frozen = copy.deepcopy(policy).eval().requires_grad_(False)
                frozen.to(self.acc.device)
        keys = {"gen": ("gen",), "und": ("und",)} if c.strategy == "separate" else {"policy": c.directions}
        models: dict[str, Any] = {"frozen": frozen, "reference": frozen}
        # copies first: FSDP shards a module in place when it is prepared, and a sharded module cannot be copied
        copies = [policy] + [copy.deepcopy(policy) for _ in list(keys)[1:]]
        for m, (key, directions) in zip(copies, keys.items()):
            trainable = {id(p) for d in directions for p in m.trainable_parameters(d)}
            for p in m.parameters():
                p.requires_grad_(id(p) in trainable)
            trained = [p for p in m.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trained, lr=c.lr, weight_decay=c.weight_decay)
            # the scheduler is ours, not prepared: accelerate's steps it num_processes times per step (it assumes
            # the data grew with the processes; here max_steps already divides by them). One step per training
            # step, on the torch optimizer whose param_groups every engine (DDP, ZeRO) reads its lr from.
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda(self._steps_for(key)))
            wrapped, opt = self.acc.prepare(Dispatch(m), opt)
            self.acc.register_for_checkpointing(sched)
            # the parameters as the engine holds them after prepare (FSDP replaces them with sharded ones)
            params = [p for p in wrapped.parameters() if p.requires_grad]
            models[key] = {"wrapped": wrapped, "opt": opt, "sched": sched, "params": params}
        if isinstance(frozen, ReferenceScope) and self.sharded:  # the policy's own weights, on a gathered view
            first = next(iter(keys))
            models["frozen"] = models["reference"] = ReferenceScope(self.routed_from(models[first]["wrapped"]))
        return models

    def _lr_lambda(self, total: int) -> Callable[[int], float]:
        warm, cosine = self.cfg.warmup_steps, self.cfg.lr_schedule == "cosine"

        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return f

    def max_steps(self) -> int:
        c = self.cfg
        if c.steps is not None:
            return int(c.steps)
        sizes = []
        if "gen" in c.directions:
            sizes.append(len(self.pools["gen"]) / (c.gen.batch_size * c.grad_accum * self.acc.num_processes))
        if "und" in c.directions:
            sizes.append(len(self.pools["und"]) / (c.und.batch_size * c.grad_accum * self.acc.num_processes))
        return max(1, math.ceil(c.epochs * max(sizes)))

    def _steps_for(self, key: str) -> int:
        """Optimizer steps model ``key`` takes in the run (``separate``: the steps of its phases), which sizes its
        learning-rate schedule."""
        total = self.max_steps()
        return max(1, sum(1 for step in range(total) if plan(self.cfg, step)[0][0] == key))

    def unwrapped(self, key: str) -> Any:
        return self.acc.unwrap_model(self.models[key]["wrapped"]).backbone

    def routed(self, key: str) -> Routed:
        return self.routed_from(self.models[key]["wrapped"])

    def routed_from(self, wrapped: nn.Module) -> Routed:
        return Routed(wrapped, self.acc.unwrap_model(wrapped).backbone, gather=self.sharded)

    def scorer(self, key: str) -> Any:
        return self.models["frozen"] if key == "frozen" else self.routed(key)

    @property
    def sharded(self) -> bool:
        """Weights are sharded across processes (ZeRO-3, FSDP): every read of them needs every process."""
        return is_sharded(self.acc)

    def eval_model(self, key: str) -> Any:
        """The model evaluation reads (main process), inside ``whole`` where the weights are sharded."""
        return self.unwrapped(key)

    def gathered(self, key: str):
        """A view of model ``key`` with whole weights, for saving; entered by every process."""
        return whole_weights(self.models[key]["wrapped"], self.unwrapped(key))

    def trained_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.models if k not in ("frozen", "reference"))

    @contextlib.contextmanager
    def whole(self, keys: tuple[str, ...] | list[str] | set[str]):
        """With sharded weights (ZeRO-3, FSDP2), every process enters: the weights of models ``keys`` are gathered
        once, and inside each process calls them as often as its own samples need, with no collectives (captions
        end at different lengths on different processes). TRL gathers once per generation the same way. Without
        sharding, nothing to do."""
        with contextlib.ExitStack() as stack:
            if self.sharded:
                dtype = compute_dtype(self.acc)
                for key in sorted(set(keys)):
                    stack.enter_context(whole_weights(self.models[key]["wrapped"], self.unwrapped(key), dtype))
            yield

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        from .tracking import Tracking

        c, writer = self.cfg, self.writer
        writer.start(c, {"base_model": self.base_path, "num_processes": self.acc.num_processes}, self.resume_from)
        writer.tracking = Tracking(self.acc, c)  # report_to (tracking.py); after start(), which clears logs/
        before = self.before()
        start, history = writer.restore(self, self.resume_from) if self.resume_from else (0, [])
        total = self.max_steps()
        stopped = False
        for step in range(start, total):
            metrics = self.train_step(step)
            metrics["step"] = step + 1
            if self.judge and c.eval_every and (step + 1) % c.eval_every == 0:
                held, stopped = self.decide(self._heldout, whole=self.trained_keys())
                metrics.update(held)
            history.append(metrics)
            writer.log(metrics)
            if self.callback:
                self.callback(metrics | {"total_steps": total})
            if c.sample_every and (step + 1) % c.sample_every == 0:
                writer.sample_grids(step + 1, self._last_rollouts)
            if stopped:
                break
            if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < total:
                writer.checkpoint(self, step + 1)
        final = writer.save_final(self)
        after = self.evaluate("after") if self.judge else {}
        return writer.finish(self, before, after, history, final, stopped)

    def before(self) -> dict[str, Any]:
        """The base model's scores: evaluated once at the fresh start and kept in ``before.json``; a resumed run
        reads them back (evaluating now would score the checkpoint, not the base)."""
        if not self.judge:
            return {}
        if self.resume_from is not None:
            kept = self.decide(self.writer.load_before)
            if kept is not None:
                return kept
        before = self.evaluate("before")  # still the base: checkpoints are restored after this
        self.writer.save_before(before)
        return before

    def _heldout(self) -> tuple[dict[str, float], bool]:
        held, score = self.writer.heldout(self)
        return held, self.writer.should_stop(score, self.cfg.early_stopping_patience)

    def train_step(self, step: int) -> dict[str, Any]:
        c = self.cfg
        work = plan(c, step)
        t0 = time.perf_counter()
        self._last_rollouts = []
        self._phase_times: dict[str, float] = {}
        # sharded weights: gathered once for the whole rollout phase, scorers included (see ``whole``)
        with self.whole({k for w in work for k in (w[0], w[2]) if k in self.trained_keys()}):
            micro, metrics = self.collect(work, step)
        t1 = time.perf_counter()
        norm = self.normalizers(micro)
        for key in sorted({k for k, _, _ in work}):
            metrics.merge(self.update(key, micro, norm))
        metrics.add({"time/rollout": t1 - t0, "time/update": time.perf_counter() - t1})
        return self.reduce_metrics(metrics)

    def collect(self, work: list[tuple[str, str, str]], step: int) -> tuple[list[dict], StepMetrics]:
        """This step's ``grad_accum`` micro-batches: rollouts, rewards and prepared batches, with their metrics."""
        c = self.cfg
        micro: list[dict[tuple[str, str], Any]] = []
        metrics = StepMetrics()
        for m in range(c.grad_accum):
            batches = {}
            for key, direction, scorer_key in work:
                # the same autocast as the loss pass, so that old and new log-probs agree under mixed precision
                with self.acc.autocast():
                    rollout = self.rollout(key, direction, scorer_key, step, m)
                    seeds = [derive_seed(c.seed, step, m, it, 7) for it in range(c.grpo_iterations)]
                    batch, rm = self.prepare_batch(ALGORITHMS[c.algo_for(direction)], key, rollout, seeds)
                metrics.add(rm)
                batches[(key, direction)] = batch
            micro.append(batches)
        return micro, metrics

    def prepare_batch(self, algo: Any, key: str, rollout: Rollout, seeds: list[int]) -> tuple[Batch | None, dict]:
        """``algo.prepare`` on model ``key``. With sharded weights every process must run the same layers' forwards
        in the update (each gathers its shards from all processes): where all of this process's groups were
        skipped, a stand-in (one sample, weight zero, ``count == 0``) takes the batch's place."""
        batch, metrics = algo.prepare(self.routed(key), rollout, self.cfg, self.models["reference"], seeds)
        if batch is None and self.sharded:
            batch = Batch(rollout.direction, rollout.samples.select([0]), count=0, tokens=0, seeds=seeds)
        return batch, metrics

    def normalizers(self, micro: list[dict[tuple[str, str], Any]]) -> dict[tuple[str, str], dict[str, float]]:
        """Pairs/rows and target tokens of the whole accumulated batch, summed over micro-batches and processes
        (the loss of each process is divided by the global count, docs/algorithms.md)."""
        keys = sorted(micro[0])
        local = torch.tensor(
            [[sum(b[kd].count for b in micro if b[kd]), sum(b[kd].tokens for b in micro if b[kd])] for kd in keys],
            dtype=torch.float64,
        )
        if self.acc.num_processes > 1:
            local = self.acc.reduce(local.to(self.acc.device), reduction="sum").cpu()
        return {kd: {"count": float(local[i, 0]), "tokens": float(local[i, 1])} for i, kd in enumerate(keys)}

    def reduce_metrics(self, metrics: StepMetrics) -> dict[str, Any]:
        """The same metrics on every process, as one process with the whole batch would read them
        (``StepMetrics``: counts summed, ``*max*`` keys maxed, means weighted by their items)."""
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            everyone = gather_object([metrics.state])
            metrics = StepMetrics()
            for state in everyone:
                metrics.merge(state)
        return metrics.result()

    def rollout(self, key: str, direction: str, scorer_key: str, step: int, micro: int) -> Rollout:
        c = self.cfg
        size = c.side(direction).batch_size
        index = (step * c.grad_accum + micro) * self.acc.num_processes + self.acc.process_index
        inputs = self.pools[direction].batch(index, size)
        gen = torch.Generator().manual_seed(
            derive_seed(c.seed, step, micro, direction == "und", self.acc.process_index)
        )
        policy = self.unwrapped(key)
        t = time.perf_counter()
        policy.eval()
        samples = sample_group(self.routed(key), direction, inputs, c, gen)
        ctx = rewards_mod.RewardContext(
            scorer=self.scorer(scorer_key), reference=self.models["reference"], policy=self.routed(key)
        )
        t_reward = time.perf_counter()
        rewards = self.rewards[direction](ctx, samples).detach().float().cpu()
        judge = None
        if self.judge:
            judge = (rewards_mod.judge_generation if direction == "gen" else rewards_mod.judge_understanding)(samples)
        policy.train()
        greedy_first = direction == "und" and c.text_greedy_in_group
        G = group_size(c, direction)
        rollout = Rollout(direction, samples, rewards, G, judge, greedy_first=greedy_first)
        self._last_rollouts.append(rollout)
        self._phase_times[f"time/{direction}_sample"] = (
            self._phase_times.get(f"time/{direction}_sample", 0) + t_reward - t
        )
        self._phase_times[f"time/{direction}_reward"] = (
            self._phase_times.get(f"time/{direction}_reward", 0) + time.perf_counter() - t_reward
        )
        return rollout

    def update(self, key: str, micro: list[dict], norm: dict) -> StepMetrics:
        """``grpo_iterations`` optimizer steps over the collected micro-batches (1 for SimPO), then one scheduler
        step. Each process's loss is its share of the global sum (normalised by the global count, times the number
        of processes, since DDP/ZeRO/FSDP average gradients); ``acc.accumulate`` syncs (and lets DeepSpeed step)
        only at the last micro-batch, and ``acc.backward``'s division by ``grad_accum`` is undone."""
        c, model = self.cfg, self.models[key]
        wrapped, opt, sched = model["wrapped"], model["opt"], model["sched"]
        weights = {d: c.side(d).loss_weight for d in ("gen", "und")}
        metrics: dict[str, Any] = {"lr": sched.get_last_lr()[0]}  # the rate this step uses
        parts_seen = StepMetrics()  # the losses' metrics, over micro-batches and inner iterations
        mine = [kd for kd in norm if kd[0] == key]
        if all(norm[kd]["count"] == 0 for kd in mine):  # every group of every process was skipped: no update
            with warnings.catch_warnings():  # "scheduler stepped before the optimizer": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            parts_seen.add(metrics | {f"{kd[1]}/update_skipped": 1.0 for kd in mine})
            return parts_seen
        scale = self.acc.num_processes * self.acc.gradient_accumulation_steps
        iterations = c.grpo_iterations  # 1 unless every trained direction uses GRPO (config checks)
        for it in range(iterations):
            for batches in micro:
                part = {kd: b for kd, b in batches.items() if kd[0] == key}

                def step_loss(backbone, part=part, it=it):
                    if self.sharded:  # stand-ins keep every process in the same forwards and backward
                        total = torch.zeros((), device=self.acc.device)
                    else:  # keeps every rank in DDP's backward
                        total = sum(p.sum() for p in model["params"]) * 0.0
                    parts = {}
                    for (_, d), b in part.items():
                        if b is None or norm[(key, d)]["count"] == 0:
                            continue
                        if b.count == 0:  # a stand-in (sharded weights): the same forward, weight zero
                            seed = b.seeds[min(it, len(b.seeds) - 1)]  # a perturbed estimator needs one
                            total = total + policy_logps(backbone, d, b.samples, c, seed).values.sum() * 0.0
                            continue
                        loss, lm = ALGORITHMS[c.algo_for(d)].loss(backbone, b, c, norm[(key, d)], it)
                        total = total + weights[d] * loss
                        # each micro-batch's loss is its share of the whole batch's: summed (StepMetrics), and
                        # averaged over the inner iterations
                        parts.update({f"{d}/{k}": v for k, v in lm.items()} | {f"{d}/loss": loss.item() / iterations})
                    return total, parts

                with self.acc.accumulate(wrapped):
                    loss, parts = wrapped(step_loss)
                    self.acc.backward(loss * scale)
                parts_seen.add(parts, counts=it == 0)  # tokens and pairs of one rollout: counted once
            norm_value = clip_grad_norm(self.acc, model["params"], c.max_grad_norm or float("inf"))
            if norm_value is not None:
                norm_value = float(norm_value)
                if not math.isfinite(norm_value):  # the same on every process: gradients are all-reduced
                    raise TrainingError(
                        f"The gradient of {key} is not finite at this step (norm {norm_value}); losses "
                        f"{ {k: v for k, v in parts_seen.result().items() if k.endswith('/loss')} }. Lower lr or check "
                        "the rewards."
                    )
                metrics["grad_norm"] = norm_value
            opt.step()
            opt.zero_grad(set_to_none=True)
            metrics["optimizer_steps"] = metrics.get("optimizer_steps", 0) + 1
        if hasattr(wrapped, "global_steps"):  # DeepSpeed steps inside backward: its own count, for the record
            metrics["engine_steps"] = float(wrapped.global_steps)
        sched.step()
        metrics.update(getattr(self, "_phase_times", {}))
        parts_seen.add(metrics)
        return parts_seen

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, when: str) -> dict[str, Any]:
        """The judge's scores (main process; with sharded weights every process gathers them first)."""
        from .evaluate import evaluate

        c = self.cfg
        with self.whole(self.trained_keys()):
            if not self.acc.is_main_process:
                return {}
            if c.strategy == "separate":
                gen_model = self.eval_model("gen")
                out = evaluate(gen_model, num=c.eval_num, what=("t2i",))
                out |= evaluate(self.eval_model("und"), num=c.eval_num, what=("caption",))
            else:
                gen_model = self.eval_model("policy")
                out = evaluate(gen_model, num=c.eval_num)
            base, run = self.base_guidance, c.guidance_scale
            if when == "before" and base is not None and run is not None and float(run) != float(base):
                # the base at its own scale too: a gain over the base at the run's scale alone could be mostly
                # the model learning to use a scale that hurt it
                store_guidance(gen_model, base)
                try:
                    own = evaluate(gen_model, num=c.eval_num, what=("t2i",))
                    out["base_guidance"] = {"guidance_scale": float(base)} | own
                finally:
                    store_guidance(gen_model, run)
            return out


def _guidance_holder(model: Any) -> Any:
    """Where a backbone keeps its default guidance scale: ``config``, ``settings``, else the model itself."""
    for holder in (getattr(model, "config", None), getattr(model, "settings", None)):
        if holder is not None and not callable(holder) and hasattr(holder, "guidance_scale"):
            return holder
    return model


def read_guidance(model: Any) -> float | None:
    """The model's default guidance scale (``store_guidance`` writes it there); ``None`` if it keeps none."""
    scale = getattr(_guidance_holder(model), "guidance_scale", None)
    return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None


def store_guidance(model: Any, scale: float | None) -> None:
    """Make the training guidance scale the model's default, so checkpoints carry the scale the model was
    optimised for and ``suder generate`` uses it (gains do not carry across scales)."""
    if scale is None:
        return
    try:
        _guidance_holder(model).guidance_scale = float(scale)
    except AttributeError:
        pass


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (Python's ``hash`` of strings changes per process)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % 2**64
    return h % 2**63
