"""``suder run``'s options, generated from ``TrainConfig``'s fields with tyro: every setting with its help text and
default, grouped, booleans as bare flags, the ``gen``/``und`` sections as ``--gen.group-size``; and the parse of a
command line into the flags layer of ``suder.config.resolve`` (the keys the user gave, nothing else)."""

from __future__ import annotations

from typing import Any

RUN_GROUPS = {  # help group of TrainConfig's fields (their ``group`` metadata) -> the group's name in --help
    "what to train": "model", "data": "data", "length and batch": "length", "optimiser": "optimiser",
    "SimPO": "simpo", "GRPO": "grpo", "rewards": "rewards", "sampling": "sampling", "engineering": "engineering",
    "logging and saving": "logging", "self-evaluation": "selfeval",
}
RUN_DESCRIPTION = (
    "Self-improve a unified multimodal model with dual self-rewards; no options: the embedded ShapesWorld default. "
    "Every setting is an option. The defaults shown are the paper's; the toy backbone and the ShapesWorld runs of "
    "show-o and janus-pro start from a preset over them (suder/presets/). Precedence: defaults < preset < --config "
    "YAML < these flags; --algo, --group-size, --batch-size and --reward-scorer set both directions unless "
    "--gen.* / --und.* say otherwise (docs/configuration.md)."
)
MAPPINGS = ("backbone_options", "image_logp_options")
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _metavar(key: str, f) -> str:
    from .config import field_type

    if f.metadata.get("choices"):
        return "{" + ",".join(f.metadata["choices"]) + "}"
    if key in MAPPINGS:
        return "YAML"
    if key == "resume":
        return "[auto]"
    if key == "rollout_chunk_size":
        return "{auto,N}"
    if key in ("model", "prompts", "images", "output_dir"):
        return "PATH"
    kind = field_type(key)
    text = str(kind)
    for name in ("float", "int", "list"):
        if name in text:
            return {"list": "NAME[,NAME]"}.get(name, name.upper())
    return "STR"


def _shown_default(key: str, f) -> str:
    import dataclasses

    from .config import INHERITED

    section, _, name = key.rpartition(".")
    if section and name in INHERITED:
        return f"(default: {name})"
    if section:
        from .config import DIRECTION_DEFAULTS

        value = getattr(DIRECTION_DEFAULTS[section](), name)
    else:
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if "(default" in f.metadata["help"]:  # the help says it
        return ""
    if value is None or value == {} or value == []:
        return "(default: none)"
    return f"(default: {str(value).lower() if isinstance(value, bool) else value})"


def run_options() -> tuple[type, dict[str, tuple[str, bool]]]:
    """The ``tyro`` spec of ``suder run``, generated from ``TrainConfig``'s fields: a group per help group (no
    prefix: ``--lr``), the ``gen``/``und`` sections (``--gen.group-size``); every field is parsed as text and
    coerced by ``suder.config.coerce`` (one-line errors naming the key), booleans are flags (``--x``/``--no-x``).
    Also returns the option names: ``--name`` -> (dotted key, takes a value)."""
    import dataclasses
    from typing import Annotated, Optional

    import tyro

    from .config import DIRECTIONS, FIELDS

    groups: dict[str, list] = {}
    names: dict[str, tuple[str, bool]] = {"--config": ("config", True)}
    for key, f in FIELDS.items():
        section, _, name = key.rpartition(".")
        group = section or RUN_GROUPS[f.metadata["group"]]
        option = "--" + key.replace("_", "-")
        is_flag = f.type in ("bool", bool)
        if is_flag:
            spec = Annotated[bool, tyro.conf.arg(help=f.metadata["help"])]
            default = bool(f.default) if not section else False
            names[option], names["--no-" + option[2:]] = (key, False), (key, False)
        else:
            aliases = ("--out",) if key == "output_dir" else None
            hint = _shown_default(key, f)
            spec = Annotated[Optional[str], tyro.conf.arg(  # noqa: UP045 (tyro reads the typing form)
                help=f.metadata["help"], metavar=_metavar(key, f), help_behavior_hint=hint, aliases=aliases
            )]
            default = None
            names[option] = (key, True)
            if aliases:
                names["--out"] = (key, True)
        groups.setdefault(group, []).append((name, spec, dataclasses.field(default=default)))
    fields = [("config", Annotated[Optional[str], tyro.conf.arg(  # noqa: UP045
        help="YAML file of settings, e.g. a run's config.yaml (flags override it)", metavar="FILE")],
        dataclasses.field(default=None))]
    helps = {"gen": "text-to-image (gen) settings", "und": "captioning (und) settings"}
    for group, members in groups.items():
        cls = dataclasses.make_dataclass(group, members)
        marks = () if group in DIRECTIONS else (tyro.conf.OmitArgPrefixes,)
        spec = Annotated[(cls, *marks, tyro.conf.arg(help=helps.get(group, "")))]
        fields.append((group, spec, dataclasses.field(default_factory=cls)))
    return dataclasses.make_dataclass("suder_run", fields), names


def _option_error(option: str, names: dict) -> None:
    from .config import LEGACY
    from .errors import ConfigError, closest

    known = [n for n in names if not n.startswith("--no-")] + [f"--{k.replace('_', '-')}" for k in LEGACY]
    hint = closest(option, known)
    extra = f" Did you mean '{hint}'?" if hint else ""
    raise ConfigError(f"Unknown option '{option}' of suder run.{extra} (`suder run --help` lists them)")


def normalize_run_argv(argv: list[str], names: dict[str, tuple[str, bool]]) -> tuple[list[str], list[str]]:
    """``argv`` with every option in its canonical ``--name=value`` form (legacy ``--gen-group-size`` ->
    ``--gen.group-size``, ``--out`` -> ``--output-dir``, bare ``--resume`` -> ``--resume=true``, ``--bf16`` ->
    ``--mixed-precision=bf16``), and the dotted keys given. Every malformed option is a one-line ``ConfigError``,
    before the parser sees it."""
    from .config import LEGACY
    from .errors import ConfigError

    out: list[str] = []
    given: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            out.append(token)
            continue
        if not token.startswith("--"):
            raise ConfigError(f"Unexpected argument '{token}'; options look like --key value (`suder run --help`).")
        option, eq, raw = token.partition("=")
        if option in ("--bf16", "--fp16"):
            option, eq, raw = "--mixed-precision", "=", option[2:]
        legacy = LEGACY.get(option[2:].replace("-", "_"))
        if legacy:
            option = "--" + legacy.replace("_", "-")
        if option == "--out":
            option = "--output-dir"
        if option not in names:
            _option_error(option, names)
        key, takes_value = names[option]
        if not takes_value:
            word = raw if eq else (argv[i] if i < len(argv) else "")
            if word.lower() in BOOL_WORDS:  # the earlier `--flag true` form
                i += 0 if eq else 1
                on = BOOL_WORDS[word.lower()] != option.startswith("--no-")
                option = f"--{'' if on else 'no-'}{option[5:] if option.startswith('--no-') else option[2:]}"
            elif eq:
                raise ConfigError(f"{option} is a flag: write {option} or --no-{option[2:]}, not {option}={raw}.")
            out.append(option)
        else:
            if not eq:
                if i < len(argv) and not argv[i].startswith("--"):
                    raw, i = argv[i], i + 1
                elif option == "--resume":
                    raw = "true"
                else:
                    raise ConfigError(f"Option '{option}' needs a value.")
            if key in MAPPINGS and raw.count("{") > raw.count("}"):
                rest = argv[i] if i < len(argv) else ""
                raise ConfigError(
                    f"{option} got '{raw}' and '{rest}' as separate words: quote the mapping, as in "
                    f"{option} '{raw} {rest}'." if rest else f"{option} '{raw}' is not a closed mapping."
                )
            out.append(f"{option}={raw}")
        given.append(key)
    return out, given


def parse_run(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``suder run``'s command line -> (``--config`` file, the flags given as {dotted key: value})."""
    import tyro

    spec, names = run_options()
    argv, given = normalize_run_argv(argv, names)
    parsed = tyro.cli(spec, args=argv, prog="suder run", description=RUN_DESCRIPTION)
    flags: dict[str, Any] = {}
    config_file = parsed.config
    for key in given:
        if key == "config":
            continue
        section, _, name = key.rpartition(".")
        owner = getattr(parsed, section) if section else getattr(parsed, _group_of(key))
        flags[key] = getattr(owner, name)
    return config_file, flags


def _group_of(key: str) -> str:
    from .config import FIELDS

    return RUN_GROUPS[FIELDS[key].metadata["group"]]
