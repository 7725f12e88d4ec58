"""The one DSR training loop, on accelerate: roll out -> score -> pair or advantage -> update -> log.

Read it top to bottom: ``train`` resolves the config and builds a ``Trainer``; ``Trainer.run`` evaluates the base,
calls ``Trainer.step`` for each step, logs it and evaluates the result. ``step`` names its phases, each a method:
``roll_out`` (sample groups), ``score`` (rewards, judge monitors), ``prepare`` (the algorithm's pairs or
advantages), ``update`` (``micro_loss``, backward, ``optimizer_step``: clip and step), then the metrics reduced
over processes. Strategies differ only in ``plan`` (which model trains which direction this step, and who scores
it); algorithms differ only in ``rollout.ALGORITHMS``, looked up by name.

Scaling is accelerate's: ``accelerate launch`` / ``torchrun`` give DDP, DeepSpeed ZeRO-2/ZeRO-3 or FSDP2
(``docs/scaling.md``). Each trained model is one ``suder.engine.Engine``: every loss goes through its prepared
module's ``forward`` (``Engine.loss_forward``), so the engine's hooks see exactly one forward per backward; the
no-grad calls (sampling, rewards, old and reference log-probs) go through it too under DDP and ZeRO-2, and with
sharded weights (ZeRO-3, FSDP2) run on a whole-weights view that every process gathers once per rollout phase
(``Trainer.whole``); a process whose groups were all skipped trains on a zero-weight stand-in, so that every
process runs the same sharded forwards. The run folder is ``outputs.RunWriter``'s: it gets records (metrics, the
models' whole-weights views), never the trainer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import monitors
from . import rewards as rewards_mod
from . import selfeval as selfeval_mod
from .config import TrainConfig, resolve
from .data import image_pool, prompt_pool
from .distributed import (
    StepMetrics,
    check_engine,
    clip_grad_norm,
    is_sharded,
    launched_engine,
    reduce_metrics,
    sum_over_processes,
)
from .engine import Dispatch, Engine, Reference, entered
from .errors import BackboneError, ConfigError, SuderError, TrainingError
from .outputs import ModelsToSave, RunWriter, TrainResult, check_writable, resume_config
from .protocol import ImageSamples, TextSamples
from .registry import get_reward_spec, load_backbone
from .rollout import (
    ALGORITHMS,
    Batch,
    Chunked,
    Chunks,
    Direction,
    Rollout,
    derive_seed,
    group_size,
    policy_logps,
    read_guidance,
    sample_group,
    store_guidance,
)
from .worlds.judge import judge_generation, judge_understanding


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


class Work(NamedTuple):
    """One direction's work in a step: the trained model (``policy``; ``gen`` or ``und`` for ``separate``), the
    direction, and the model that scores its rewards (a trained model's key, or ``frozen``)."""

    model: str
    direction: Direction
    scorer: str


def plan(cfg: TrainConfig, step: int) -> list[Work]:
    """This step's work. ``separate`` alternates every ``switch_every`` steps: one model trains while the other,
    frozen, provides its dual rewards."""
    if cfg.strategy == "separate":
        if (step // cfg.switch_every) % 2 == 0:
            return [Work("gen", "gen", "und")]
        return [Work("und", "und", "gen")]
    return [Work("policy", d, scorer_of(cfg, d)) for d in cfg.directions]


def scorer_of(cfg: TrainConfig, direction: Direction) -> str:
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
    if not cfg.shapes_world:  # the held-out files, and a slice that leaves something to train on
        selfeval_mod.heldout_split(cfg, {d: None for d in cfg.directions})
    check_writable(Path(cfg.output_dir))
    return RunWriter(Path(cfg.output_dir), True).plan_start(cfg)


class Trainer:
    """One run: ``run`` evaluates the base, calls ``step`` for each training step and saves the result."""

    def __init__(self, cfg: TrainConfig, policy: Any = None, callback: Callable[[dict], None] | None = None):
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
        if cfg.guard_drop is not None and cfg.guard_action == "rollback" and is_sharded(self.acc):
            raise ConfigError("guard_action rollback reloads whole weights, which ZeRO-3 and FSDP shard; use "
                              "guard_action stop, or DDP or ZeRO-2.")
        self.out = Path(cfg.output_dir)
        self.writer = RunWriter(self.out, self.acc.is_main_process)
        # data and output folder are checked before the base model is built or loaded
        self.resume_from = self.decide(lambda: preflight(cfg))
        self.pools: dict[Direction, Any] = {}
        if "gen" in cfg.directions:
            self.pools["gen"] = prompt_pool(cfg.prompts, cfg.seed)
        if "und" in cfg.directions:
            self.pools["und"] = image_pool(cfg.images, cfg.seed)
        # the held-out slice of the self-evaluation, removed from the training pools (None: no self-evaluation)
        self.pools, self.held = selfeval_mod.heldout_split(cfg, self.pools)
        self.tracker = selfeval_mod.Tracker(cfg.guard_drop, cfg.guard_action)
        self.selfeval_base: dict[str, Any] | None = None
        self.base_path = cfg.model
        if policy is None:
            if cfg.model is None and (cfg.backbone == "toy" or cfg.shapes_world):
                from .pretrain import ensure_base

                self.base_path = str(ensure_base(cfg.backbone, rebuild=cfg.rebuild_base))
            policy = load_backbone(
                cfg.backbone, **({"model": self.base_path} if self.base_path else {}), **cfg.backbone_options
            )
        self.base_guidance = read_guidance(policy)  # the base's own scale, before the run's replaces it
        store_guidance(policy, cfg.guidance_scale)
        self.judge = cfg.shapes_world
        self.rewards = {d: self._reward(d) for d in cfg.directions}
        self.engines, self.reference = self._build(policy)
        # rows per sampling/no-grad call, halved on OOM (rollout.py); auto on a GPU starts where the plan fits
        self.chunks = Chunks(self._starting_chunk() or cfg.rollout_chunk_size)
        self.last_rollouts: list[Rollout] = []  # the last step's, for the sample grids
        self.times: dict[str, float] = {}  # the last step's phase times

    def _starting_chunk(self) -> int | None:
        """``rollout_chunk_size: auto`` on a GPU: the largest rollout chunk whose memory plan fits the device (as
        ``suder run`` printed it), None for the whole group (it fits, there is no GPU or no plan)."""
        from . import memory

        _, total = memory.device_memory()
        if total is None or self.cfg.rollout_chunk_size != "auto":
            return None
        engine, processes = memory.launched()
        try:
            cfg = dataclasses.replace(self.cfg, model=self.base_path) if self.base_path else self.cfg
            return memory.auto_chunk(cfg, total, engine=engine, processes=processes)
        except BackboneError:  # no plan (a plugin without memory facts): halving on OOM decides
            return None

    def decide(self, fn: Callable[[], Any], whole: Iterable[str] = ()) -> Any:
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
    def _reward(self, direction: Direction) -> Callable[[Any, Any], torch.Tensor]:
        name = self.cfg.side(direction).reward
        spec = get_reward_spec(name)
        if direction not in spec.directions:
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
        return grpo_kl or c.simpo_kl_beta > 0 or und_ref or frozen_scorer or self.held is not None

    def _build(self, policy: nn.Module) -> tuple[dict[str, Engine], Reference | None]:
        """The trained models, one ``Engine`` each (``policy``; ``gen`` and ``und`` for ``separate``), and the
        frozen reference (``None`` when nothing reads it)."""
        from trl.trainer.utils import disable_dropout_in_model

        c = self.cfg
        disable_dropout_in_model(policy)  # GRPO's first ratio must be exactly 1; SimPO pairs must be comparable
        if c.gradient_checkpointing and hasattr(policy, "gradient_checkpointing_enable"):
            policy.gradient_checkpointing_enable()
        reference = self._reference(policy) if self._needs_reference() else None
        keys = {"gen": ("gen",), "und": ("und",)} if c.strategy == "separate" else {"policy": c.directions}
        # copies first: FSDP shards a module in place when it is prepared, and a sharded module cannot be copied
        copies = [policy] + [copy.deepcopy(policy) for _ in list(keys)[1:]]
        engines = {key: self._prepare(m, key, dirs) for m, (key, dirs) in zip(copies, keys.items())}
        if reference is not None and reference.scope is not None and self.sharded:
            first = engines[next(iter(keys))]  # the policy's own weights, on its gathered view
            reference = Reference(first, scope=first.backbone)
        return engines, reference

    def _reference(self, policy: nn.Module) -> Reference:
        """The initial policy, frozen: for LoRA backbones the policy under ``reference_scope()`` (a previous LoRA
        run's adapter snapshotted first: the reference is the run's initial model, not the base under it), else a
        deep copy."""
        if callable(getattr(policy, "reference_scope", None)):
            if callable(getattr(policy, "snapshot_reference", None)):
                policy.snapshot_reference()
            return Reference(policy, scope=policy)
        frozen = copy.deepcopy(policy).eval().requires_grad_(False)
        frozen.to(self.acc.device)
        return Reference(frozen)

    def _prepare(self, model: nn.Module, key: str, directions: tuple[Direction, ...]) -> Engine:
        """``model`` trained on ``directions``' parameters, with AdamW and its schedule, prepared by accelerate."""
        c = self.cfg
        trainable = {id(p) for d in directions for p in model.trainable_parameters(d)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=c.lr, weight_decay=c.weight_decay)
        # the scheduler is ours, not prepared: accelerate's steps it num_processes times per step (it assumes
        # the data grew with the processes; here max_steps already divides by them). One step per training
        # step, on the torch optimizer whose param_groups every engine (DDP, ZeRO) reads its lr from.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda(self._steps_for(key)))
        wrapped, opt = self.acc.prepare(Dispatch(model), opt)
        self.acc.register_for_checkpointing(sched)
        # the parameters as the engine holds them after prepare (FSDP replaces them with sharded ones)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        return Engine(self.acc, wrapped, opt, sched, params, sharded=self.sharded)

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
        per_step = c.grad_accum * self.acc.num_processes
        sizes = [len(self.pools[d]) / (c.side(d).batch_size * per_step) for d in ("gen", "und") if d in c.directions]
        return max(1, math.ceil(c.epochs * max(sizes)))

    def _steps_for(self, key: str) -> int:
        """Optimizer steps model ``key`` takes in the run (``separate``: the steps of its phases), which sizes its
        learning-rate schedule."""
        total = self.max_steps()
        return max(1, sum(1 for step in range(total) if plan(self.cfg, step)[0].model == key))

    @property
    def sharded(self) -> bool:
        """Weights are sharded across processes (ZeRO-3, FSDP): every read of them needs every process."""
        return is_sharded(self.acc)

    def scorer(self, key: str) -> Engine | Reference | None:
        """The model that computes self-rewards: ``frozen`` (the reference) or a trained model's key."""
        return self.reference if key == "frozen" else self.engines[key]

    def whole(self, keys: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        """With sharded weights (ZeRO-3, FSDP2), every process enters: the weights of models ``keys`` are gathered
        once, and inside each process calls them as often as its own samples need, with no collectives (captions
        end at different lengths on different processes). TRL gathers once per generation the same way. Without
        sharding, nothing to do."""
        return entered([self.engines[key].whole() for key in sorted(set(keys))])

    def saved_models(self) -> ModelsToSave:
        """What a checkpoint or the final folder saves: each trained model's whole-weights view."""
        c = self.cfg
        views = {"": self.engines["policy"].gathered} if "policy" in self.engines else {}
        views |= {key: self.engines[key].gathered for key in ("gen", "und") if key in self.engines}
        shapes = c.shapes_world and c.backbone != "toy"  # still a ShapesWorld model (``pretrain.write_marker``)
        return ModelsToSave(views, {"backbone": c.backbone, "trained_from": self.base_path} if shapes else None)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        from .tracking import Tracking

        c, writer = self.cfg, self.writer
        from .pretrain import base_digest

        extra = {"base_model": self.base_path, "base_sha256": base_digest(self.base_path)}
        writer.start(c, extra | {"num_processes": self.acc.num_processes}, self.resume_from)
        writer.tracking = Tracking(self.acc, c)  # report_to (tracking.py); after start(), which clears logs/
        before = self.before()
        start, history = writer.restore(self.acc, self.resume_from) if self.resume_from else (0, [])
        if self.held is not None:
            self.tracker.load(writer.selfeval, self.decide(writer.best_marker))
            self.selfeval_base = self.decide(self._selfeval_baseline, whole=self.engines)
        total = self.max_steps()
        stopped = False
        for step in range(start, total):
            metrics = self.step(step)
            metrics["step"] = step + 1
            if self.judge and c.eval_every and (step + 1) % c.eval_every == 0:
                held, stopped = self.decide(self._heldout, whole=self.engines)
                metrics.update(held)
            if self.held is not None and c.eval_every and (step + 1) % c.eval_every == 0:
                held, action, state = self.decide(functools.partial(self._self_evaluate, step + 1),
                                                  whole=self.engines)
                self.tracker.load(state)  # every process holds rank 0's best, so that all decide the same
                metrics.update(held)
                stopped = self.act(action, step + 1, held["selfeval/score"]) or stopped
            if self.acc.is_main_process:  # identical groups, every step (the rest is checked at evaluations)
                monitors.check_identical([*history, metrics], self.tracker.warned, step + 1)
                writer.selfeval = self.tracker.state()
            history.append(metrics)
            writer.log(metrics)
            if self.callback:
                self.callback(metrics | {"total_steps": total})
            if c.sample_every and (step + 1) % c.sample_every == 0:
                writer.sample_grids(step + 1, self.last_rollouts)
            if stopped:
                break
            if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < total:
                writer.checkpoint(self.acc, self.saved_models(), step + 1, c.save_total_limit)
        select_best = self.held is not None and c.select_final == "best"
        final = writer.save_final(self.acc, self.saved_models(), select_best=select_best)
        if self.held is not None:
            last = history[-1]["step"] if history else 0
            writer.extra["selfeval"] = selfeval_mod.run_record(c, self.tracker, self.selfeval_base, self.out, final,
                                                               last, select_best)
            if self.judge and writer.extra["selfeval"]["final_step"] != writer.extra["selfeval"]["last_step"]:
                self.load_weights(final)  # the judge scores what final/ holds
        after = self.evaluate("after") if self.judge else {}
        return writer.finish(c, before, after, history, final, stopped)

    def before(self) -> dict[str, Any]:
        """The base model's scores: evaluated once at the fresh start and kept in ``before.json``; a resumed run
        reads them back (evaluating now would score the checkpoint, not the base)."""
        if not self.judge:
            return {}
        if self.resume_from is not None:
            kept = self.decide(lambda: self.writer.load_record("before.json"))
            if kept is not None:
                return kept
        before = self.evaluate("before")  # still the base: checkpoints are restored after this
        self.writer.save_record("before.json", before)
        return before

    def _trained(self) -> tuple[Any, Any]:
        """The trained model that draws and the one that captions (the same one unless ``separate``)."""
        keys = ("gen", "und") if self.cfg.strategy == "separate" else ("policy", "policy")
        return self.engines[keys[0]].backbone, self.engines[keys[1]].backbone

    def _heldout(self) -> tuple[dict[str, float], bool]:
        held, score = self.writer.heldout(self.cfg, *self._trained())
        return held, self.writer.should_stop(score, self.cfg.early_stopping_patience)

    # ------------------------------------------------------------------ self-evaluation (suder.selfeval)
    def _selfeval_baseline(self) -> dict[str, Any]:
        """The frozen base's own held-out evaluation (kept in ``selfeval.json``; a resumed run reads it back)."""
        kept = self.writer.load_record("selfeval.json")
        if kept is None:
            kept = selfeval_mod.base_record(self.reference, self.held, self.cfg)
            self.writer.save_record("selfeval.json", kept)
        return kept

    def _self_evaluate(self, step: int) -> tuple[dict[str, float], str, dict[str, Any]]:
        """``selfeval.evaluate_step`` of the trained model(s) at ``step`` (main process), and the tracker's state."""
        out, action = selfeval_mod.evaluate_step(*self._trained(), self.reference, self.held, self.cfg,
                                                 self.selfeval_base, self.tracker, step)
        return out, action, self.tracker.state()

    def act(self, action: str, step: int, value: float) -> bool:
        """Every process: keep a new best's weights in ``best/`` (when ``select_final: best`` or a rollback guard
        needs them), roll back, or say to stop (True)."""
        c = self.cfg
        if action == "improved" and (c.select_final == "best" or (c.guard_drop and c.guard_action == "rollback")):
            self.writer.save_best(self.acc, self.saved_models(), step, value)
        elif action == "rollback":
            self.load_weights(self.out / "best")
            for engine in self.engines.values():  # a fresh optimizer at a lower rate, from the best weights
                opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
                opt.state.clear()
                engine.scheduler.base_lrs = [lr * c.guard_lr_factor for lr in engine.scheduler.base_lrs]
                for group in opt.param_groups:
                    group["lr"] *= c.guard_lr_factor
        if self.acc.is_main_process:
            self.writer.selfeval = self.tracker.state()
        return action == "stop"

    def load_weights(self, folder: Path) -> None:
        """Every trained model's weights from a saved folder (``best/``, ``final/``; ``gen/`` and ``und/`` inside
        for the separate strategy), every process."""
        for key, engine in self.engines.items():
            path = folder / key if key in ("gen", "und") else folder
            saved = load_backbone(self.cfg.backbone, model=str(path), **self.cfg.backbone_options)
            engine.backbone.load_state_dict(saved.state_dict())
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, Any]:
        """One training step, the same on every process: for each of ``grad_accum`` micro-batches and each direction
        this step trains (``plan``), roll out groups, score them and pair them or compute advantages (the
        algorithm's ``prepare``); then update each trained model and reduce the step's metrics over processes."""
        c, work = self.cfg, plan(self.cfg, step)
        self.last_rollouts, self.times = [], {}
        micro: list[dict[tuple[str, Direction], Batch | None]] = [{} for _ in range(c.grad_accum)]
        metrics = StepMetrics()
        t0 = time.perf_counter()
        # sharded weights: gathered once for the whole rollout phase, scorers included (see ``whole``)
        with self.whole({k for w in work for k in (w.model, w.scorer) if k in self.engines}):
            for m, batches in enumerate(micro):
                for w in work:
                    # the same autocast as the loss pass, so that old and new log-probs agree under mixed precision
                    with self.acc.autocast():
                        with self.sampling(w.model):
                            samples = self.roll_out(w, step, m)
                            rollout = self.score(w, samples)
                        metrics.add({f"drift/{w.direction}_identical_groups": monitors.identical_groups(
                            w.direction, rollout.samples, rollout.group_size)})
                        seeds = [derive_seed(c.seed, step, m, it, 7) for it in range(c.grpo_iterations)]
                        batches[(w.model, w.direction)], prepared = self.prepare(w.model, rollout, seeds)
                    metrics.add(prepared)
        t1 = time.perf_counter()
        norm = self.normalizers(micro)
        for key in sorted({w.model for w in work}):
            metrics.merge(self.update(key, micro, norm))
        metrics.add(self.times | {"time/rollout": t1 - t0, "time/update": time.perf_counter() - t1})
        metrics.add(self.chunks.metrics())
        return reduce_metrics(self.acc, metrics)

    @contextlib.contextmanager
    def sampling(self, key: str) -> Iterator[None]:
        """Model ``key`` in eval mode while it samples and scores, back in train mode for the update."""
        self.engines[key].eval()
        yield
        self.engines[key].train()

    def roll_out(self, w: Work, step: int, micro: int) -> ImageSamples | TextSamples:
        """This process's groups of ``w.direction``, sampled from model ``w.model``: its share of the pool's batch
        for (``step``, ``micro``), with a generator seeded by both and the process."""
        c = self.cfg
        index = (step * c.grad_accum + micro) * self.acc.num_processes + self.acc.process_index
        inputs = self.pools[w.direction].batch(index, c.side(w.direction).batch_size)
        gen = torch.Generator().manual_seed(
            derive_seed(c.seed, step, micro, w.direction == "und", self.acc.process_index)
        )
        t = time.perf_counter()
        samples = sample_group(self.engines[w.model], w.direction, inputs, c, gen, self.chunks)
        self._clock(f"time/{w.direction}_sample", t)
        return samples

    def score(self, w: Work, samples: ImageSamples | TextSamples) -> Rollout:
        """The rollout: ``samples`` with their (B*G,) rewards by the direction's reward, scored by model
        ``w.scorer``, and the exact judge's 1/0 as a monitor (ShapesWorld only)."""
        c, t = self.cfg, time.perf_counter()
        ctx = rewards_mod.RewardContext(
            scorer=self.chunked(self.scorer(w.scorer)),
            reference=self.chunked(self.reference),
            policy=self.chunked(self.engines[w.model]),
        )
        rewards = self.rewards[w.direction](ctx, samples).detach().float().cpu()
        judge_fn = judge_generation if w.direction == "gen" else judge_understanding
        judge = judge_fn(samples) if self.judge else None
        greedy_first = w.direction == "und" and c.text_greedy_in_group
        rollout = Rollout(w.direction, samples, rewards, group_size(c, w.direction), judge, greedy_first=greedy_first)
        self.last_rollouts.append(rollout)
        self._clock(f"time/{w.direction}_reward", t)
        return rollout

    def chunked(self, model: Any) -> Any:
        """``model``'s no-grad calls in chunks of ``rollout_chunk_size`` rows (``rollout.Chunked``)."""
        return None if model is None else Chunked(model, self.chunks)

    def _clock(self, key: str, since: float) -> None:
        self.times[key] = self.times.get(key, 0) + time.perf_counter() - since

    def prepare(self, key: str, rollout: Rollout, seeds: list[int]) -> tuple[Batch | None, dict[str, float]]:
        """The direction's algorithm's ``prepare`` on model ``key``: pairs (SimPO) or advantages and old log-probs
        (GRPO). With sharded weights every process must run the same layers' forwards in the update (each gathers
        its shards from all processes): where all of this process's groups were skipped, a stand-in (one sample,
        weight zero, ``count == 0``) takes the batch's place."""
        algo = ALGORITHMS[self.cfg.algo_for(rollout.direction)]
        batch, metrics = algo.prepare(
            self.chunked(self.engines[key]), rollout, self.cfg, self.chunked(self.reference), seeds
        )
        if batch is None and self.sharded:
            batch = Batch(rollout.direction, rollout.samples.select([0]), count=0, tokens=0, seeds=seeds)
        return batch, metrics

    def normalizers(self, micro: list[dict[tuple[str, Direction], Any]]) -> dict[tuple[str, str], dict[str, float]]:
        """Pairs/rows and target tokens of the whole accumulated batch, summed over micro-batches and processes
        (the loss of each process is divided by the global count, docs/algorithms.md)."""
        keys = sorted(micro[0])
        local = torch.tensor(
            [[sum(b[kd].count for b in micro if b[kd]), sum(b[kd].tokens for b in micro if b[kd])] for kd in keys],
            dtype=torch.float64,
        )
        total = sum_over_processes(self.acc, local)
        return {kd: {"count": float(total[i, 0]), "tokens": float(total[i, 1])} for i, kd in enumerate(keys)}

    def update(self, key: str, micro: list[dict], norm: dict) -> StepMetrics:
        """``grpo_iterations`` optimizer steps over the collected micro-batches (1 for SimPO), then one scheduler
        step. Each process's loss is its share of the global sum (normalised by the global count, times the number
        of processes, since DDP/ZeRO/FSDP average gradients); ``acc.accumulate`` syncs (and lets DeepSpeed step)
        only at the last micro-batch, and ``acc.backward``'s division by ``grad_accum`` is undone."""
        engine = self.engines[key]
        # the rate this step uses (the optimizer's: a guard rollback lowers it between scheduler steps)
        metrics: dict[str, Any] = {"lr": engine.scheduler.optimizer.param_groups[0]["lr"]}
        seen = StepMetrics()  # the losses' metrics, over micro-batches and inner iterations
        mine = [kd for kd in norm if kd[0] == key]
        if all(norm[kd]["count"] == 0 for kd in mine):  # every group of every process was skipped: no update
            with warnings.catch_warnings():  # "scheduler stepped before the optimizer": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                engine.scheduler.step()
            seen.add(metrics | {f"{kd[1]}/update_skipped": 1.0 for kd in mine})
            return seen
        scale = self.acc.num_processes * self.acc.gradient_accumulation_steps
        for it in range(self.cfg.grpo_iterations):  # 1 unless every trained direction uses GRPO (config checks)
            for batches in micro:
                part = {kd: b for kd, b in batches.items() if kd[0] == key}
                with self.acc.accumulate(engine.wrapped):
                    loss, parts = engine.loss_forward(functools.partial(self.micro_loss, key, part, norm, it))
                    self.acc.backward(loss * scale)
                seen.add(parts, counts=it == 0)  # tokens and pairs of one rollout: counted once
            metrics |= self.optimizer_step(key, seen)
            metrics["optimizer_steps"] = metrics.get("optimizer_steps", 0) + 1
        if hasattr(engine.wrapped, "global_steps"):  # DeepSpeed steps inside backward: its own count, for the record
            metrics["engine_steps"] = float(engine.wrapped.global_steps)
        engine.scheduler.step()
        seen.add(metrics)
        return seen

    def micro_loss(
        self, key: str, part: dict[tuple[str, Direction], Batch | None], norm: dict, it: int, backbone: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Model ``key``'s loss on one micro-batch at inner iteration ``it`` (run as the engine's training forward
        on ``backbone``): the directions' losses weighted by ``loss_weight``, and their metrics. Each micro-batch's
        loss is its share of the whole batch's: summed (``StepMetrics``), and averaged over the inner iterations."""
        c = self.cfg
        if self.sharded:  # stand-ins keep every process in the same forwards and backward
            total = torch.zeros((), device=self.acc.device)
        else:  # keeps every rank in DDP's backward
            total = sum(p.sum() for p in self.engines[key].params) * 0.0
        parts = {}
        for (_, d), b in part.items():
            if b is None or norm[(key, d)]["count"] == 0:
                continue
            if b.count == 0:  # a stand-in (sharded weights): the same forward, weight zero
                seed = b.seeds[min(it, len(b.seeds) - 1)]  # a perturbed estimator needs one
                total = total + policy_logps(backbone, d, b.samples, c, seed).values.sum() * 0.0
                continue
            loss, lm = ALGORITHMS[c.algo_for(d)].loss(backbone, b, c, norm[(key, d)], it)
            total = total + c.side(d).loss_weight * loss
            parts.update({f"{d}/{k}": v for k, v in lm.items()} | {f"{d}/loss": loss.item() / c.grpo_iterations})
        return total, parts

    def optimizer_step(self, key: str, seen: StepMetrics) -> dict[str, float]:
        """Clip model ``key``'s gradient (its norm, checked finite, is the result) and step its optimizer."""
        engine, out = self.engines[key], {}
        norm_value = clip_grad_norm(self.acc, engine.params, self.cfg.max_grad_norm or float("inf"))
        if norm_value is not None:
            norm_value = float(norm_value)
            if not math.isfinite(norm_value):  # the same on every process: gradients are all-reduced
                raise TrainingError(
                    f"The gradient of {key} is not finite at this step (norm {norm_value}); losses "
                    f"{ {k: v for k, v in seen.result().items() if k.endswith('/loss')} }. Lower lr or check "
                    "the rewards."
                )
            out["grad_norm"] = norm_value
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, when: str) -> dict[str, Any]:
        """The judge's scores (main process; with sharded weights every process gathers them first)."""
        from .evaluate import evaluate

        c = self.cfg
        with self.whole(self.engines):
            if not self.acc.is_main_process:
                return {}
            if c.strategy == "separate":
                gen_model = self.engines["gen"].backbone
                out = evaluate(gen_model, num=c.eval_num, what=("t2i",))
                out |= evaluate(self.engines["und"].backbone, num=c.eval_num, what=("caption",))
            else:
                gen_model = self.engines["policy"].backbone
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
