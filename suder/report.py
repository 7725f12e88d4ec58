"""``suder report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page of a run, or of several runs compared.

The page needs no network when viewed: CSS is inline, images are base64 ``data:`` URIs and the curves are inline
SVG drawn here (a few dozen lines instead of making matplotlib a runtime dependency; SVG also keeps the page small
and sharp at any zoom). It reads what the run folder holds (see ``suder.outputs``):

* ``config.yaml``: every field; bold ones were set by the user (a config file, flags or keywords: the layer that
  ``sources:`` records), the rest came from the defaults or the preset;
* ``run.json``: the judged before/after table (toy backbone on ShapesWorld) and the run's summary;
* ``metrics.jsonl``: one chart per metric, grouped by prefix (``gen/``, ``und/``, ``heldout/``, ``selfeval/`` and
  ``drift/`` (``suder.selfeval``, ``suder.monitors``), ``time/``, the rest under "train"); an overview first with
  rewards, judge accuracy, losses, KL, the learning rate and the self-score. Tick values are round (1, 2 or 5
  times a power of ten). How a metric is drawn:

  - constant (one value over the whole run, every run): one line of text, no chart;
  - a step function (``is_step_metric``: the learning rate and counts, by name, or any metric that takes few
    distinct values, at most 8 and at most one per 4 points): drawn as steps, each value held until the next
    logged step, unsmoothed;
  - otherwise the raw values faintly and an exponential moving average on top (TensorBoard's, weight 0.6);
* ``samples/step-N-{gen,und}.png`` with ``.json``: the sample images, each beside its prompt or captions and
  reward as HTML text (at most ``max_grids`` steps, evenly spaced, always the first and the last). A run written
  before the ``.json`` records existed shows its grid images as they are.

Several runs: the curves overlaid (one colour per run, the legend at the top), the judge tables side by side, the
settings that differ between the runs, and each run's last samples.

A torn last line of a run in progress is skipped; a step logged twice (resume) keeps its last line.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import json
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import DataError

GROUP_ORDER = ("gen", "und", "heldout", "selfeval", "drift", "train", "time")
FIRST = ("reward_mean", "judge_acc", "loss", "kl", "simpo/accuracy", "simpo/margin", "grpo/kl", "lr", "grad_norm")
JUDGE_COLUMNS = [
    ("t2i", "single", "T2I single"),
    ("t2i", "pair", "pair"),
    ("t2i", "count", "count"),
    ("t2i", "relation", "relation"),
    ("t2i", "overall", "T2I all"),
    ("caption", "overall", "caption T=1"),
    ("caption_greedy", "overall", "caption greedy"),
]
COLOURS = ("#0b57d0", "#d93025", "#188038", "#e37400", "#9334e6", "#00838f", "#6d4c41", "#5f6368")
DASHES = ("", "6 4", "2 3", "8 3 2 3")  # stepped lines of the 2nd, 3rd, ... run: runs with the same lr stay visible
# counts and the learning rate: drawn as steps (the last name part, or "num_..."); see ``is_step_metric``
STEP_NAMES = re.compile(r"(^|/)(lr|learning_rate|num_\w+)$|(^|[/_])(pairs|tokens|groups|skipped|count|decisive)(_|$)")
NAV = {"judge": "Judged accuracy", "overview": "Overview", "samples": "Samples", "metrics": "All metrics",
       "config": "Config"}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1320px;
padding:16px 24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px;color:#444}.muted{color:#777}code{font-size:13px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #e3e3e3;padding:3px 8px;text-align:right}
th{background:#f1f1f4}td:first-child,th:first-child{text-align:left}.up{color:#137333}.down{color:#b3261e}
.cfg{columns:3 300px;column-gap:24px}.cfg div{break-inside:avoid;display:flex;justify-content:space-between;
border-bottom:1px dotted #ddd;padding:1px 0}b.user{color:#0b57d0}.cfg div>span:last-child{font-family:ui-monospace,
monospace;margin-left:12px;text-align:right;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:10px}.chart{background:#fff;border:1px solid #e3e3e3;border-radius:6px;
padding:4px}.chart svg{display:block}.const{margin:6px 0 0;color:#444}.const>span{margin-right:18px;
white-space:nowrap}.side{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.side table{font-size:13px}.side td,.side th{padding:2px 5px}.legend span{margin-right:16px;white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;
margin-right:5px;vertical-align:-1px}summary{cursor:pointer;font-weight:600;margin:8px 0}
.step{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin-bottom:10px}
.samples td,.samples th{vertical-align:top;text-align:left}
.samples img{image-rendering:pixelated;display:block;max-width:128px}
.samples td.prompt{width:190px}.imgs{display:flex;gap:4px}figure{margin:0;text-align:center}
figcaption,.caps td{font:12px/1.3 ui-monospace,monospace}.caps td{border:0;padding:0 6px 0 0}
img.grid{max-width:100%}.caps td.r{text-align:right}.best{font-weight:700}.ok{color:#137333}.bad{color:#b3261e}
"""


# ------------------------------------------------------------------------------------------- reading
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` as a list ordered by step; torn or foreign lines are skipped, a repeated step keeps
    its last line."""
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def group_of(key: str) -> str:
    head = key.split("/", 1)[0] if "/" in key else "train"
    return head if head in GROUP_ORDER else "train"


def metric_groups(metrics: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{group: {metric: [(step, value), ...]}}`` over the numeric, finite values."""
    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rec in metrics:
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                groups.setdefault(group_of(key), {}).setdefault(key, []).append((rec["step"], float(value)))
    return _ordered(groups)


def _ordered(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    return {
        g: dict(sorted(groups[g].items(), key=lambda kv: _rank(kv[0])))
        for g in sorted(groups, key=lambda g: order.get(g, len(order)))
    }


def _rank(key: str) -> tuple[int, str]:
    name = key.split("/", 1)[1] if "/" in key and key.split("/", 1)[0] in GROUP_ORDER else key
    hits = [i for i, f in enumerate(FIRST) if name == f or name.startswith(f)]
    return (hits[0] if hits else len(FIRST), key)


def overview_keys(groups: dict[str, dict[str, Any]]) -> list[str]:
    """Rewards, judge accuracy, losses, KL and learning rate: the curves a run is judged by."""
    keys = [k for g in groups.values() for k in g]
    wanted = [r"/reward_mean$", r"/judge_acc$", r"(^|/)loss$", r"(^|/)kl(/mean)?$", r"^lr$", r"^heldout/",
              r"^selfeval/score$", r"^selfeval/(gen|und)_frozen$"]
    return [k for pattern in wanted for k in keys if re.search(pattern, k)]


def sample_grids(folder: Path, max_grids: int) -> tuple[list[int], dict[tuple[int, str], Path], int]:
    """Steps shown (evenly spaced, first and last kept), their grid files, and how many steps there are."""
    found: dict[tuple[int, str], Path] = {}
    for f in folder.glob("step-*-*.png") if folder.is_dir() else ():
        m = re.fullmatch(r"step-(\d+)-(gen|und)\.png", f.name)
        if m:
            found[(int(m.group(1)), m.group(2))] = f
    steps = sorted({s for s, _ in found})
    if len(steps) > max_grids > 1:
        picks = {round(i * (len(steps) - 1) / (max_grids - 1)) for i in range(max_grids)}
        shown = [steps[i] for i in sorted(picks)]
    else:
        shown = steps
    return shown, found, len(steps)


@dataclasses.dataclass
class Run:
    """What a run folder holds, read once."""

    folder: Path
    name: str
    run: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    colour: str = COLOURS[0]

    @functools.cached_property
    def groups(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        return metric_groups(self.metrics)


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    import yaml

    d = Path(run_dir)
    if not d.is_dir():
        raise DataError(f"Run folder '{d}' does not exist; pass the --output-dir of a `suder run`.")
    run = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else {}
    metrics = read_metrics(d / "metrics.jsonl")
    if not (run or config or metrics):
        raise DataError(f"'{d}' holds no run (no config.yaml, metrics.jsonl or run.json); pass a `suder run` folder.")
    return Run(d, name or d.resolve().name, run, config or {}, metrics)


def run_names(folders: list[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (``a/run`` and ``b/run`` where the names collide)."""
    parts = [Path(f).resolve().parts for f in folders]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i + 1})" for i, n in enumerate(names)]  # the same folder twice


# ------------------------------------------------------------------------------------------- numbers
def nice_ticks(lo: float, hi: float, n: int = 5, loose: bool = True, integer: bool = False) -> tuple[list, float]:
    """About ``n`` round tick values over ``[lo, hi]``, and their spacing: of 1, 2 and 5 times a power of ten
    (whole numbers where ``integer``) the one nearest to ``n - 1`` even parts. ``loose``: the ticks enclose the
    range (the axis then runs from the first to the last); otherwise they lie inside it."""
    if not hi > lo:
        lo, hi = lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda c: abs(math.log(c / raw)))  # nearest, log scale
    if integer:
        step = max(1, round(step))
    if loose:  # a value on a tick (within rounding) is not widened by a whole step
        a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    else:
        a, b = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    digits = max(0, -math.floor(math.log10(step))) + 1
    return [round(i * step, digits) for i in range(a, b + 1)], step


def fmt_ticks(ticks: list[float], step: float) -> list[str]:
    """Tick labels with the digits their spacing needs, alike along an axis: ``0.25``, ``20k``, ``4e-6`` (not
    ``4.0e-06``)."""
    top = max(abs(t) for t in ticks)
    if step < 1e-3:
        def sci(v: float) -> str:
            digits = max(0, math.floor(math.log10(abs(v))) - math.floor(math.log10(step) + 1e-9))
            return _compact_exp(f"{v:.{digits}e}")

        return ["0" if abs(t) < step * 1e-6 else sci(t) for t in ticks]
    unit, suffix = next(((u, s) for u, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= 10 * u), (1, ""))
    decimals = max(0, -math.floor(math.log10(step / unit) + 1e-9))
    return [("0" if abs(t) < step * 1e-6 else f"{t / unit:.{decimals}f}{suffix}") for t in ticks]


def fmt_value(v: float) -> str:
    """A measured value in 4 significant digits, exponents without padding: ``-2.911``, ``4.8e-6``, ``120``."""
    return _compact_exp(f"{v:.4g}")


def _compact_exp(text: str) -> str:
    if "e" not in text:
        return text
    mantissa, exp = text.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def is_step_metric(key: str, values: Iterable[float]) -> bool:
    """Drawn as steps, unsmoothed: the learning rate and counts by name (``STEP_NAMES``: ``lr``, ``num_*``,
    ``*pairs``, ``*tokens``, ``groups*``, ``*skipped``, ``*count``, ``*decisive``), or a metric that takes few
    distinct values (at most 8, and at most one per 4 logged points: it holds a value, it does not wander)."""
    if STEP_NAMES.search(key):
        return True
    seen: set[float] = set()
    count = 0
    for v in values:  # stops at the 9th distinct value: a long noisy series is not read to its end
        seen.add(v)
        count += 1
        if len(seen) > 8:
            return False
    return len(seen) * 4 <= count


# ------------------------------------------------------------------------------------------- drawing
def ema(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: ``s_t = w * s_(t-1) + (1 - w) * x_t``, debiased as TensorBoard does."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def _thin(points: list[tuple[int, float]], smooth: list[float], most: int = 1200):
    """Every k-th point (and the last) to keep pages small; the smoothed line was computed over all of them."""
    if len(points) <= most:
        return points, smooth
    k = math.ceil(len(points) / most)
    idx = list(range(0, len(points), k)) + ([len(points) - 1] if (len(points) - 1) % k else [])
    return [points[i] for i in idx], [smooth[i] for i in idx]


def svg_chart(title: str, series: list[tuple[str, str, list[tuple[int, float]]]], stepped: bool = False,
              width: int = 290, height: int = 170) -> str:
    """A line chart as an inline ``<svg>`` of ``series``: ``(run name, colour, [(step, value), ...])`` each.
    ``stepped``: each value held until the next point, unsmoothed; otherwise raw values faint, smoothed solid."""
    left, right, top, bottom = 46, 10, 20, 22
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    yticks, ystep = nice_ticks(min(ys), max(ys), 5)
    y0, y1 = yticks[0], yticks[-1]
    x0, x1 = min(xs), max(xs)
    xticks, xstep = nice_ticks(x0, x1, 5, loose=False, integer=True) if x1 > x0 else ([x0], 1)
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (w * (x - x0) / (x1 - x0) if x1 > x0 else w / 2)

    def sy(y: float) -> float:
        return top + h * (1 - (y - y0) / (y1 - y0))

    kind = "steps" if stepped else "smoothed"
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" data-metric="{html.escape(title)}" data-kind="{kind}">',
        f'<text x="4" y="13" font-size="12" font-weight="600">{html.escape(title)}</text>',
    ]
    for yv, label in zip(yticks, fmt_ticks(yticks, ystep)):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 3.5:.1f}" font-size="10" text-anchor="end" fill="#666" '
                     f'class="ytick">{label}</text>')
    for xv, label in zip(xticks, fmt_ticks(xticks, xstep)):
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - 6}" font-size="10" text-anchor="middle" fill="#666" '
                     f'class="xtick">{label}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>')
    for i, (name, colour, points) in enumerate(series):
        smooth = points if stepped else list(zip([x for x, _ in points], ema([v for _, v in points])))
        points, smooth = _thin(points, smooth)
        run = f' data-run="{html.escape(name)}"'
        if len(points) == 1:
            x, y = points[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"{run}/>')
            continue
        if stepped:
            corners = [points[0]] + [q for a, b in zip(points, points[1:]) for q in ((b[0], a[1]), b)]
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in corners)
            dash = f' stroke-dasharray="{DASHES[i % len(DASHES)]}"' if i else ""  # identical lines stay visible
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}{run}/>')
            continue
        raw = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{raw}" fill="none" stroke="{colour}" stroke-opacity="0.25"{run}/>')
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in smooth)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.6"{run}/>')
    if len(series) == 1:
        x, y = series[0][2][-1]
        parts.append(f'<text x="{left + w}" y="13" font-size="10" text-anchor="end" fill="#666">'
                     f"last {fmt_value(y)} @ {x}</text>")
    parts.append("</svg>")
    return "".join(parts)


def metric_block(key: str, series: list[tuple[str, str, list[tuple[int, float]]]]) -> tuple[str, str]:
    """``("chart", svg)`` or, for a metric with one value over all runs and steps, ``("const", text)``."""
    first = series[0][2][0][1]
    if all(v == first for _, _, pts in series for _, v in pts):
        lo, hi = min(pts[0][0] for _, _, pts in series), max(pts[-1][0] for _, _, pts in series)
        n = sum(len(pts) for _, _, pts in series)
        where = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        return "const", (f'<span data-metric="{html.escape(key)}">{html.escape(key)} = <b>{fmt_value(first)}'
                         f"</b> <span class=muted>({'constant, ' if n > 1 else ''}{where})</span></span>")
    stepped = all(is_step_metric(key, (v for _, v in pts)) for _, _, pts in series)
    return "chart", f'<div class="chart">{svg_chart(key, series, stepped)}</div>'


def charts_html(keys: list[str], runs: list[Run], grouped: dict[str, dict[str, Any]]) -> str:
    blocks = {"chart": [], "const": []}
    for key in keys:
        series = [(r.name, r.colour, grouped[r.name][key]) for r in runs if key in grouped[r.name]]
        kind, part = metric_block(key, series)
        blocks[kind].append(part)
    const = f'<p class="const">{"".join(blocks["const"])}</p>' if blocks["const"] else ""
    return f'<div class="charts">{"".join(blocks["chart"])}</div>{const}'


# ------------------------------------------------------------------------------------------- sections
def _data_uri(path_or_image: Any) -> str:
    if isinstance(path_or_image, Path):
        data = path_or_image.read_bytes()
    else:
        buf = io.BytesIO()
        path_or_image.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def judge_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The judged rows of a run: before, the base at its own guidance scale where the run trained at another
    (``before["base_guidance"]``, T2I only; ``Trainer.evaluate``), after."""
    rows = [("before", before), ("after", after)]
    own = (before or {}).get("base_guidance")
    if own:
        rows.insert(1, (f"base g={own['guidance_scale']:g}", own))
    return rows


def judge_table(before: dict[str, Any], after: dict[str, Any], corner: str = "judge accuracy (%)") -> str:
    """Judge accuracy (%) before and after, with the change."""
    head = "".join(f"<th>{html.escape(name)}</th>" for _, _, name in JUDGE_COLUMNS)
    rows = []
    for label, res in judge_rows(before, after):
        cells = []
        for group, key, _ in JUDGE_COLUMNS:
            v = (res or {}).get(group, {}).get(key)
            cells.append(f"<td>{'-' if v is None else f'{100 * v:.1f}'}</td>")
        rows.append(f"<tr><td>{label}</td>{''.join(cells)}</tr>")
    cells = []
    for group, key, _ in JUDGE_COLUMNS:
        b, a = (before or {}).get(group, {}).get(key), (after or {}).get(group, {}).get(key)
        if a is None or b is None:
            cells.append("<td>-</td>")
        else:
            d = 100 * (a - b)
            cells.append(f'<td class="{"up" if d > 0 else "down" if d < 0 else ""}">{d:+.1f}</td>')
    rows.append(f"<tr><td>change</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>{corner}</th>{head}</tr>{''.join(rows)}</table>"


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The settings with dotted keys (``gen.group_size``), without ``sources``, ``history`` and ``preset``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("gen", "und") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key not in ("sources", "history", "preset"):
            flat[key] = value
    return flat


def user_set(config: dict[str, Any]) -> set[str]:
    """The keys the user set (a config file, flags or keywords: ``sources:``). A config.yaml written before
    ``sources:`` existed: the keys that differ from the default."""
    from .config import FIELDS, USER_LAYERS

    sources = config.get("sources")
    flat = flat_config(config)
    if sources:
        return {k for k in flat if sources.get(k) in USER_LAYERS}
    changed = set()
    for key, value in flat.items():
        f = FIELDS.get(key)
        if f is not None:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                changed.add(key)
    return changed


def _setting(key: str, value: Any, config: dict[str, Any], bold: bool) -> tuple[str, str]:
    layer = (config.get("sources") or {}).get(key)
    tip = f' title="set by: {html.escape(layer)}"' if layer else ""
    name = f'<b class="user"{tip}>{html.escape(key)}</b>' if bold else f"<span{tip}>{html.escape(key)}</span>"
    return name, html.escape(json.dumps(value) if isinstance(value, (dict, list)) else str(value))


def config_section(config: dict[str, Any]) -> str:
    mine = user_set(config)
    items = []
    for key, value in flat_config(config).items():
        name, shown = _setting(key, value, config, key in mine)
        items.append(f'<div data-key="{html.escape(key)}"><span>{name}</span><span>{shown}</span></div>')
    return f'<div class="cfg">{"".join(items)}</div>'


def config_diff(runs: list[Run]) -> str:
    """The settings whose values differ between the runs, one column per run (bold: set by that run's user)."""
    flats = [flat_config(r.config) for r in runs]
    keys = [k for k in dict.fromkeys(k for f in flats for k in f) if k != "output_dir"]
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    if not differ:
        return "<p>The runs have the same settings (apart from their output folders).</p>"
    head = "".join(f'<th style="color:{r.colour}">{html.escape(r.name)}</th>' for r in runs)
    rows = []
    for key in differ:
        cells = []
        for r, f in zip(runs, flats):
            value = html.escape(str(f.get(key, "-")))
            cells.append(f"<td><b class=user>{value}</b></td>" if key in user_set(r.config) else f"<td>{value}</td>")
        rows.append(f'<tr data-key="{html.escape(key)}"><td>{html.escape(key)}</td>{"".join(cells)}</tr>')
    return f"<table><tr><th>setting</th>{head}</tr>{''.join(rows)}</table>"


def summary_line(run: dict[str, Any], metrics: list[dict[str, Any]], config: dict[str, Any]) -> str:
    bits = []
    for key in ("algo", "strategy", "backbone"):
        value = run.get(key, config.get(key))
        if key == "algo":  # one algorithm per direction where they differ
            saved = {d: (config.get(d) or {}).get("algo", config.get(f"{d}_algo")) for d in ("gen", "und")}
            per = {d: run.get(f"{d}_algo", saved[d]) for d in ("gen", "und")}
            if None not in per.values() and len(set(per.values())) > 1:
                value = f"{per['gen']} (gen) / {per['und']} (und)"
        if value is not None:
            bits.append(f"{key} <b>{html.escape(str(value))}</b>")
    if metrics:
        total = config.get("steps")
        bits.append(f"step <b>{metrics[-1]['step']}</b>" + (f" of {total}" if total else ""))
        secs = [m.get("time/rollout", 0) + m.get("time/update", 0) for m in metrics if "time/rollout" in m]
        if secs:
            secs.sort()
            bits.append(f"median <b>{secs[len(secs) // 2]:.2f} s</b>/step")
    if run:
        bits.append("finished" + (" (stopped early)" if run.get("stopped_early") else ""))
    elif metrics:
        bits.append("in progress (no run.json yet)")
    sel = run.get("selfeval") or {}
    if sel.get("final_step") is not None:  # suder.selfeval: which step final/ holds, and what the guard did
        chosen = "best self-score" if sel.get("select_final") == "best" else "last"
        best = sel.get("best_step")
        bits.append(f"final/ = step <b>{sel['final_step']}</b> ({chosen}; best self-score at step {best})")
        if sel.get("rollbacks"):
            bits.append(f"guard rolled back {len(sel['rollbacks'])}x")
        if sel.get("stopped_at"):
            bits.append(f"guard stopped at step {sel['stopped_at']}")
        if sel.get("warned"):
            bits.append("drift warnings: " + html.escape(", ".join(sel["warned"])))
    for key in ("base_model", "final_model"):
        if run.get(key):
            bits.append(f"{key.replace('_', ' ')} <code>{html.escape(str(run[key]))}</code>")
    return " · ".join(bits)


# ------------------------------------------------------------------------------------------- samples
def _cells(png: Path, record: dict[str, Any]) -> list[list[str]]:
    """The grid's images (``record["rows"]`` x ``record["cols"]``, no padding) as ``data:`` URIs, row by row."""
    from PIL import Image

    with Image.open(png) as f:
        grid = f.convert("RGB")
    cw, ch = grid.width // record["cols"], grid.height // record["rows"]
    return [
        [_data_uri(grid.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch))) for c in range(record["cols"])]
        for r in range(record["rows"])
    ]


def fmt_reward(value: float) -> str:
    """Two decimals, and no ``-0.00`` for a reward that rounds to zero."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def best(value: float, rewards: list[float]) -> bool:
    """The group's best reward as shown (a tie after rounding is a tie)."""
    return fmt_reward(value) == fmt_reward(max(rewards))


def _reward(value: float, best: bool, judged: int | None) -> str:
    mark = "" if judged is None else ' <span class="ok">✓</span>' if judged else ' <span class="bad">✗</span>'
    return f'<span class="{"best" if best else ""}">{fmt_reward(value)}</span>{mark}'


def gen_table(png: Path, record: dict[str, Any]) -> str:
    """A row per prompt: the prompt, then its G images, each with its reward under it (best in bold, the judge's
    verdict as a tick or a cross)."""
    rows = []
    for group, cells in zip(record["groups"], _cells(png, record)):
        rewards, judge = group["rewards"], group.get("judge") or [None] * len(group["rewards"])
        figs = "".join(
            f'<figure><img alt="" src="{src}"><figcaption>{_reward(r, best(r, rewards), j)}</figcaption></figure>'
            for src, r, j in zip(cells, rewards, judge)
        )
        rows.append(f'<tr><td class="prompt">{html.escape(group["prompt"])}</td><td><div class="imgs">{figs}</div>'
                    "</td></tr>")
    return f'<table class="samples gen"><tr><th>prompt</th><th>its images and their rewards</th></tr>{"".join(rows)}' \
           "</table>"


def und_table(png: Path, record: dict[str, Any]) -> str:
    """A row per image: the image, then its G captions with their rewards (the greedy caption marked)."""
    rows = []
    for group, cells in zip(record["groups"], _cells(png, record)):
        rewards, judge = group["rewards"], group.get("judge") or [None] * len(group["rewards"])
        lines = []
        for i, (text, r, j) in enumerate(zip(group["captions"], rewards, judge)):
            tag = ' <span class="muted">(greedy)</span>' if i == 0 and record.get("greedy_first") else ""
            lines.append(f'<tr><td class="r">{_reward(r, best(r, rewards), j)}</td>'
                         f"<td>{html.escape(text) if text.strip() else '<i class=muted>(empty)</i>'}{tag}</td></tr>")
        rows.append(f'<tr><td><img alt="" src="{cells[0]}"></td><td><table class="caps">{"".join(lines)}</table>'
                    "</td></tr>")
    return f'<table class="samples und"><tr><th>image</th><th>its captions and their rewards</th></tr>' \
           f'{"".join(rows)}</table>'


def sample_step(step: int, found: dict[tuple[int, str], Path]) -> str:
    """One step's samples, gen and und side by side; a grid without its ``.json`` (older runs) as it is."""
    parts = []
    for direction, table in (("gen", gen_table), ("und", und_table)):
        png = found.get((step, direction))
        if png is None:
            continue
        meta = png.with_suffix(".json")
        record = json.loads(meta.read_text()) if meta.exists() else None
        if record and record.get("groups"):
            parts.append(table(png, record))
        else:
            parts.append(f'<img class="grid" alt="step {step} {direction}" src="{_data_uri(png)}">')
    return f'<h3>step {step}</h3><div class="step">{"".join(parts)}</div>'


def samples_section(folder: Path, max_grids: int) -> tuple[str, str] | None:
    """(heading, html) of the samples over training: one block per step shown."""
    shown, found, total = sample_grids(folder, max_grids)
    if not shown:
        return None
    note = f" (showing {len(shown)} of {total} steps)" if len(shown) < total else ""
    return f"Samples over training{note}", "".join(sample_step(step, found) for step in shown)


# ------------------------------------------------------------------------------------------- the page
def render(run_dirs: str | Path | list, max_grids: int = 12, refresh: int | None = None) -> str:
    """The report of one run folder, or of several compared, as one HTML string; ``refresh`` seconds: while a run
    is in progress, the browser reloads the page that often (``suder report --watch``)."""
    folders = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not folders:
        raise DataError("No run folder given; pass the --output-dir of one `suder run` or of several to compare.")
    runs = [load_run(d, n) for d, n in zip(folders, run_names(folders) if len(folders) > 1 else [None])]
    for i, r in enumerate(runs):
        r.colour = COLOURS[i % len(COLOURS)]
    sections = page_sections(runs, max_grids)
    nav = " · ".join(f'<a href="#{key}">{NAV[key]}</a>' for key, _, _ in sections)
    if len(runs) == 1:
        r = runs[0]
        title = html.escape(r.name)
        head = [
            f"<h1>suder run <code>{title}</code></h1>",
            f"<p class=muted>{summary_line(r.run, r.metrics, r.config)}</p>",
        ]
    else:
        title = html.escape(" vs ".join(r.name for r in runs))
        head = [f"<h1>suder runs compared: {len(runs)}</h1>", '<div class="legend">']
        for r in runs:
            head.append(
                f'<p data-run="{html.escape(r.name)}"><span class="sw" style="background:{r.colour}"></span><code>'
                f"{html.escape(r.name)}</code> <span class=muted>{summary_line(r.run, r.metrics, r.config)}</span></p>"
            )
        head.append("</div>")
    live = refresh and not all(r.run for r in runs)
    reload = f'<meta http-equiv="refresh" content="{int(refresh)}">' if live else ""
    body = head + [f"<p>{nav}</p>"] + [f"<h2 id={key}>{heading}</h2>{part}" for key, heading, part in sections]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>suder report: {title}</title>{reload}'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def page_sections(runs: list[Run], max_grids: int) -> list[tuple[str, str, str]]:
    """``(id, heading, html)`` of the page's sections: judge tables, overview, samples, all metrics, config."""
    grouped = {r.name: {k: pts for g in r.groups.values() for k, pts in g.items()} for r in runs}
    union: dict[str, dict[str, None]] = {}
    for r in runs:
        for g, series in r.groups.items():
            union.setdefault(g, {}).update(dict.fromkeys(series))
    union = _ordered(union)
    sections = []
    judged = [r for r in runs if r.run.get("before") or r.run.get("after")]
    if judged:
        if len(runs) == 1:
            tables = [judge_table(runs[0].run.get("before"), runs[0].run.get("after"))]
        else:  # side by side: the run's name above its table, in its colour
            tables = [f'<div data-run="{html.escape(r.name)}"><h3 style="color:{r.colour}">{html.escape(r.name)}</h3>'
                      f'{judge_table(r.run.get("before"), r.run.get("after"), "%")}</div>' for r in judged]
        sections.append(("judge", "Judged accuracy before and after", f'<div class="side">{"".join(tables)}</div>'))
    if any(grouped.values()):
        sections.append(("overview", "Overview", charts_html(overview_keys(union), runs, grouped)))
    if len(runs) == 1:
        samples = samples_section(runs[0].folder / "samples", max_grids)
        if samples:
            sections.append(("samples", samples[0], samples[1]))
    else:
        last = []
        for r in runs:
            shown, found, _ = sample_grids(r.folder / "samples", 1)
            if shown:
                last.append(f'<h3 style="color:{r.colour}">{html.escape(r.name)}</h3>{sample_step(shown[-1], found)}')
        if last:
            sections.append(("samples", "Samples: the last step of each run", "".join(last)))
    if any(grouped.values()):
        body = "".join(group_section(g, list(keys), runs, grouped) for g, keys in union.items())
        sections.append(("metrics", "All metrics", body))
    if len(runs) == 1 and runs[0].config:
        note = "<p class=muted>bold: set by you (a config file, flags or keywords); the rest: the defaults or preset"
        sections.append(("config", "Config", note + config_section(runs[0].config)))
    elif len(runs) > 1:
        sections.append(("config", "Config: the settings that differ", config_diff(runs)))
    return sections


def group_section(name: str, keys: list[str], runs: list[Run], grouped: dict[str, dict[str, Any]]) -> str:
    return (
        f'<details open id="group-{name}" class="group"><summary>{name} ({len(keys)})</summary>'
        f"{charts_html(keys, runs, grouped)}</details>"
    )


def write_report(
    run_dirs: str | Path | list, out: str | Path | None = None, max_grids: int = 12, refresh: int | None = None
) -> Path:
    """Write ``render(run_dirs)`` to ``out`` (default: ``RUN_DIR/report.html`` for one run, ``compare.html`` in
    the current folder for several), replaced atomically so that a browser reloading it never reads half a page;
    returns the file."""
    several = not isinstance(run_dirs, (str, Path)) and len(run_dirs) > 1
    if not isinstance(run_dirs, (str, Path)) and len(run_dirs) == 1:
        run_dirs = run_dirs[0]
    target = Path(out) if out else Path("compare.html") if several else Path(run_dirs) / "report.html"
    page = render(run_dirs, max_grids, refresh)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


def watch(run_dirs: str | Path | list, out: str | Path | None, every: int, max_grids: int = 12,
          sleep=time.sleep) -> Path:
    """Rewrite the report every ``every`` seconds until every run has written ``run.json``, then once more."""
    folders = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    while True:
        done = all((Path(d) / "run.json").exists() for d in folders)
        target = write_report(run_dirs, out, max_grids, refresh=every)
        if done:
            return target
        sleep(every)
