"""Model cards and the Hugging Face Hub: every ``final/`` (and each checkpoint's ``model/``) gets a ``README.md`` in
the Hub's format, and ``suder push`` / the ``push_to_hub`` setting upload it with ``huggingface_hub``.

The card is built from what the run folder records, never from the live trainer, so ``suder push`` can write one
for a run of an earlier version too:

- metadata (``huggingface_hub.ModelCardData``): ``base_model`` when ``--model`` was a Hub id (the embedded ShapesWorld
  bases and local folders are on no Hub, so no ``base_model`` key: the text says what the base was), ``license``
  from the base's own card when it is on this machine (the Hub cache or the local folder; nothing is fetched, and
  when none is found the card says so instead of guessing), ``library_name``, ``pipeline_tag``, ``tags``;
- the method (algorithm per direction, rewards, strategy, steps, data), the command that made it, rebuilt from
  ``config.yaml``'s ``sources:`` (only the settings a user set, as flags), the before/after judge table of
  ``run.json`` on ShapesWorld, a sample grid (``samples.png``, from the run's ``samples/``), how to load it, and
  the framework versions, as TRL's cards list them.

Pushing is ``HfApi.create_repo(exist_ok=True)`` then ``HfApi.upload_folder``, the calls TRL's and transformers'
``push_to_hub`` make.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import INHERITED, USER_LAYERS
from .errors import DataError, HubError

CARD = "README.md"
GRID = "samples.png"
LIBRARY = {"janus-pro": "transformers"}  # backbones whose saved folder loads with a library the Hub knows
NOT_FLAGS = ("resume", "overwrite")  # how that command treated its folder, not what the model is
DIRECTION_NAMES = {"gen": "text-to-image", "und": "captioning"}
SAMPLE = re.compile(r"step-(\d+)-(gen|und)\.png")


@dataclass
class RunRecord:
    """What a run folder says about its model: the settings (dotted keys), the layer that set each, the resume
    history, the preset, ``run.json`` (empty until the run ends) and the base's scores."""

    folder: Path
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    preset: str | None = None
    run: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)

    @property
    def directions(self) -> tuple[str, ...]:
        strategy = self.values.get("strategy", "unified")
        return ("gen",) if strategy == "gen" else ("und",) if strategy == "und" else ("gen", "und")

    @property
    def shapes_world(self) -> bool:
        """Judged on ShapesWorld: the run recorded a before table, or was given no data (a resumed or running
        run may not have one yet)."""
        return bool(self.before) or (self.values.get("prompts") is None and self.values.get("images") is None)


def read_run(run_dir: str | Path) -> RunRecord:
    """The record of a ``suder run`` folder; a one-line ``DataError`` when it holds no ``config.yaml``."""
    import yaml

    folder = Path(run_dir)
    path = folder / "config.yaml"
    if not path.is_file():
        raise DataError(f"'{folder}' is not a suder run folder (no config.yaml); pass the --output-dir of a suder run.")
    data = yaml.safe_load(path.read_text()) or {}
    sources = dict(data.pop("sources", None) or {})
    history = list(data.pop("history", None) or [])
    preset = data.pop("preset", None)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in DIRECTION_NAMES and isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    run = _json(folder / "run.json")
    before = run.get("before") or _json(folder / "before.json")
    return RunRecord(folder, values, sources, history, preset, run, before)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------- the command
def command(record: RunRecord) -> str:
    """``suder run`` with the settings a user set (config file, flags or keywords), as flags: the command that
    made the run (a setting from a ``--config`` file or ``suder.train`` keyword is written as its flag). A
    direction's copy of a global (``gen.algo`` set by ``--algo``) is left to the global."""
    parts = ["suder", "run"]
    src, values = record.sources, record.values
    for key, layer in src.items():
        if layer not in USER_LAYERS or key in NOT_FLAGS or key not in values:
            continue
        section, _, name = key.rpartition(".")
        if section and name in INHERITED and src.get(name) == layer and values.get(name) == values[key]:
            continue
        option = "--" + key.replace("_", "-")
        value = values[key]
        if isinstance(value, bool):
            parts.append(option if value else f"--no-{option[2:]}")
            continue
        parts += [option, shlex.quote(_as_text(value))]
    return " ".join(parts)


def _as_text(value: Any) -> str:
    import yaml

    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value)


def _wrapped(cmd: str, width: int = 100) -> str:
    """``cmd`` over several shell lines (``\\`` continuations), each option with its value."""
    words = shlex.split(cmd)
    pieces, i = [], 0
    while i < len(words):
        piece = [words[i]]
        if words[i].startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
            piece.append(words[i + 1])
            i += 1
        i += 1
        pieces.append(" ".join(shlex.quote(w) for w in piece))
    lines, line = [], ""
    for piece in pieces:
        if line and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = "    " + piece
        else:
            line = f"{line} {piece}" if line else piece
    return " \\\n".join([*lines, line])


# ---------------------------------------------------------------------------------------------- the base model
@dataclass
class Base:
    """The model a run started from: ``hub_id`` for the metadata's ``base_model`` (None when it is on no Hub),
    ``license`` fields from its card when found on this machine, and a sentence for the card."""

    hub_id: str | None
    license: dict[str, str]
    text: str


def base_of(record: RunRecord) -> Base:
    """Where the run's model came from (``--model``: a Hub id, a local folder, or none for the embedded base)."""
    model = record.values.get("model")
    backbone = record.values.get("backbone", "toy")
    if model is None:
        return Base(None, {}, (
            f"suder's embedded ShapesWorld base of the `{backbone}` backbone, pre-trained from random weights by "
            "`suder pretrain` on ShapesWorld; it is on no Hub, so this card names no `base_model`"
        ))
    if Path(model).exists():
        return Base(None, _card_license(Path(model) / CARD), f"the local checkpoint `{model}`")
    if _is_repo_id(model):
        return Base(model, _cached_license(model), f"[{model}](https://huggingface.co/{model})")
    return Base(None, {}, f"`{model}`")


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached_license(repo_id: str) -> dict[str, str]:
    """The license of a Hub model's card if the card is in the local Hub cache (never fetched)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, CARD)
    return _card_license(Path(path)) if isinstance(path, str) else {}


def _card_license(path: Path) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link`` for "other") of a model card file; empty if unreadable."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return {}
    try:
        data = ModelCard.load(path).data
    except Exception:  # a card we cannot parse tells us no license; the card then says it found none
        return {}
    found = {k: getattr(data, k, None) for k in ("license", "license_name", "license_link")}
    return {k: str(v) for k, v in found.items() if v}


# ---------------------------------------------------------------------------------------------- the card
def model_card(run_dir: str | Path, step: int | None = None, repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard`` of a run's final model, or of its checkpoint at ``step`` (lighter: no
    after-table); ``repo_id`` fills the loading example (else ``REPO_ID``)."""
    from huggingface_hub import ModelCard, ModelCardData

    record = read_run(run_dir)
    base = base_of(record)
    backbone = record.values.get("backbone", "toy")
    algos = sorted({record.values.get(f"{d}.algo") or record.values.get("algo", "simpo") for d in record.directions})
    tags = ["suder", "dual-self-rewards", *algos, backbone]
    tags += ["shapes-world"] if record.shapes_world else []
    tags += [{"gen": "text-to-image", "und": "image-to-text"}[d] for d in record.directions]
    name = repo_id.rpartition("/")[2] if repo_id else Path(run_dir).resolve().name
    data = ModelCardData(
        model_name=name,
        base_model=base.hub_id,
        library_name=LIBRARY.get(backbone, "suder"),
        pipeline_tag="any-to-any",
        tags=tags,
        **base.license,
    )
    sections = [
        _intro(record, base, step, name),
        _method(record, step),
        _command_section(record),
        _judge_section(record) if step is None else _heldout_section(record, step),
        _samples_section(record, step),
        _usage_section(backbone, repo_id, record.values.get("strategy") == "separate"),
        _versions_section(),
    ]
    body = "\n\n".join(s for s in sections if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _intro(record: RunRecord, base: Base, step: int | None, name: str) -> str:
    backbone = record.values.get("backbone", "toy")
    what = "final model" if step is None else f"checkpoint at step {step}"
    lines = [
        f"# Model Card for {name}",
        "",
        f"This is the {what} of a suder run: a `{backbone}` unified "
        f"multimodal model, started from {base.text}, trained with dual self-rewards (each direction rewarded by "
        "the model's own likelihood of the other) on unlabelled, unpaired data.",
    ]
    chosen = (record.run.get("selfeval") or {}) if step is None else {}
    if chosen and chosen.get("final_step") != chosen.get("last_step"):
        lines += ["", f"These are the weights of step {chosen['final_step']} of {chosen['last_step']}, the best "
                  "held-out self-score of the run (`select_final: best`: the frozen base's likelihood of the "
                  "model's samples for held-out prompts and images, no labels); the sample grid below is the "
                  "last one drawn at or before that step."]
    if base.license:
        lines += ["", f"License: `{base.license['license']}`, from the base model's card."]
    elif record.values.get("model") is None:
        lines += ["", "License: none stated; the base was pre-trained by suder itself, so no base card carries one."]
    else:
        lines += ["", "License: not stated; the base model's card was not found on the machine that wrote this card "
                  "(suder does not fetch it), so set `license` in the metadata above before sharing."]
    return "\n".join(lines)


def _method(record: RunRecord, step: int | None) -> str:
    v = record.values
    lines = ["## Method", ""]
    for d in record.directions:
        algo = (v.get(f"{d}.algo") or v.get("algo", "simpo")).upper().replace("SIMPO", "SimPO")
        lines.append(f"- {DIRECTION_NAMES[d]} ({d}): online {algo}, reward `{v.get(f'{d}.reward')}`, group size "
                     f"{v.get(f'{d}.group_size')}")
    lines.append(f"- strategy: `{v.get('strategy', 'unified')}`; learning rate {v.get('lr')}")
    if record.shapes_world:
        lines.append("- data: ShapesWorld's prompts and scenes (a tiny world of shapes with an exact judge)")
    else:
        data = [f"prompts `{v['prompts']}`" if v.get("prompts") else "", f"images `{v['images']}`" if v.get(
            "images") else ""]
        lines.append("- data: " + ", ".join(d for d in data if d))
    if step is None and record.run:
        stopped = " (stopped early: the held-out score stopped improving)" if record.run.get("stopped_early") else ""
        lines.append(f"- steps: {record.run.get('steps')}{stopped}")
    for h in record.history:
        changed = ", ".join(f"{k} {c.get('from')} -> {c.get('to')}" for k, c in (h.get("changed") or {}).items())
        lines.append(f"- resumed from {h.get('resumed_from')} with {changed}")
    return "\n".join(lines)


def _command_section(record: RunRecord) -> str:
    preset = f"\n\nSettings not given here: the `{record.preset}` preset's, else the defaults." if (
        record.preset) else ""
    return f"## The command that made it\n\n```bash\n{_wrapped(command(record))}\n```{preset}"


def _judge_section(record: RunRecord) -> str:
    """The before/after table of ``run.json`` (judge accuracy %, ShapesWorld), as the CLI prints it."""
    from .report import JUDGE_COLUMNS, judge_rows

    before, after = record.run.get("before") or record.before, record.run.get("after") or {}
    if not before or not after:
        return ""
    head = "| | " + " | ".join(name for _, _, name in JUDGE_COLUMNS) + " |"
    rows = [head, "|---" * (len(JUDGE_COLUMNS) + 1) + "|"]
    for label, res in judge_rows(before, after):
        cells = [_pct((res or {}).get(g, {}).get(k)) for g, k, _ in JUDGE_COLUMNS]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    change = []
    for g, k, _ in JUDGE_COLUMNS:
        b, a = before.get(g, {}).get(k), after.get(g, {}).get(k)
        change.append("-" if a is None or b is None else f"{100 * (a - b):+.1f}")
    rows.append("| change | " + " | ".join(change) + " |")
    return "## ShapesWorld judge accuracy (%), before and after\n\n" + "\n".join(rows)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _heldout_section(record: RunRecord, step: int) -> str:
    """A checkpoint's last held-out scores (``eval_every``), if any were logged by its step."""
    last: dict[str, Any] = {}
    path = record.folder / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step and any(k.startswith("heldout/") for k in row):
            last = row
    if not last:
        return ""
    scores = ", ".join(f"{k[8:]} {_pct(v)}%" for k, v in last.items() if k.startswith("heldout/"))
    return f"## Held-out judge accuracy\n\nAt step {last['step']}: {scores}."


def _samples_section(record: RunRecord, step: int | None) -> str:
    found = _latest_samples(record.folder, step)
    if not found:
        return ""
    at, paths = found
    shown = " and ".join({"gen": "prompts with the images drawn for them", "und": "images with their sampled "
                          "captions and rewards"}[d] for d in paths)
    return f"## Samples\n\n![Samples at step {at}]({GRID})\n\nAt training step {at}: {shown}."


def _usage_section(backbone: str, repo_id: str | None, separate: bool) -> str:
    """How to load it; the separate strategy trained two models, saved in gen/ and und/."""
    download = f'snapshot_download("{repo_id or "REPO_ID"}")'
    if separate:
        load = (f'folder = {download}\ndrawer = suder.load_backbone("{backbone}", model=f"{{folder}}/gen")  '
                f'# text-to-image\ncaptioner = suder.load_backbone("{backbone}", model=f"{{folder}}/und")  '
                '# captioning\nimages = drawer')
    else:
        load = f'model = suder.load_backbone("{backbone}", model={download})\nimages = model'
    return (
        "## Use it\n\n```python\nfrom huggingface_hub import snapshot_download\n\nimport suder\n\n"
        f'{load}.sample_image(["a red circle above a blue square"], num_samples=4).images\n```'
    )


def _versions_section() -> str:
    from importlib.metadata import PackageNotFoundError, version

    lines = ["### Framework versions", ""]
    for name in ("suder", "torch", "transformers", "accelerate", "huggingface_hub"):
        try:
            lines.append(f"- {name}: {version(name)}")
        except PackageNotFoundError:
            continue
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the sample grid
def _latest_samples(run_dir: Path, upto: int | None) -> tuple[int, dict[str, Path]] | None:
    """The last step (at most ``upto``) with sample grids in ``samples/``, and its grid per direction."""
    steps: dict[int, dict[str, Path]] = {}
    folder = run_dir / "samples"
    for path in sorted(folder.glob("step-*.png")) if folder.is_dir() else []:
        m = SAMPLE.fullmatch(path.name)
        if m and (upto is None or int(m.group(1)) <= upto):
            steps.setdefault(int(m.group(1)), {})[m.group(2)] = path
    if not steps:
        return None
    last = max(steps)
    return last, dict(sorted(steps[last].items()))


def sample_grid(run_dir: str | Path, upto: int | None = None):
    """The run's last sample grids (at most step ``upto``), text-to-image above captioning, as one image; None
    when the run drew none (``sample_every 0``, or no sample step yet)."""
    found = _latest_samples(Path(run_dir), upto)
    if not found:
        return None
    from diffusers.utils import make_image_grid  # imported only when there are grids to join (seconds)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in found[1].values()]
    w, h = max(im.width for im in images), max(im.height for im in images)
    padded = []
    for im in images:  # make_image_grid pastes equal cells: pad each grid to the largest
        cell = Image.new("RGB", (w, h), (40, 40, 40))
        cell.paste(im, (0, 0))
        padded.append(cell)
    return make_image_grid(padded, rows=len(padded), cols=1)


def write_card(run_dir: str | Path, folder: str | Path, step: int | None = None, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` (the run's card; ``step``: a checkpoint's) and ``folder/samples.png`` when the
    run drew samples; each written under a temporary name and renamed into place."""
    folder = Path(folder)
    card = model_card(run_dir, step=step, repo_id=repo_id)
    held = step
    if step is None:  # select_final best: final/ holds an earlier step's weights; show that step's samples
        chosen = _json(Path(run_dir) / "run.json").get("selfeval") or {}
        held = chosen["final_step"] if chosen.get("final_step") != chosen.get("last_step") else None
    grid = sample_grid(run_dir, held)
    if grid is not None:
        tmp = folder / f".{GRID}.tmp.png"
        grid.save(tmp)
        os.replace(tmp, folder / GRID)
    tmp = folder / f".{CARD}.tmp"
    card.save(tmp)
    os.replace(tmp, folder / CARD)
    return folder / CARD


# ---------------------------------------------------------------------------------------------- pushing
def check_push(repo_id: str | None, token: str | None = None) -> None:
    """What a push needs before any work: a valid repo id, the network allowed, a token; one-line errors."""
    from huggingface_hub import constants, get_token

    if not repo_id or not _is_repo_id(repo_id):
        raise HubError(
            f"'{repo_id}' is not a Hub repository id; give one as NAME or OWNER/NAME (letters, digits, '-', '_', '.')."
        )
    if constants.is_offline_mode():
        raise HubError("Cannot push to the Hub while HF_HUB_OFFLINE is set; unset it, or push later with suder push.")
    if not (token or get_token()):
        raise HubError("No Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token.")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing; ``revision``: a branch, created
    from main if missing) and return the commit's URL. Hub errors become a one-line ``HubError``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_push(repo_id, token)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private or None, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {Path(folder).name} with suder",
            ignore_patterns=["*.tmp", ".*"],
        )
    except HfHubHTTPError as exc:
        reason = " ".join(str(exc).split("\n")[0].split())
        raise HubError(
            f"Pushing '{folder}' to '{repo_id}' failed ({reason}); check the repository id and that your token may "
            "write to it (`hf auth login` or --token)."
        ) from None
    return str(getattr(info, "commit_url", info))


def model_folder(run_dir: str | Path, checkpoint: str | None = None) -> tuple[Path, int | None]:
    """The folder ``suder push`` uploads: ``final/``, or ``checkpoints/step-N/model`` (``checkpoint``: ``step-N``
    or ``N``), with the checkpoint's step; a one-line ``DataError`` listing what the run has."""
    run = Path(run_dir)
    read_run(run)
    if checkpoint is None:
        if not (run / "final").is_dir():
            raise DataError(f"'{run}' has no final/ model yet; wait for the run to end, or pass --checkpoint "
                            f"step-N ({_available(run)}).")
        return run / "final", None
    m = re.fullmatch(r"(?:step-)?(\d+)", str(checkpoint))
    folder = run / "checkpoints" / f"step-{int(m.group(1)):06d}" / "model" if m else None
    if folder is None or not (folder.parent / "step.json").is_file():
        raise DataError(f"'{run}' has no checkpoint '{checkpoint}'; {_available(run)}.")
    return folder, int(m.group(1))


def _available(run: Path) -> str:
    found = sorted(p.name for p in (run / "checkpoints").glob("step-*") if (p / "step.json").is_file())
    return f"its checkpoints: {', '.join(found)}" if found else "it has no complete checkpoint"


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    checkpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """``suder push``: upload a run's ``final/`` (or a checkpoint's model) with its card, and return the commit's
    URL. A folder without a card gets one; a card suder wrote and nobody edited since is rewritten to name
    ``repo_id`` in its loading example; an edited card is uploaded as it is."""
    folder, step = model_folder(run_dir, checkpoint)
    check_push(repo_id, token)
    card = folder / CARD
    written = {None, read_run(run_dir).values.get("hub_repo_id")}  # the repo ids a card of this run may name
    if not card.is_file() or card.read_text() in {str(model_card(run_dir, step, r)) for r in written}:
        write_card(run_dir, folder, step=step, repo_id=repo_id)
    if commit_message is None:
        what = "final model" if step is None else f"checkpoint at step {step}"
        commit_message = f"suder: {what} of {Path(run_dir).resolve().name}"
    return push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                       token=token)
