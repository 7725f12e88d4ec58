"""``suder report RUN_DIR``: one self-contained HTML page of a run, finished or still training.

The page needs no network when viewed: CSS is inline, the sample grids are base64 ``data:`` URIs and the curves
are inline SVG drawn here (a few dozen lines instead of making matplotlib a runtime dependency; SVG also keeps
the page small and sharp at any zoom). It reads what the run folder holds (see ``suder.outputs``):

* ``config.yaml``: every field, the ones that differ from the default in bold;
* ``run.json``: the judged before/after table (toy backbone on ShapesWorld) and the run's summary;
* ``metrics.jsonl``: one chart per metric, grouped by prefix (``gen/``, ``und/``, ``heldout/``, ``time/``,
  the rest under "train"), each with the raw values (faint) and an exponential moving average
  (TensorBoard's smoothing, weight 0.6); an overview first with rewards, judge accuracy, losses, KL and the
  learning rate;
* ``samples/step-*-{gen,und}.png``: the sample grids over training (at most ``max_grids`` steps, evenly spaced,
  always the first and the last, so that a 12-hour run still makes a page of a few MB).

A torn last line of a run in progress is skipped; a step logged twice (resume) keeps its last line.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import DataError

GROUP_ORDER = ("gen", "und", "heldout", "train", "time")
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
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1320px;
padding:16px 24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px;color:#444}.muted{color:#777}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #e3e3e3;padding:3px 8px;text-align:right}
th{background:#f1f1f4}td:first-child,th:first-child{text-align:left}.up{color:#137333}.down{color:#b3261e}
.cfg{columns:3 300px;column-gap:24px}.cfg div{break-inside:avoid;display:flex;justify-content:space-between;
border-bottom:1px dotted #ddd;padding:1px 0}.cfg b{color:#0b57d0}.cfg span:last-child{font-family:ui-monospace,
monospace;margin-left:12px;text-align:right;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:10px}.chart{background:#fff;border:1px solid #e3e3e3;border-radius:6px;
padding:4px}.chart svg{display:block}.grids td{vertical-align:top;text-align:left}
.grids img{image-rendering:pixelated;max-width:100%}summary{cursor:pointer;font-weight:600;margin:8px 0}
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
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    return {
        g: dict(sorted(groups[g].items(), key=lambda kv: _rank(kv[0])))
        for g in sorted(groups, key=lambda g: order.get(g, len(order)))
    }


def _rank(key: str) -> tuple[int, str]:
    name = key.split("/", 1)[1] if "/" in key and key.split("/", 1)[0] in GROUP_ORDER else key
    hits = [i for i, f in enumerate(FIRST) if name == f or name.startswith(f)]
    return (hits[0] if hits else len(FIRST), key)


def overview_keys(groups: dict[str, dict[str, list]]) -> list[str]:
    """Rewards, judge accuracy, losses, KL and learning rate: the curves a run is judged by."""
    keys = [k for g in groups.values() for k in g]
    wanted = [r"/reward_mean$", r"/judge_acc$", r"(^|/)loss$", r"(^|/)kl(/mean)?$", r"^lr$", r"^heldout/"]
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


# ------------------------------------------------------------------------------------------- drawing
def ema(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: ``s_t = w * s_(t-1) + (1 - w) * x_t``, debiased as TensorBoard does."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def svg_chart(title: str, points: list[tuple[int, float]], width: int = 290, height: int = 170) -> str:
    """A line chart of ``(step, value)`` points as an inline ``<svg>`` (raw values faint, smoothed solid)."""
    if len(points) > 1200:  # keep pages small: every k-th point (the smoothed line still sees all of them)
        smooth_all = ema([v for _, v in points])
        k = math.ceil(len(points) / 1200)
        idx = list(range(0, len(points), k)) + ([len(points) - 1] if (len(points) - 1) % k else [])
        points, smooth = [points[i] for i in idx], [smooth_all[i] for i in idx]
    else:
        smooth = ema([v for _, v in points])
    left, right, top, bottom = 52, 8, 20, 22
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y0 == y1:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (w * (x - x0) / (x1 - x0) if x1 > x0 else w / 2)

    def sy(y: float) -> float:
        return top + h * (1 - (y - y0) / (y1 - y0))

    def path(vals: list[float]) -> str:
        return " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, vals))

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" data-metric="{html.escape(title)}">',
        f'<text x="4" y="13" font-size="12" font-weight="600">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
    ]
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
        parts.append(
            f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end" fill="#666">{_fmt(yv)}</text>'
        )
    for xv in sorted({x0, (x0 + x1) // 2, x1}):
        parts.append(
            f'<text x="{sx(xv):.1f}" y="{height - 6}" font-size="10" text-anchor="middle" fill="#666">{xv}</text>'
        )
    if len(points) == 1:
        parts.append(f'<circle cx="{sx(xs[0]):.1f}" cy="{sy(ys[0]):.1f}" r="3" fill="#0b57d0"/>')
    else:
        parts.append(f'<polyline points="{path(ys)}" fill="none" stroke="#0b57d0" stroke-opacity="0.25"/>')
        parts.append(f'<polyline points="{path(smooth)}" fill="none" stroke="#0b57d0" stroke-width="1.6"/>')
    last = f"last {_fmt(ys[-1])} @ {xs[-1]}"
    parts.append(f'<text x="{left + w}" y="13" font-size="10" text-anchor="end" fill="#666">{last}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------- sections
def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def judge_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The judged rows of a run: before, the base at its own guidance scale where the run trained at another
    (``before["base_guidance"]``, T2I only; ``Trainer.evaluate``), after."""
    rows = [("before", before), ("after", after)]
    own = (before or {}).get("base_guidance")
    if own:
        rows.insert(1, (f"base g={own['guidance_scale']:g}", own))
    return rows


def judge_table(before: dict[str, Any], after: dict[str, Any]) -> str:
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
    return f"<table><tr><th>judge accuracy (%)</th>{head}</tr>{''.join(rows)}</table>"


def config_section(config: dict[str, Any]) -> str:
    from .config import FIELDS

    items = []
    sources = config.get("sources") or {}  # which layer set each value (suder.config); bold: not the default
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("gen", "und") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key not in ("sources", "history", "preset"):
            flat[key] = value
    for key, value in flat.items():
        f = FIELDS.get(key)
        default = None
        if f is not None:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        changed = sources[key] != "default" if key in sources else f is not None and value != default
        name = f"<b>{html.escape(key)}</b>" if changed else html.escape(key)
        shown = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        items.append(f'<div data-key="{html.escape(key)}"><span>{name}</span><span>{html.escape(shown)}</span></div>')
    return f'<div class="cfg">{"".join(items)}</div>'


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
    for key in ("base_model", "final_model"):
        if run.get(key):
            bits.append(f"{key.replace('_', ' ')} <code>{html.escape(str(run[key]))}</code>")
    return " · ".join(bits)


# ------------------------------------------------------------------------------------------- the page
def render(run_dir: str | Path, max_grids: int = 12, refresh: int | None = None) -> str:
    """The report of ``run_dir`` as one HTML string; ``refresh`` seconds: while the run is in progress, the
    browser reloads the page that often (``suder report --watch``)."""
    import yaml

    d = Path(run_dir)
    if not d.is_dir():
        raise DataError(f"Run folder '{d}' does not exist; pass the --output-dir of a `suder run`.")
    run = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else {}
    metrics = read_metrics(d / "metrics.jsonl")
    if not (run or config or metrics):
        raise DataError(f"'{d}' holds no run (no config.yaml, metrics.jsonl or run.json); pass a `suder run` folder.")
    groups = metric_groups(metrics)
    reload = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh and not run else ""
    flat = {k: pts for g in groups.values() for k, pts in g.items()}
    title = html.escape(d.resolve().name)
    sections: list[tuple[str, str, str]] = []  # (id, heading, html)
    if run.get("before") or run.get("after"):
        sections.append(("judge", "Judged accuracy before and after", judge_table(run["before"], run["after"])))
    if flat:
        charts = "".join(f'<div class="chart">{svg_chart(k, flat[k])}</div>' for k in overview_keys(groups))
        sections.append(("overview", "Overview", f'<div class="charts">{charts}</div>'))
    samples = samples_section(d / "samples", max_grids)
    if samples:
        sections.append(("samples", samples[0], samples[1]))
    if flat:
        sections.append(("metrics", "All metrics", "".join(group_section(n, series) for n, series in groups.items())))
    if config:
        sections.append(
            ("config", "Config", "<p class=muted>bold: differs from the default</p>" + config_section(config))
        )
    nav = " · ".join(f'<a href="#{key}">{html.escape(heading.split(" (")[0])}</a>' for key, heading, _ in sections)
    body = [f"<h1>suder run <code>{title}</code></h1>", f"<p class=muted>{summary_line(run, metrics, config)}</p>"]
    body += [f"<p>{nav}</p>"] + [f"<h2 id={key}>{heading}</h2>{part}" for key, heading, part in sections]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>suder report: {title}</title>{reload}'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def group_section(name: str, series: dict[str, list[tuple[int, float]]]) -> str:
    charts = "".join(f'<div class="chart">{svg_chart(k, pts)}</div>' for k, pts in series.items())
    return (
        f'<details open id="group-{name}" class="group"><summary>{name} ({len(series)})</summary>'
        f'<div class="charts">{charts}</div></details>'
    )


def samples_section(folder: Path, max_grids: int) -> tuple[str, str] | None:
    """(heading, table) of the sample grids: one row per step, gen and und side by side."""
    shown, found, total = sample_grids(folder, max_grids)
    if not shown:
        return None
    note = f" (showing {len(shown)} of {total} steps)" if len(shown) < total else ""
    rows = []
    for step in shown:
        cells = []
        for direction in ("gen", "und"):
            f = found.get((step, direction))
            cells.append(f'<td><img alt="step {step} {direction}" src="{_data_uri(f)}"></td>' if f else "<td></td>")
        rows.append(f"<tr><th>step {step}</th>{''.join(cells)}</tr>")
    head = "<tr><th></th><th>gen: prompts and their images</th><th>und: images and their captions (reward)</th></tr>"
    return f"Samples over training{note}", f'<table class="grids">{head}{"".join(rows)}</table>'


def write_report(
    run_dir: str | Path, out: str | Path | None = None, max_grids: int = 12, refresh: int | None = None
) -> Path:
    """Write ``render(run_dir)`` to ``out`` (default ``RUN_DIR/report.html``, replaced atomically so that a
    browser reloading it never reads half a page); returns the file."""
    target = Path(out) if out else Path(run_dir) / "report.html"
    page = render(run_dir, max_grids, refresh)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


def watch(run_dir: str | Path, out: str | Path | None, every: int, max_grids: int = 12, sleep=time.sleep) -> Path:
    """Rewrite the report every ``every`` seconds until the run writes ``run.json``, then once more."""
    while True:
        done = (Path(run_dir) / "run.json").exists()
        target = write_report(run_dir, out, max_grids, refresh=every)
        if done:
            return target
        sleep(every)
