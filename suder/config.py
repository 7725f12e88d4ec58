"""``TrainConfig``: every setting of a DSR run, resolved from ordered layers, validated on construction.

**Sections.** Shared settings sit at the top level; what each direction sets for itself lives in ``gen:``
(text-to-image) and ``und:`` (captioning), a ``DirectionConfig`` each: ``algo``, ``batch_size``, ``group_size``,
``reward``, ``reward_scorer``, ``loss_weight``, ``simpo_pairs``, ``simpo_min_gap``. Readers ask ``cfg.side("gen")``.

**Layers.** ``resolve`` is one pure function of five ordered layers, each a mapping of keys to values:

    default < preset < config (the --config YAML) < flags < keywords (of ``suder.train`` / ``resolve``)

A later layer wins. ``default`` is the dataclass defaults: the paper's (appendix A.1: lr 3e-6 with cosine decay and
5 warm-up steps, G = 8, SimPO beta 2.0 / gamma 0.5, GRPO clip 0.2 / 0.28 and KL beta 0.04, grad-accum 2, 5 epochs).
``preset`` is a named YAML file in ``suder/presets/`` for each embedded default: ``toy`` for the toy backbone, and the
backbone's own (``show-o``, ``janus-pro``, named by its ``ShapesRecipe.preset``) when the run is a ShapesWorld run
(``TrainConfig.shapes_world``); each file says why its values differ from the paper's. A real-data run of another
backbone gets no preset.

**Globals decide both directions.** ``algo``, ``batch_size``, ``group_size`` and ``reward_scorer`` exist at the top
and in each section. A direction's value comes from the later of the two layers that set them, the section winning
a tie: ``--group-size 4`` over the Janus-Pro preset's ``gen.group_size: 16`` gives 4 and 4; ``--gen.group-size 16``
with ``--group-size 4`` gives 16 and 4.

**Coercion.** Every value of every layer is coerced to its field's type (``lr: 1e-5``, a string to PyYAML, becomes
1e-05; ``steps: "300"`` becomes 300) or refused with one line naming the key (``group_size: four``).

**Provenance.** ``resolve`` records, for each key, the layer that set it (``TrainConfig.sources``, keys dotted:
``gen.group_size``); a run's ``config.yaml`` holds the resolved values and that ``sources:`` mapping. Loading a saved
``config.yaml`` as ``--config`` keeps only what a user set (config, flags, keywords; not ``resume`` or
``overwrite``) as the config layer; values that came from the defaults or a preset are left to those layers, so
``--config RUN/config.yaml --group-size 4`` gives 4 in both directions and ``--algo grpo`` GRPO in both.

**Legacy keys.** The flat keys of earlier versions still load from YAML and as keywords, mapped to their section:
``gen_algo``/``und_algo`` -> ``gen.algo``/``und.algo``, likewise ``*_batch_size``, ``*_group_size``, ``*_reward``,
``*_reward_scorer``, ``*_loss_weight``; ``simpo_gen_pairs`` -> ``gen.simpo_pairs``, ``simpo_gen_min_gap`` ->
``gen.simpo_min_gap`` (and ``und``). They are names to set values by; code reads ``cfg.side(d)`` (``cfg.gen``).

Unknown keys are errors with the closest valid key suggested.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, closest
from .tracking import check_installed, parse_report_to

ALGOS = ("simpo", "grpo")
STRATEGIES = ("unified", "gen", "und", "separate")
SIMPO_PAIRS = ("best-worst", "all", "best-likeliest")
DIRECTIONS = ("gen", "und")
SELECT_FINAL = ("last", "best")
GUARD_ACTIONS = ("stop", "rollback")
LAYERS = ("default", "preset", "config", "flags", "keywords")
USER_LAYERS = ("config", "flags", "keywords")
PRESETS_DIR = Path(__file__).parent / "presets"


def _opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, choices: tuple = (),
         group: str = "") -> Any:
    """A config field with its help text (shown by ``suder run --help``), its choices and its help group."""
    meta = {"help": help, "choices": choices, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _chunk_size(value: Any) -> int | str:
    """``rollout_chunk_size``: ``"auto"`` or a count >= 1 (a YAML or flag string of digits becomes an int)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"rollout_chunk_size must be 'auto' or a number of rows >= 1, got {value!r}.")


@dataclass
class DirectionConfig:
    """What one direction (``gen``: text-to-image, ``und``: captioning) sets for itself. ``None`` in ``algo``,
    ``batch_size``, ``group_size`` and ``reward_scorer``: the global setting of the same name."""

    algo: str | None = _opt(None, "the algorithm that trains this direction", choices=ALGOS)
    batch_size: int | None = _opt(None, "prompts (gen) or images (und) per micro-batch")
    group_size: int | None = _opt(None, "G, samples per prompt or image compared as a group")
    reward: str = _opt("dsr", "reward of this direction's samples (gen: dsr, und: dsr-consensus; `suder backbones`)")
    reward_scorer: str | None = _opt(
        None, "which model scores the rewards: policy (the model trained) or frozen (its initial copy)",
        choices=("policy", "frozen"),
    )
    loss_weight: float = _opt(1.0, "weight of this direction's loss in the unified step")
    simpo_pairs: str = _opt(
        "best-worst", "SimPO pairs of a group: best-worst (eq. 4), all ordered pairs, or best-likeliest",
        choices=SIMPO_PAIRS,
    )
    simpo_min_gap: float = _opt(0.0, "a pair's reward gap must exceed this; closer samples are ties, never a pair")


def _gen() -> DirectionConfig:
    return DirectionConfig(reward="dsr")


def _und() -> DirectionConfig:
    return DirectionConfig(reward="dsr-consensus")


DIRECTION_DEFAULTS = {"gen": _gen, "und": _und}
INHERITED = ("algo", "batch_size", "group_size", "reward_scorer")  # globals that decide both directions


@dataclass
class TrainConfig:
    """All settings of a run (see the module docstring); ``resolve`` builds one from its layers."""

    backbone: str = _opt("toy", "registered backbone (`suder backbones` lists them)", group="what to train")
    model: str | None = _opt(None, "checkpoint to start from (default: the backbone's ShapesWorld base)",
                             group="what to train")
    backbone_options: dict[str, Any] = _opt(help="options of the backbone's factory, as YAML: '{lora: true}'",
                                            factory=dict, group="what to train")
    rebuild_base: bool = _opt(False, "ShapesWorld default: pre-train its base here (cached) instead of the shipped one",
                              group="what to train")
    strategy: str = _opt("unified", "unified (one model, both directions), gen, und, or separate (two models)",
                         choices=STRATEGIES, group="what to train")
    algo: str = _opt("simpo", "the algorithm of both directions unless gen.algo / und.algo say otherwise",
                     choices=ALGOS, group="what to train")
    prompts: str | None = _opt(None, "text file of prompts, one a line (default on ShapesWorld: its prompts)",
                               group="data")
    images: str | None = _opt(None, "folder of images to caption (default on ShapesWorld: its scenes)", group="data")
    output_dir: str = _opt("runs/suder", "the run folder (alias --out)", group="data")
    steps: int | None = _opt(None, "training steps (default: from epochs)", group="length and batch")
    epochs: float | None = _opt(5.0, "passes over the prompts and images when steps is not set",
                                group="length and batch")
    batch_size: int = _opt(8, "prompts or images per micro-batch in both directions (see gen./und.batch-size)",
                           group="length and batch")
    group_size: int = _opt(8, "G, samples per input in both directions (see gen./und.group-size)",
                           group="length and batch")
    grad_accum: int = _opt(2, "micro-batches per optimizer step", group="length and batch")
    lr: float = _opt(3e-6, "learning rate (AdamW)", group="optimiser")
    lr_schedule: str = _opt("cosine", "cosine decay after warm-up, or constant", choices=("cosine", "constant"),
                            group="optimiser")
    warmup_steps: int = _opt(5, "linear warm-up steps", group="optimiser")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="optimiser")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm", group="optimiser")
    simpo_beta: float = _opt(2.0, "SimPO beta (eq. 4)", group="SimPO")
    simpo_gamma: float = _opt(0.5, "SimPO target margin gamma (eq. 4)", group="SimPO")
    simpo_kl_beta: float = _opt(0.0, "weight of a KL term to the reference model", group="SimPO")
    simpo_nll_weight: float = _opt(0.0, "lambda of a likelihood term on the chosen samples (CPO's NLL term)",
                                   group="SimPO")
    grpo_eps_low: float = _opt(0.2, "GRPO lower clip epsilon (eqs. 5-7)", group="GRPO")
    grpo_eps_high: float = _opt(0.28, "GRPO upper clip epsilon", group="GRPO")
    grpo_beta: float = _opt(0.04, "GRPO KL beta", group="GRPO")
    grpo_iterations: int = _opt(1, "GRPO updates per rollout (mu)", group="GRPO")
    ratio_tolerance: float = _opt(1e-3, "tolerated |ratio - 1| of the first GRPO iteration", group="GRPO")
    reward_scorer: str | None = _opt("policy", "which model scores both directions: policy or frozen",
                                     choices=("policy", "frozen"), group="rewards")
    reward_reduction: str = _opt("mean", "mean or sum of token log-probs in the rewards", choices=("mean", "sum"),
                                 group="rewards")
    consensus_lambda: float = _opt(1.0, "weight of the consensus term of dsr-consensus", group="rewards")
    consensus_source: str = _opt("reference", "the model whose captions form the consensus",
                                 choices=("reference", "policy"), group="rewards")
    guidance_scale: float | None = _opt(None, "classifier-free guidance (default: the backbone's own)",
                                        group="sampling")
    cfg_policy: str = _opt("guided", "log-probs of the guided or the conditional distribution",
                           choices=("cond", "guided"), group="sampling")
    image_logp_options: dict[str, Any] = _opt(help="keyword arguments of logp_image_given_text, as YAML",
                                              factory=dict, group="sampling")
    image_temperature: float = _opt(1.0, "sampling temperature of images", group="sampling")
    text_temperature: float = _opt(1.0, "sampling temperature of captions", group="sampling")
    text_greedy_in_group: bool = _opt(False, "one of each image's G captions is its greedy caption",
                                      group="sampling")
    switch_every: int = _opt(50, "separate strategy: steps per phase before the two models swap roles",
                             group="sampling")
    mixed_precision: str = _opt("no", "no, bf16 or fp16", choices=("no", "bf16", "fp16"), group="engineering")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass", group="engineering")
    rollout_chunk_size: int | str = _opt("auto", "rows per sampling or no-grad log-prob call: auto (the whole "
                                         "group, or on a GPU what the memory plan fits; halved on out-of-memory) "
                                         "or N", group="engineering")
    seed: int = _opt(0, "random seed", group="engineering")
    report_to: list[str] = _opt(help="trackers besides metrics.jsonl, comma-separated: tensorboard, wandb, ...",
                                factory=list, group="logging and saving")
    sample_every: int = _opt(50, "steps between sample grids (0: off)", group="logging and saving")
    save_every: int = _opt(100, "steps between checkpoints (0: off)", group="logging and saving")
    save_total_limit: int = _opt(0, "checkpoints kept (0: all)", group="logging and saving")
    eval_every: int = _opt(0, "steps between held-out evaluations (0: off)", group="logging and saving")
    eval_num: int = _opt(400, "prompts and scenes of a held-out evaluation", group="logging and saving")
    early_stopping_patience: int = _opt(0, "evaluations without improvement before stopping (0: off)",
                                        group="logging and saving")
    early_stopping_num: int = _opt(64, "prompts and scenes of an early-stopping evaluation",
                                   group="logging and saving")
    heldout: float = _opt(0.0, "this fraction of --prompts and --images is never trained on; every eval_every "
                          "steps it scores the run without labels (docs/monitoring.md)", group="self-evaluation")
    heldout_prompts: str | None = _opt(None, "held-out prompts (a file like --prompts) instead of a fraction",
                                       group="self-evaluation")
    heldout_images: str | None = _opt(None, "held-out images (a folder like --images) instead of a fraction",
                                      group="self-evaluation")
    selfeval_num: int = _opt(64, "held-out prompts and images each self-evaluation scores (0: off)",
                             group="self-evaluation")
    select_final: str = _opt("last", "final/ holds the last weights, or the best self-evaluated ones (last/ beside)",
                             choices=SELECT_FINAL, group="self-evaluation")
    guard_drop: float | None = _opt(None, "act when the self-score falls this far below its best (base std units)",
                                    group="self-evaluation")
    guard_action: str = _opt("stop", "what guard_drop does: stop the run, or rollback to the best weights",
                             choices=GUARD_ACTIONS, group="self-evaluation")
    guard_lr_factor: float = _opt(0.5, "rollback multiplies the learning rate by this", group="self-evaluation")
    resume: bool | str = _opt(False, "continue from the last checkpoint (auto: if there is one)",
                              group="logging and saving")
    overwrite: bool = _opt(False, "replace a previous run in output_dir", group="logging and saving")
    push_to_hub: bool = _opt(False, "at the end, upload final/ and its model card to the Hub (hub_repo_id)",
                             group="logging and saving")
    hub_repo_id: str | None = _opt(None, "the Hub model repository push_to_hub uploads to: NAME or OWNER/NAME",
                                   group="logging and saving")
    hub_private: bool = _opt(False, "push_to_hub creates the repository private", group="logging and saving")
    gen: DirectionConfig = _opt(help="text-to-image settings", factory=_gen)
    und: DirectionConfig = _opt(help="captioning settings", factory=_und)

    def __post_init__(self) -> None:
        for d in DIRECTIONS:
            side = getattr(self, d)
            if isinstance(side, dict):
                check_keys({f"{d}.{k}": v for k, v in side.items()}, "keyword arguments")
                side = dataclasses.replace(DIRECTION_DEFAULTS[d](), **side)
                setattr(self, d, side)
            if not isinstance(side, DirectionConfig):
                raise ConfigError(f"{d} must be a mapping of {d}-direction settings, got {side!r}.")
        self._check_choice("strategy", STRATEGIES)
        self._check_choice("algo", ALGOS)
        if self.strategy == "separate":  # each model's rewards come from the other model: no scorer to choose
            given = [k for k in ("reward_scorer", "gen.reward_scorer", "und.reward_scorer") if self._get(k)]
            if given:
                raise ConfigError(
                    f"{given[0]} does not apply to strategy separate, where each model's rewards are scored by the "
                    "other model; leave it out."
                )
        else:
            self._check_choice("reward_scorer", ("policy", "frozen"))
        for d in DIRECTIONS:
            side = self.side(d)
            for key in INHERITED:
                if getattr(side, key) is None:
                    setattr(side, key, getattr(self, key))
            self._check_choice(f"{d}.algo", ALGOS)
            self._check_choice(f"{d}.simpo_pairs", SIMPO_PAIRS)
            if self.strategy != "separate":
                self._check_choice(f"{d}.reward_scorer", ("policy", "frozen"))
        self._check_choice("lr_schedule", ("cosine", "constant"))
        self._check_choice("reward_reduction", ("mean", "sum"))
        self._check_choice("consensus_source", ("reference", "policy"))
        self._check_choice("cfg_policy", ("cond", "guided"))
        self._check_choice("mixed_precision", ("no", "bf16", "fp16"))
        for key in ("backbone_options", "image_logp_options"):
            self._check_mapping(key)
        self.report_to = parse_report_to(self.report_to)
        check_installed(self.report_to)
        if self.push_to_hub and not self.hub_repo_id:
            raise ConfigError(
                "push_to_hub needs hub_repo_id, the repository to push to: pass --hub-repo-id OWNER/NAME, or leave "
                "push_to_hub off and push later with `suder push RUN --repo-id OWNER/NAME`."
            )
        self._check_numbers()
        self._check_selfeval()

    def _check_selfeval(self) -> None:
        """The held-out self-evaluation's settings (``suder.selfeval``)."""
        self._check_choice("select_final", SELECT_FINAL)
        self._check_choice("guard_action", GUARD_ACTIONS)
        if not (0 <= self.heldout < 1):
            raise ConfigError(f"heldout must be a fraction in [0, 1) of the prompts and images, got {self.heldout}.")
        if self.selfeval_num < 0:
            raise ConfigError(f"selfeval_num must be >= 0 (0 turns self-evaluation off), got {self.selfeval_num}.")
        if self.guard_drop is not None and not (self.guard_drop > 0 and math.isfinite(self.guard_drop)):
            raise ConfigError(f"guard_drop must be a positive number (or null: no guard), got {self.guard_drop}.")
        if not (0 < self.guard_lr_factor <= 1):
            raise ConfigError(f"guard_lr_factor must be in (0, 1], got {self.guard_lr_factor}.")
        given = [k for k in ("heldout_prompts", "heldout_images") if getattr(self, k)] + (["heldout"] * (
            self.heldout > 0))
        if given and self.shapes_world:
            raise ConfigError(
                f"{given[0]} applies to your own --prompts and --images; ShapesWorld holds out its own prompts and "
                "scenes: leave it out."
            )
        on = bool(self.eval_every and self.selfeval_num)
        wants = [k for k, v in (("select_final best", self.select_final == "best"),
                                ("guard_drop", self.guard_drop is not None)) if v]
        if wants and not on:
            raise ConfigError(
                f"{wants[0]} needs the held-out self-evaluation: set eval_every > 0 (and selfeval_num > 0)."
            )
        if on and not self.shapes_world:
            missing = [what for d, what, own in (("gen", "prompts", "heldout_prompts"), ("und", "images",
                       "heldout_images")) if d in self.directions and not (self.heldout > 0 or getattr(self, own))]
            if missing:
                raise ConfigError(
                    f"eval_every on your own data scores a held-out slice of the {missing[0]}: pass --heldout 0.05 "
                    f"(a fraction), --heldout-{missing[0]} with held-out {missing[0]}, or --selfeval-num 0 to "
                    "turn self-evaluation off."
                )

    def _check_numbers(self) -> None:
        counts = ("batch_size", "gen.batch_size", "und.batch_size", "grad_accum", "grpo_iterations", "switch_every")
        for key in counts:
            if int(self._get(key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {self._get(key)}.")
        for key in ("group_size", "gen.group_size", "und.group_size"):
            if int(self._get(key)) < 2:
                raise ConfigError(f"{key} must be >= 2 to compare samples within a group, got {self._get(key)}.")
        if not (self.lr and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}.")
        if self.steps is None and self.epochs is None:
            raise ConfigError("Set steps or epochs (how long to train).")
        self.rollout_chunk_size = _chunk_size(self.rollout_chunk_size)
        if self.resume not in (True, False, "auto"):
            raise ConfigError(f"resume must be true, false or 'auto', got {self.resume!r}.")
        for key in ("save_total_limit", "save_every", "sample_every", "eval_every", "early_stopping_patience"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {getattr(self, key)}.")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1 (training steps to run), got {self.steps}.")
        for key in ("gen.simpo_min_gap", "und.simpo_min_gap"):
            if not (self._get(key) >= 0 and math.isfinite(self._get(key))):
                raise ConfigError(f"{key} must be a number >= 0 (a reward gap), got {self._get(key)}.")
        if not 0 <= self.grpo_eps_low < 1 or self.grpo_eps_high < 0:
            raise ConfigError("grpo_eps_low must be in [0, 1) and grpo_eps_high >= 0.")
        if self.grpo_iterations != 1 and any(self.algo_for(d) == "simpo" for d in self.directions):
            raise ConfigError(
                "grpo_iterations applies when every trained direction uses grpo; SimPO takes one step per rollout."
            )
        if not self.shapes_world and self.backbone != "toy" and self.strategy != "und" and self.prompts is None:
            raise ConfigError(
                f"The {self.backbone} backbone needs --prompts FILE (one prompt per line) to train 'gen'."
                + self._base_hint
            )
        if not self.shapes_world and self.backbone != "toy" and self.strategy != "gen" and self.images is None:
            raise ConfigError(
                f"The {self.backbone} backbone needs --images DIR (a folder of images) to train 'und'.{self._base_hint}"
            )

    def _get(self, key: str) -> Any:
        """A value by dotted key: ``lr``, ``gen.group_size``."""
        section, _, name = key.rpartition(".")
        return getattr(getattr(self, section) if section else self, name)

    @property
    def _base_hint(self) -> str:
        from .pretrain import shapes_recipe

        if self.model is None or shapes_recipe(self.backbone) is None:
            return ""
        return (
            f" (--model {self.model} is not a ShapesWorld base written by `suder pretrain`; leave --model out to run "
            "the embedded ShapesWorld default)"
        )

    def _check_mapping(self, key: str) -> None:
        """A mapping of option names; YAML reads ``{lora:true}`` (no space after the colon) as the single key
        'lora:true' with no value, which a backbone would silently ignore."""
        value = getattr(self, key)
        flag = f"--{key.replace('_', '-')}"
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping such as \"{{lora: true}}\", got {value!r} ({flag}).")
        for name, option in value.items():
            if option is None and ":" in str(name):
                fixed = str(name).replace(":", ": ", 1)
                raise ConfigError(
                    f"{key}: '{name}' reads as one key with no value; put a space after the colon: \"{{{fixed}}}\"."
                )

    def _check_choice(self, key: str, options: tuple[str, ...]) -> None:
        value = self._get(key)
        if value not in options:
            hint = closest(str(value), options)
            extra = f" Did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"{key} must be one of {', '.join(options)}; got '{value}'.{extra}")

    @property
    def shapes_world(self) -> bool:
        """Trained and judged on ShapesWorld: no --prompts and no --images, on the toy or on a backbone with a
        ShapesWorld recipe (``suder.pretrain``), whose base is the model when --model is not given. A --model of
        another backbone is a ShapesWorld base only when ``suder pretrain`` (or a run from such a base) marked it;
        a released checkpoint needs data."""
        return is_shapes_world(self.backbone, self.model, self.prompts, self.images)

    def side(self, direction: str) -> DirectionConfig:
        """The settings of ``direction`` ("gen" or "und")."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'gen' or 'und', got {direction!r}")
        return getattr(self, direction)

    def __getitem__(self, direction: str) -> DirectionConfig:
        return self.side(direction)

    def algo_for(self, direction: str) -> str:
        """The algorithm that trains ``direction``."""
        return self.side(direction).algo or self.algo

    @property
    def directions(self) -> tuple[str, ...]:
        return {"unified": ("gen", "und"), "separate": ("gen", "und"), "gen": ("gen",), "und": ("und",)}[self.strategy]

    def to_dict(self) -> dict[str, Any]:
        """The settings, sections nested (``{"gen": {"group_size": 16, ...}, ...}``)."""
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """The settings with dotted keys (``gen.group_size``)."""
        return {key: self._get(key) for key in KEYS}


def is_shapes_world(backbone: str, model: str | None, prompts: str | None, images: str | None) -> bool:
    """See ``TrainConfig.shapes_world``."""
    if prompts is not None or images is not None:
        return False
    if backbone == "toy":
        return True
    from .pretrain import is_shapes_base, shapes_recipe

    if model is not None and not is_shapes_base(model):
        return False
    return shapes_recipe(backbone) is not None


# ------------------------------------------------------------------------------------------- keys and types
_TOP = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in DIRECTIONS}
_SIDE = {f.name: f for f in dataclasses.fields(DirectionConfig)}
FIELDS: dict[str, dataclasses.Field] = {**_TOP, **{f"{d}.{k}": f for d in DIRECTIONS for k, f in _SIDE.items()}}
KEYS = tuple(FIELDS)  # dotted: "lr", "gen.group_size"
_HINTS = {**typing.get_type_hints(TrainConfig), **{f"side.{k}": t for k, t in typing.get_type_hints(
    DirectionConfig).items()}}
LEGACY: dict[str, str] = {f"{d}_{k}": f"{d}.{k}" for d in DIRECTIONS for k in (
    "algo", "batch_size", "group_size", "reward", "reward_scorer", "loss_weight")}
LEGACY.update({f"simpo_{d}_{k}": f"{d}.simpo_{k}" for d in DIRECTIONS for k in ("pairs", "min_gap")})


def field_type(key: str) -> Any:
    """The annotated type of a dotted key."""
    section, _, name = key.rpartition(".")
    return _HINTS[f"side.{name}" if section else name]


def canonical(key: str, source: str) -> str:
    """A key as written (``group-size``, ``gen_group_size``, ``gen.group-size``) -> its dotted name; unknown keys
    are a one-line ``ConfigError`` with the closest key."""
    name = str(key).replace("-", "_")
    name = LEGACY.get(name, name)
    if name not in FIELDS:
        hint = closest(name, [*KEYS, *LEGACY])
        extra = f" Did you mean '{hint}'?" if hint else ""
        raise ConfigError(f"Unknown config key '{key}' in {source}.{extra}")
    return name


def flatten(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``{"lr": .., "gen": {"group_size": ..}, "und_algo": ..}`` -> dotted keys (``gen.group_size``, ``und.algo``),
    every value coerced to its field's type."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in DIRECTIONS:
            if isinstance(value, DirectionConfig):
                value = dataclasses.asdict(value)
            if not isinstance(value, dict):
                raise ConfigError(f"{name} in {source} must be a mapping of {name}-direction settings, got {value!r}.")
            for sub, v in value.items():
                dotted = canonical(f"{name}.{str(sub).replace('-', '_')}", source)
                out[dotted] = coerce(dotted, v, source)
            continue
        dotted = canonical(name, source)
        out[dotted] = coerce(dotted, value, source)
    return out


def check_keys(values: dict[str, Any], source: str) -> None:
    """Unknown keys are errors that name the closest valid key."""
    for key in values:
        if str(key).replace("-", "_") not in DIRECTIONS:
            canonical(key, source)


def coerce(key: str, value: Any, source: str = "config") -> Any:
    """``value`` as ``key``'s type, or a one-line ``ConfigError`` naming the key."""
    kind = field_type(key)
    args = typing.get_args(kind)
    optional = type(None) in args
    if value is None:
        if optional or key in ("report_to",):
            return None
        raise ConfigError(f"{key} in {source} cannot be empty (null); give a value or leave the key out.")
    base = next((a for a in args if a is not type(None)), kind) if args and typing.get_origin(kind) is not dict \
        and typing.get_origin(kind) is not list else kind
    if key in ("resume", "rollout_chunk_size"):
        if isinstance(value, str) and value.lower() == "auto":
            return "auto"
        base = bool if key == "resume" else int
    try:
        return _as(base, value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", None) or str(base).replace("typing.", "")
        shown = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(name, name)
        if key in ("backbone_options", "image_logp_options"):
            shown = "a mapping such as \"{lora: true}\""
        extra = " or 'auto'" if key in ("resume", "rollout_chunk_size") else ""
        raise ConfigError(f"{key} in {source} must be {shown}{extra}, got {value!r}.") from None


def _as(base: Any, value: Any) -> Any:
    import yaml

    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ValueError(value)
    if base is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            return int(float(text)) if text.replace(".", "", 1).isdigit() and float(text).is_integer() else int(text)
        if isinstance(value, int):
            return value
        raise TypeError(value)
    if base is float:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise TypeError(value)
    if base is str:
        if isinstance(value, (dict, list, bool)):
            raise TypeError(value)
        return str(value)
    if origin is dict or base is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise TypeError(value)
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise TypeError(value)
    return value


# ------------------------------------------------------------------------------------------- layers
def default_layer() -> dict[str, Any]:
    """The dataclass defaults, dotted; a direction's inherited fields are left to their global."""
    top = {k: (f.default_factory() if f.default is dataclasses.MISSING else f.default) for k, f in _TOP.items()}
    for d in DIRECTIONS:
        side = dataclasses.asdict(DIRECTION_DEFAULTS[d]())
        top.update({f"{d}.{k}": v for k, v in side.items() if k not in INHERITED})
    return top


def preset_name(backbone: str, model: str | None, prompts: str | None, images: str | None) -> str | None:
    """The preset of a run: ``toy`` for the toy backbone, the recipe's on a ShapesWorld run, else None."""
    if backbone == "toy":
        return "toy"
    if not is_shapes_world(backbone, model, prompts, images):
        return None
    from .pretrain import shapes_recipe

    return getattr(shapes_recipe(backbone), "preset", None)


def load_preset(name: str) -> dict[str, Any]:
    """A preset file (``suder/presets/NAME.yaml``, or a path to a YAML file), dotted and coerced."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{name}.yaml"
    return flatten(_read_yaml(str(path), "preset"), f"preset {path.name}")


def _read_yaml(path: str, what: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{what.capitalize()} file '{path}' does not exist.") from exc
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{what.capitalize()} file '{path}' is not valid YAML: {reason}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what.capitalize()} file '{path}' must hold a mapping of keys to values.")
    return data


def load_yaml(path: str) -> dict[str, Any]:
    """A ``--config`` file as the config layer (dotted, coerced). A saved ``config.yaml`` keeps only the values a
    user set: those its ``sources:`` says came from the defaults or a preset are left to those layers."""
    data = _read_yaml(path, "config")
    sources = data.pop("sources", None) or {}
    data.pop("history", None)
    data.pop("preset", None)
    values = flatten(data, path)
    if sources:  # a saved run: how that command treated its folder is not a setting to carry over
        values = {k: v for k, v in values.items() if k not in ("resume", "overwrite")}
    return {k: v for k, v in values.items() if sources.get(k, "config") in USER_LAYERS}


def resolve(yaml_path: str | None = None, flags: dict[str, Any] | None = None, **kwargs: Any) -> TrainConfig:
    """default < preset < ``yaml_path`` < ``flags`` < keywords (a flag or keyword of None is not given), validated;
    the result's ``sources`` says which layer set each value (module docstring)."""
    layers: dict[str, dict[str, Any]] = {
        "config": load_yaml(yaml_path) if yaml_path else {},
        "flags": {k: v for k, v in flatten(flags or {}, "command-line flags").items() if v is not None},
        "keywords": {k: v for k, v in flatten(kwargs, "keyword arguments").items() if v is not None},
    }
    return resolve_layers(layers)


def resolve_layers(user: dict[str, dict[str, Any]]) -> TrainConfig:
    """The pure core of ``resolve``: the user layers (config, flags, keywords; dotted keys) -> a ``TrainConfig``."""
    merged = {k: v for name in USER_LAYERS for k, v in user.get(name, {}).items()}
    if isinstance(merged.get("backbone"), str):
        from .registry import get_backbone_spec

        get_backbone_spec(merged["backbone"])  # an unknown name is the first thing to hear about
    layers = {"default": default_layer(), "preset": {}, **{n: user.get(n, {}) for n in USER_LAYERS}}
    look = {**layers["default"], **merged}
    preset = preset_name(look["backbone"], look["model"], look["prompts"], look["images"])
    if preset:
        layers["preset"] = load_preset(preset)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in LAYERS:
        for key, value in layers[name].items():
            values[key], sources[key] = value, name
    for d in DIRECTIONS:  # a global decides a direction unless a same-or-later layer sets the direction's own
        for key in INHERITED:
            own = f"{d}.{key}"
            if own not in sources or LAYERS.index(sources[key]) > LAYERS.index(sources[own]):
                values[own], sources[own] = values[key], sources[key]
    if values["strategy"] == "separate":  # the other model scores: defaults' and presets' scorers are dropped
        for key in ("reward_scorer", "gen.reward_scorer", "und.reward_scorer"):
            if sources[key] not in USER_LAYERS or values[key] is None:
                values[key] = None
    nested: dict[str, Any] = {d: {} for d in DIRECTIONS}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (nested[section] if section else nested)[name] = value
    try:
        cfg = TrainConfig(**nested)
    except TypeError as exc:  # wrong value types that dataclasses cannot catch
        raise ConfigError(str(exc)) from exc
    cfg.sources = {k: sources[k] for k in KEYS}
    cfg.preset = preset
    return cfg


def parse_value(key: str, raw: str) -> Any:
    """A command-line string as the field's type (``--lr 1e-5``, ``--resume true``)."""
    name = str(key).replace("-", "_")
    if LEGACY.get(name, name) not in FIELDS:
        hint = closest(name, KEYS)
        extra = f" Did you mean '--{hint.replace('_', '-')}'?" if hint else ""
        raise ConfigError(f"Unknown option '--{key.replace('_', '-')}'.{extra}")
    name = LEGACY.get(name, name)
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(field_type(name)):
        return None
    return coerce(name, raw, f"--{key.replace('_', '-')}")
