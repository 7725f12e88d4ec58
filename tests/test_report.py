"""``suder report``: a self-contained page with the config, the judge table, a curve per metric and every grid."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

import suder
from suder.cli import main
from suder.errors import DataError
from suder.report import ema, metric_groups, read_metrics, render, sample_grids

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=3, group_size=4, gen_batch_size=2, und_batch_size=2, eval_num=8, sample_every=1, save_every=0)


class Page(HTMLParser):
    """The parts of the page the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.svgs, self.cells, self.config, self.bold = [], [], [], {}, set()
        self.groups: dict[str, list[str]] = {}
        self.consts: dict[str, str] = {}  # metric shown as one line of text -> that text
        self.kinds: dict[str, str] = {}  # metric -> "steps" or "smoothed"
        self.lines: dict[str, list[dict[str, str]]] = {}  # metric -> the polylines of its (last) chart
        self.ticks: list[tuple[str, list[str]]] = []  # (metric, its y tick labels) per chart
        self.rows: list[dict[str, list]] = []  # rows of the sample tables: their text and images
        self.sections: dict[str, list[str]] = {}  # h2 id -> the metrics shown under it (charts and lines)
        self._section = None
        self._group = self._key = self._const = self._svg = self._tick = None
        self._in_cell = self._bold = False
        self._spans: list[str] = []
        self._depth = self._samples = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._depth += 1
            if "samples" in (a.get("class") or "") and not self._samples:
                self._samples = self._depth
        if tag == "tr" and self._samples == self._depth:
            self.rows.append({"text": [], "images": []})
        if tag == "img":
            self.images.append(a["src"])
            if self._samples:
                self.rows[-1]["images"].append(a["src"])
        if tag == "h2":
            self._section = a["id"]
            self.sections[self._section] = []
        if tag == "details" and a.get("id", "").startswith("group-"):
            self._group = a["id"][len("group-") :]
            self.groups[self._group] = []
        if tag == "svg":
            self._svg = a["data-metric"]
            self.svgs.append(self._svg)
            self.ticks.append((self._svg, []))
            self.lines[self._svg] = []
            self.kinds[self._svg] = a.get("data-kind")
            self.sections[self._section].append(self._svg)
            if self._group:
                self.groups[self._group].append(self._svg)
        if tag == "polyline" and self._svg:
            self.lines[self._svg].append(a)
        if tag == "text" and a.get("class") == "ytick":
            self._tick = self._svg
        if tag == "span" and "data-metric" in a:
            self._const, self._spans = a["data-metric"], []
            self.sections[self._section].append(self._const)
            if self._group:
                self.groups[self._group].append(self._const)
        if tag == "div" and "data-key" in a:
            self._key, self._spans = a["data-key"], []
        self._bold = tag == "b" and self._key is not None
        self._in_cell = tag == "td"

    def handle_endtag(self, tag):
        if tag == "table":
            self._samples = 0 if self._samples == self._depth else self._samples
            self._depth -= 1
        if tag == "svg":
            self._svg = None
        if tag == "details":
            self._group = None
        if tag == "div" and self._key:
            self.config[self._key] = self._spans[-1]
            self._key = None
        if tag == "span" and self._const and self._spans and self._spans[-1].endswith(")"):
            self.consts[self._const] = "".join(self._spans)
            self._const = None

    def handle_data(self, data):
        if self._key:
            self._spans.append(data)
            if self._bold:
                self.bold.add(self._key)
        if self._const:
            self._spans.append(data)
        if self._tick:
            self.ticks[-1][1].append(data)
            self._tick = None
        if self._samples and data.strip():
            self.rows[-1]["text"].append(data.strip())
        if self._in_cell and data.strip():
            self.cells.append(data.strip())
            self._in_cell = False


@pytest.fixture(scope="module")
def run_dir(tiny_toy_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-run") / "run"
    suder.train("toy", model=tiny_toy_path, output_dir=str(out), lr=2e-5, **TINY)
    return out


def test_report_of_a_finished_run(run_dir, tmp_path):
    target = tmp_path / "page.html"
    assert main(["report", str(run_dir), "--out", str(target)]) == 0
    text = target.read_text()
    # no network when viewed: nothing fetched from a URL (src, href, CSS url(), @import)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "url(" not in text and "@import" not in text and "<script" not in text
    page = Page(text)

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    shown = {f"{k}.{name}" if k in ("gen", "und") else k for k, v in config.items()
             for name in (v if k in ("gen", "und") else [None]) if k not in ("sources", "history", "preset")}
    assert set(page.config) == shown and "gen.group_size" in shown  # every setting, sections as gen.x / und.x
    assert page.config["lr"] == "2e-05" and page.config["group_size"] == "4" and page.config["algo"] == "simpo"
    mine = {k for k, layer in config["sources"].items() if layer in ("config", "flags", "keywords")}
    assert page.bold == mine and {"lr", "steps", "group_size"} <= mine and "algo" not in mine  # bold: set by the user

    run = json.loads((run_dir / "run.json").read_text())
    for when in ("before", "after"):
        for group in ("t2i", "caption", "caption_greedy"):
            assert f"{100 * run[when][group]['overall']:.1f}" in page.cells
    delta = 100 * (run["after"]["t2i"]["overall"] - run["before"]["t2i"]["overall"])
    assert f"{delta:+.1f}" in page.cells

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    numeric = {k for line in lines for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
    assert set(page.groups) == {"gen", "und", "drift", "train", "time"}  # drift: identical groups, every step
    assert sorted(k for keys in page.groups.values() for k in keys) == sorted(numeric)  # a chart or a line each
    assert {"gen/reward_mean", "und/reward_mean", "gen/judge_acc", "gen/loss", "lr"} <= set(page.sections["overview"])
    for key, text in page.consts.items():  # one value over the run: one line of text, no chart
        assert len({line[key] for line in lines if key in line}) == 1 and key not in page.svgs, (key, text)


def test_samples_are_images_beside_their_prompts_captions_and_rewards_as_text(run_dir):
    """Each sampled image sits in a table row with its prompt (gen) or captions (und) and each sample's reward as
    HTML text; the grids hold images only (made with diffusers' make_image_grid, no drawn text) and their records
    hold the rollout's real rewards: their mean is the step's logged reward_mean."""
    from PIL import Image

    from suder.report import fmt_reward

    assert [fmt_reward(v) for v in (-0.004, 0.004, -2.911, 12.345)] == ["0.00", "0.00", "-2.91", "12.35"]
    page = Page(render(run_dir))
    rows = iter(r for r in page.rows if r["images"])  # the header rows hold no image
    lines = {json.loads(x)["step"]: json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()}
    pngs = sorted((run_dir / "samples").glob("*.png"))
    assert [p.stem for p in pngs] == [f"step-{s:06d}-{d}" for s in (1, 2, 3) for d in ("gen", "und")]
    for png in pngs:
        record = json.loads(png.with_suffix(".json").read_text())
        step, direction = int(png.stem.split("-")[1]), png.stem.split("-")[2]
        G = TINY["group_size"]
        assert record["rows"] == 2 and record["cols"] == (G if direction == "gen" else 1)
        rewards = [r for g in record["groups"] for r in g["rewards"]]
        assert sum(rewards) / len(rewards) == pytest.approx(lines[step][f"{direction}/reward_mean"], abs=1e-3)
        grid = Image.open(png).convert("RGB")
        cell = grid.width // record["cols"]
        assert grid.size == (record["cols"] * cell, record["rows"] * cell)  # square images, no label column
        for r, group in enumerate(record["groups"]):
            row = next(rows)
            texts = [group["prompt"]] if direction == "gen" else group["captions"]
            assert all((t.strip() or "(empty)") in row["text"] for t in texts), (row["text"], texts)
            assert all(fmt_reward(v) in row["text"] for v in group["rewards"])
            assert len(row["images"]) == record["cols"]
            for c, src in enumerate(row["images"]):
                shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
                crop = grid.crop((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell))
                assert shown.tobytes() == crop.tobytes()


def test_a_run_without_sample_records_shows_its_grids_as_they_are(run_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("*.json", "final", "checkpoints"))
    grids = sorted((old / "samples").glob("*.png"))
    page = Page(render(old))
    assert not page.rows and sorted(base64.b64decode(s.split(",", 1)[1]) for s in page.images) == sorted(
        g.read_bytes() for g in grids
    )


def test_report_of_a_run_in_progress_and_of_no_run(tmp_path, run_dir):
    live = tmp_path / "live"
    live.mkdir()
    (live / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 3, "gen/lo')  # torn last line
    page = Page(render(live))
    assert "in progress" in render(live) and page.groups and not page.images
    assert main(["report", str(live)]) == 0 and (live / "report.html").exists()
    with pytest.raises(DataError, match="holds no run"):
        render(tmp_path / "live" / "..")
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_metrics_are_read_by_step_and_grouped_by_prefix(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "gen/loss": 1.0, "lr": 0.1, "gen/simpo/margin": null}\n'
        '{"step": 2, "gen/loss": 5.0}\n'
        '{"step": 2, "gen/loss": 2.0, "heldout/t2i": 0.5}\n'
        "not json\n"
    )
    metrics = read_metrics(path)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[1]["gen/loss"] == 2.0
    assert metric_groups(metrics) == {
        "gen": {"gen/loss": [(1, 1.0), (2, 2.0)]},
        "heldout": {"heldout/t2i": [(2, 0.5)]},
        "train": {"lr": [(1, 0.1)]},
    }


def test_grids_are_thinned_evenly_keeping_first_and_last(tmp_path):
    for step in range(10, 210, 10):
        (tmp_path / f"step-{step:06d}-gen.png").write_bytes(b"")
    shown, found, total = sample_grids(tmp_path, 5)
    assert total == 20 and shown == [10, 60, 110, 150, 200] and found[(200, "gen")].name == "step-000200-gen.png"


def test_ema_is_tensorboards_debiased_smoothing():
    """s_1 = x_1 exactly (debiased); s_2 = (0.6 * 0.4 * 1 + 0.4 * 3) / (1 - 0.36) = 1.44 / 0.64 = 2.25."""
    assert ema([1.0, 3.0]) == pytest.approx([1.0, 2.25])


def test_watch_rewrites_a_live_report_until_the_run_ends(tmp_path, run_dir):
    """The page reloads itself while the run is in progress; the last rewrite (run.json present) does not."""
    from suder.report import watch

    live = tmp_path / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    pages = []

    def sleep(seconds):
        pages.append((live / "report.html").read_text())
        assert seconds == 30
        (live / "run.json").write_text((run_dir / "run.json").read_text())

    target = watch(live, None, 30, sleep=sleep)
    assert len(pages) == 1 and '<meta http-equiv="refresh" content="30">' in pages[0]
    assert "refresh" not in target.read_text() and "Judged accuracy" in target.read_text()


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser")), reason="no Chromium here")
def test_render_script_screenshots_the_page_offline(run_dir, tmp_path):
    """examples/render_report.sh as a user runs it: the page renders in headless Chromium with the network cut."""
    from PIL import Image

    shot = tmp_path / "shot.png"
    env = os.environ | {"HEIGHT": "900"}
    subprocess.run(["bash", str(ROOT / "examples" / "render_report.sh"), str(run_dir), str(shot)], check=True, env=env)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    assert len(image.getcolors(1 << 16) or []) > 50  # text, table, curves: not a blank or error page


def _synthetic_run(folder: Path, shift: float = 0.0, t2i_after: float = 0.5) -> Path:
    """A run folder by hand: 40 steps with a warmed-up lr, a constant count, a noisy loss and a reward."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, 41):
        lines.append({
            "step": step,
            "lr": 4.8e-6 * min(1.0, step / 10),  # warm-up to 4.8e-6 over 10 steps, then constant
            "gen/groups": 4.0,  # constant: one line of text
            "gen/simpo/pairs": float(8 + 4 * (step > 20)),  # a count that changes once
            "gen/loss": -2.911 + shift + 0.37 * math.sin(step) + 0.05 * step,
            "gen/reward_mean": 0.3 + shift + 0.01 * step,
        })
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    sources = {"lr": "flags", "steps": "keywords", "epochs": "preset", "guidance_scale": "preset", "seed": "default"}
    config = {"lr": 4.8e-6, "steps": 40, "epochs": 3, "guidance_scale": 3.0, "seed": 7, "sources": sources}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    judged = {"t2i": {"overall": 0.25}, "caption": {"overall": 0.4}, "caption_greedy": {"overall": 0.5}}
    after = {**judged, "t2i": {"overall": t2i_after}}
    (folder / "run.json").write_text(json.dumps({"before": judged, "after": after, "algo": "simpo"}))
    return folder


def _is_round(values: list[float]) -> bool:
    """Evenly spaced by 1, 2 or 5 times a power of ten, each a whole multiple of that spacing."""
    gaps = {round(b - a, 12) for a, b in zip(values, values[1:])}
    if len(gaps) != 1:
        return False
    gap = gaps.pop()
    mantissa = gap / 10 ** math.floor(math.log10(gap))
    return any(math.isclose(mantissa, m) for m in (1, 2, 5)) and all(
        math.isclose(v / gap, round(v / gap), abs_tol=1e-9) for v in values
    )


def _digits(label: str) -> str:
    """A tick label's significant digits: its mantissa without sign, point, unit, leading zeros or (a whole
    number's) trailing zeros."""
    mantissa = label.split("e")[0].rstrip("kMG").replace("-", "")
    if "." not in mantissa:
        mantissa = mantissa.rstrip("0")
    return mantissa.replace(".", "").lstrip("0") or "0"


def _tick_value(label: str) -> float:
    units = {"k": 1e3, "M": 1e6, "G": 1e9}
    return float(label[:-1]) * units[label[-1]] if label[-1] in units else float(label)


def test_tick_values_are_round_and_compact(tmp_path, run_dir):
    """Hand-checked axes (the raw extremes -2.911 and 4.8e-6 were the old tick labels), then every axis of a real
    run's page and of a synthetic one: evenly spaced 1-2-5 values, labelled without float noise or padding."""
    from suder.report import fmt_ticks, nice_ticks

    assert fmt_ticks(*nice_ticks(-2.911, 4.2)) == ["-4", "-2", "0", "2", "4", "6"]
    assert fmt_ticks(*nice_ticks(0.0, 4.8e-6)) == ["0", "1e-6", "2e-6", "3e-6", "4e-6", "5e-6"]
    assert fmt_ticks(*nice_ticks(0.02, 0.98)) == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert fmt_ticks(*nice_ticks(1, 20000, loose=False, integer=True)) == ["5k", "10k", "15k", "20k"]
    assert nice_ticks(1, 3, loose=False, integer=True)[0] == [1, 2, 3]
    for folder in (run_dir, _synthetic_run(tmp_path / "s")):
        page = Page(render(folder))
        assert len(page.ticks) == len(page.svgs) > 5
        for metric, labels in page.ticks:
            assert len(labels) >= 3 and _is_round([_tick_value(x) for x in labels]), (metric, labels)
            values = [_tick_value(x) for x in labels]
            gap = abs(values[1] - values[0])
            # no float noise or padding: a label has no more significant digits than its axis's spacing needs
            # (a narrow band far from zero, such as a phase time of 0.0110-0.0116 s, needs three: 1.11e-2)
            needed = math.floor(math.log10(max(abs(v) for v in values))) - math.floor(math.log10(gap) + 1e-9) + 1
            assert all(len(_digits(x)) <= max(needed, 1) for x in labels), (metric, labels)


def _polyline_ys(line: dict[str, str]) -> list[float]:
    return [float(xy.split(",")[1]) for xy in line["points"].split()]


def test_lr_and_counts_are_drawn_as_steps_unsmoothed(tmp_path):
    """The warm-up reaches its target on the chart: one line of horizontal and vertical segments whose levels are
    exactly the logged values (a smoothed curve would creep up to it); a noisy metric keeps raw + smoothed lines."""
    from suder.report import is_step_metric

    page = Page(render(_synthetic_run(tmp_path / "s")))
    for key, levels in (("lr", 10), ("gen/simpo/pairs", 2)):
        assert page.kinds[key] == "steps"
        (line,) = page.lines[key]
        points = [tuple(map(float, xy.split(","))) for xy in line["points"].split()]
        segments = list(zip(points, points[1:]))
        assert all(a[0] == b[0] or a[1] == b[1] for a, b in segments)  # only horizontal or vertical
        assert len(set(_polyline_ys(line))) == levels  # the logged values, nothing in between
        assert points[-1][1] == min(y for _, y in points)  # ends at the top value: the target is reached
    assert page.kinds["gen/loss"] == "smoothed" and len(page.lines["gen/loss"]) == 2
    assert is_step_metric("und/kl/tokens", [float(x) for x in range(40)])  # a count by name
    assert is_step_metric("gen/judge_acc", [0.25, 0.5] * 10)  # few distinct values
    assert not is_step_metric("gen/judge_acc", [0.25, 0.5, 0.75])  # too few points to tell
    assert not is_step_metric("gen/loss", [math.sin(x) for x in range(40)])


def test_a_constant_metric_is_one_line_of_text(tmp_path):
    page = Page(render(_synthetic_run(tmp_path / "s")))
    assert "gen/groups" not in page.svgs and "gen/groups" in page.groups["gen"]
    assert page.consts["gen/groups"] == "gen/groups = 4 (constant, steps 1-40)"
    assert set(page.consts) == {"gen/groups"}  # lr varies during warm-up: a chart


def test_bold_means_set_by_the_user(tmp_path):
    """Bold: a config file, flags or keywords set it; a preset's or a default value is plain, even where it
    differs from the default (``epochs: 3`` from the preset)."""
    page = Page(render(_synthetic_run(tmp_path / "s")))
    assert page.bold == {"lr", "steps"} and {"epochs", "guidance_scale", "seed"} <= set(page.config)


def test_several_runs_overlay_their_curves_and_put_their_judge_tables_side_by_side(tmp_path):
    a = _synthetic_run(tmp_path / "a" / "run")
    b = _synthetic_run(tmp_path / "b" / "run", shift=1.0, t2i_after=0.75)
    target = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--out", str(target)]) == 0
    text = target.read_text()
    page = Page(text)
    names = ["a/run", "b/run"]  # the same folder names: told apart by their parents
    legend = dict(re.findall(r'<p data-run="([^"]+)"><span class="sw" style="background:(#\w+)', text))
    assert list(legend) == names and len(set(legend.values())) == 2
    for key in ("gen/loss", "gen/reward_mean", "lr"):  # one curve per run, in the run's colour
        lines = page.lines[key]
        assert {line["data-run"] for line in lines} == set(names)
        assert all(line["stroke"] == legend[line["data-run"]] for line in lines)
    ys = {line["data-run"]: _polyline_ys(line) for line in page.lines["gen/reward_mean"] if line.get("stroke-width")}
    assert all(ya > yb for ya, yb in zip(ys["a/run"], ys["b/run"]))  # b's rewards are higher: drawn above
    assert page.consts["gen/groups"] == "gen/groups = 4 (constant, steps 1-40)"  # constant in both runs
    side = re.search(r'<div class="side">(.*?)</div></div><h2', text).group(1)  # the judge tables' row
    assert re.findall(r'<div data-run="([^"]+)"><h3[^>]*>[^<]+</h3><table><tr><th>%</th>', side) == names
    assert "50.0" in page.cells and "75.0" in page.cells
    assert "+25.0" in page.cells and "+50.0" in page.cells  # each run's change
