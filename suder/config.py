"""``TrainConfig``: every setting of a DSR run, validated on construction.

Precedence: YAML file < command-line flags < keyword arguments of ``suder.train`` (a keyword counts only when the
caller passed it). Unknown keys are errors
with the closest valid key suggested. The resolved config is written beside each run as ``config.yaml``.

Defaults follow the paper's appendix A.1 (lr 3e-6 with cosine decay and 5 warm-up steps, G = 8, SimPO
beta 2.0 / gamma 0.5, GRPO clip 0.2 / 0.28 and KL beta 0.04, grad-accum 2) for real backbones. The ``toy``
backbone gets its own, tuned defaults (``TOY_DEFAULTS``): a 1M-parameter model needs lr 3e-5 (1e-4 collapses,
our prototype), a constant learning rate (cosine decay to 0 over 200 steps halved the T2I gain: +6 instead of
+11 points), no guidance (CFG 1, the scale it is evaluated with), and 300 steps of 8 prompts and 8 images (200
steps reached the T2I target but only +1.8 points of greedy captions; 300 gave +12.5 and +5.5).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, closest
from .tracking import check_installed, parse_report_to

ALGOS = ("simpo", "grpo")
STRATEGIES = ("unified", "gen", "und", "separate")
SIMPO_PAIRS = ("best-worst", "all", "best-likeliest")

PAPER_DEFAULTS: dict[str, Any] = {
    "lr": 3e-6,
    "grad_accum": 2,
    "gen_batch_size": 8,
    "und_batch_size": 8,
    "guidance_scale": None,  # the backbone's own default (Janus-Pro: 5)
    "epochs": 5.0,
    "steps": None,
    "lr_schedule": "cosine",
    "reward_scorer": "policy",
    "simpo_gen_pairs": "best-worst",
    "simpo_und_pairs": "best-worst",
}
TOY_DEFAULTS: dict[str, Any] = {
    "lr": 3e-5,
    "grad_accum": 1,
    "gen_batch_size": 8,
    "und_batch_size": 8,
    "guidance_scale": 1.0,
    "epochs": None,
    "steps": 300,
    "lr_schedule": "constant",
    "reward_scorer": "policy",
    "simpo_gen_pairs": "best-worst",
    "simpo_und_pairs": "best-worst",
}


@dataclass
class TrainConfig:
    """All settings of a run; ``None`` means "the backbone's default" (see the module docstring)."""

    # what to train
    backbone: str = "toy"
    model: str | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    algo: str = "simpo"
    gen_algo: str | None = None  # per direction; None: algo
    und_algo: str | None = None
    strategy: str = "unified"
    # data (unpaired); on the toy backbone, None means ShapesWorld prompts / scenes
    prompts: str | None = None
    images: str | None = None
    output_dir: str = "runs/suder"
    # length and batch
    steps: int | None = None
    epochs: float | None = None
    gen_batch_size: int | None = None
    und_batch_size: int | None = None
    group_size: int | None = None  # None: 8
    gen_group_size: int | None = None  # per direction; None: group_size (or a ShapesWorld recipe's default)
    und_group_size: int | None = None
    grad_accum: int | None = None
    # optimiser
    lr: float | None = None
    lr_schedule: str | None = None
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # SimPO (eq. 4)
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    simpo_kl_beta: float = 0.0
    simpo_nll_weight: float = 0.0  # lambda of a likelihood term on the chosen samples (CPO's NLL term)
    # "best-worst" (eq. 4), "all": every ordered pair (losses.ordered_pairs), or "best-likeliest": the best against
    # the likeliest sample it beats (losses.best_likeliest)
    simpo_gen_pairs: str | None = None
    simpo_und_pairs: str | None = None
    # a pair's reward gap must exceed this (in the direction's reward units): closer samples are ties, never a pair
    simpo_gen_min_gap: float = 0.0
    simpo_und_min_gap: float = 0.0
    # GRPO (eqs. 5-7)
    grpo_eps_low: float = 0.2
    grpo_eps_high: float = 0.28
    grpo_beta: float = 0.04
    grpo_iterations: int = 1
    ratio_tolerance: float = 1e-3
    # rewards
    gen_reward: str = "dsr"
    und_reward: str = "dsr-consensus"
    reward_reduction: str = "mean"
    reward_scorer: str | None = None  # "policy" (the model being trained scores) or "frozen" (its initial copy)
    gen_reward_scorer: str | None = None  # per direction; None: reward_scorer
    und_reward_scorer: str | None = None
    consensus_lambda: float = 1.0
    consensus_source: str = "reference"
    gen_loss_weight: float = 1.0
    und_loss_weight: float = 1.0
    # sampling
    guidance_scale: float | None = None
    cfg_policy: str = "guided"
    image_logp_options: dict[str, Any] = field(default_factory=dict)
    image_temperature: float = 1.0
    text_temperature: float = 1.0
    text_greedy_in_group: bool = False  # one of each image's G captions is its greedy caption
    # separate strategy: steps per phase before the two models swap roles
    switch_every: int = 50
    # engineering
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    report_to: list[str] = field(default_factory=list)  # trackers besides metrics.jsonl (tracking.py)
    sample_every: int = 50
    save_every: int = 100
    save_total_limit: int = 0
    eval_every: int = 0
    eval_num: int = 400
    early_stopping_patience: int = 0
    early_stopping_num: int = 64
    resume: bool | str = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        defaults = TOY_DEFAULTS if self.backbone == "toy" else PAPER_DEFAULTS
        if self.backbone != "toy" and self.shapes_world:  # a backbone's ShapesWorld default (suder.pretrain)
            from .pretrain import shapes_recipe

            defaults = {**TOY_DEFAULTS, **shapes_recipe(self.backbone).run_defaults}
        per_direction = ("gen_reward_scorer", "und_reward_scorer")
        given_scorer = self.reward_scorer is not None  # then it decides both directions a default leaves open
        scorers_set = [k for k in ("reward_scorer", *per_direction) if getattr(self, k) is not None]
        decided = per_direction if given_scorer else ()
        if self.group_size is not None:  # the same for G
            decided += ("gen_group_size", "und_group_size")
        for key, value in defaults.items():
            if getattr(self, key) is None and key not in decided:
                setattr(self, key, value)
        self._check_choice("algo", ALGOS)
        for key in ("gen_algo", "und_algo"):
            if getattr(self, key) is None:
                setattr(self, key, self.algo)
            self._check_choice(key, ALGOS)
        self._check_choice("strategy", STRATEGIES)
        self._check_choice("lr_schedule", ("cosine", "constant"))
        self._check_choice("reward_reduction", ("mean", "sum"))
        if self.strategy == "separate":  # each model's rewards come from the other model: no scorer to choose
            if scorers_set:
                raise ConfigError(
                    f"{scorers_set[0]} does not apply to strategy separate, where each model's rewards are scored "
                    "by the other model; leave it out."
                )
            self.reward_scorer = self.gen_reward_scorer = self.und_reward_scorer = None
        else:
            self._check_choice("reward_scorer", ("policy", "frozen"))
            for key in per_direction:
                if getattr(self, key) is None:
                    setattr(self, key, self.reward_scorer)
                self._check_choice(key, ("policy", "frozen"))
        self._check_choice("consensus_source", ("reference", "policy"))
        self._check_choice("cfg_policy", ("cond", "guided"))
        self._check_choice("simpo_gen_pairs", SIMPO_PAIRS)
        self._check_choice("simpo_und_pairs", SIMPO_PAIRS)
        self._check_choice("mixed_precision", ("no", "bf16", "fp16"))
        for key in ("backbone_options", "image_logp_options"):
            self._check_mapping(key)
        self.report_to = parse_report_to(self.report_to)
        check_installed(self.report_to)
        if self.group_size is None:
            self.group_size = 8
        for key in ("group_size", "gen_batch_size", "und_batch_size", "grad_accum", "grpo_iterations", "switch_every"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}.")
        for key in ("group_size", "gen_group_size", "und_group_size"):
            if getattr(self, key) is None:
                setattr(self, key, self.group_size)
            if int(getattr(self, key)) < 2:
                raise ConfigError(f"{key} must be >= 2 to compare samples within a group, got {getattr(self, key)}.")
        if not (self.lr and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}.")
        if self.steps is None and self.epochs is None:
            raise ConfigError("Set steps or epochs (how long to train).")
        if self.resume not in (True, False, "auto"):
            raise ConfigError(f"resume must be true, false or 'auto', got {self.resume!r}.")
        for key in ("save_total_limit", "save_every", "sample_every", "eval_every", "early_stopping_patience"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {getattr(self, key)}.")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1 (training steps to run), got {self.steps}.")
        for key in ("simpo_gen_min_gap", "simpo_und_min_gap"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                raise ConfigError(f"{key} must be a number >= 0 (a reward gap), got {getattr(self, key)}.")
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
        value = getattr(self, key)
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
        if self.prompts is not None or self.images is not None:
            return False
        if self.backbone == "toy":
            return True
        from .pretrain import is_shapes_base, shapes_recipe

        if self.model is not None and not is_shapes_base(self.model):
            return False
        return shapes_recipe(self.backbone) is not None

    def algo_for(self, direction: str) -> str:
        """The algorithm that trains ``direction``: ``gen_algo`` / ``und_algo``, which default to ``algo``."""
        return getattr(self, f"{direction}_algo") or self.algo

    @property
    def directions(self) -> tuple[str, ...]:
        return {"unified": ("gen", "und"), "separate": ("gen", "und"), "gen": ("gen",), "und": ("und",)}[self.strategy]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# global fields and the per-direction fields that default to them
INHERITED = {"algo": ("gen_algo", "und_algo"), "reward_scorer": ("gen_reward_scorer", "und_reward_scorer")}


def check_keys(values: dict[str, Any], source: str) -> None:
    """Unknown keys are errors that name the closest valid key."""
    for key in values:
        if key not in FIELDS:
            hint = closest(key, FIELDS)
            extra = f" Did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"Unknown config key '{key}' in {source}.{extra}")


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file '{path}' does not exist.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys to values.")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    check_keys(data, path)
    return data


def resolve(yaml_path: str | None = None, flags: dict[str, Any] | None = None, **kwargs: Any) -> TrainConfig:
    """YAML < flags < keywords, validated."""
    merged: dict[str, Any] = {}
    if yaml_path:
        merged.update(load_yaml(yaml_path))
        later = {k: v for values in (flags or {}, kwargs) for k, v in values.items() if v is not None}
        # a saved config.yaml holds every per-direction value resolved: those that merely copy their global one
        # follow a global given later (`--config run/config.yaml --algo grpo` trains both directions with GRPO)
        for glob, per_direction in INHERITED.items():
            if glob in later and glob in merged:
                for key in per_direction:
                    if key not in later and key in merged and merged[key] == merged[glob]:
                        del merged[key]
    for source, values in (("command-line flags", flags or {}), ("keyword arguments", kwargs)):
        check_keys(values, source)
        merged.update({k: v for k, v in values.items() if v is not None})
    if isinstance(merged.get("backbone"), str):
        from .registry import get_backbone_spec

        get_backbone_spec(merged["backbone"])  # an unknown name is the first thing to hear about
    try:
        return TrainConfig(**merged)
    except TypeError as exc:  # wrong value types that dataclasses cannot catch
        raise ConfigError(str(exc)) from exc


def parse_value(key: str, raw: str) -> Any:
    """Convert a command-line string to the field's type (``--lr 1e-5``, ``--resume true``)."""
    import yaml

    if key not in FIELDS:
        hint = closest(key, FIELDS)
        extra = f" Did you mean '--{hint.replace('_', '-')}'?" if hint else ""
        raise ConfigError(f"Unknown option '--{key.replace('_', '-')}'.{extra}")
    kind = str(FIELDS[key].type)
    try:
        if raw.lower() in ("none", "null"):
            return None
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("int"):
            return int(raw)
        if key == "resume" and raw.lower() == "auto":
            return "auto"
        if kind.startswith("bool"):
            value = yaml.safe_load(raw)
            if not isinstance(value, bool):
                raise ValueError(raw)
            return value
        if kind.startswith("str"):
            return raw
        return yaml.safe_load(raw)
    except ValueError as exc:
        raise ConfigError(f"--{key.replace('_', '-')} expects {kind.split(' ')[0]}, got '{raw}'.") from exc
