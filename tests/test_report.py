"""``suder report``: a self-contained page with the config, the judge table, a curve per metric and every grid."""

from __future__ import annotations

import base64
import json
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
        self.images, self.svgs, self.cells, self.config = [], [], [], {}
        self.groups: dict[str, list[str]] = {}
        self._group = self._key = None
        self._in_cell = False
        self._spans: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "details" and a.get("id", "").startswith("group-"):
            self._group = a["id"][len("group-") :]
            self.groups[self._group] = []
        if tag == "svg":
            self.svgs.append(a["data-metric"])
            if self._group:
                self.groups[self._group].append(a["data-metric"])
        if tag == "div" and "data-key" in a:
            self._key, self._spans = a["data-key"], []
        self._in_cell = tag == "td"

    def handle_endtag(self, tag):
        if tag == "details":
            self._group = None
        if tag == "div" and self._key:
            self.config[self._key] = self._spans[-1]
            self._key = None

    def handle_data(self, data):
        if self._key:
            self._spans.append(data)
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

    run = json.loads((run_dir / "run.json").read_text())
    for when in ("before", "after"):
        for group in ("t2i", "caption", "caption_greedy"):
            assert f"{100 * run[when][group]['overall']:.1f}" in page.cells
    delta = 100 * (run["after"]["t2i"]["overall"] - run["before"]["t2i"]["overall"])
    assert f"{delta:+.1f}" in page.cells

    grids = sorted((run_dir / "samples").glob("*.png"))
    assert len(grids) == 6 and len(page.images) == 6  # steps 1-3, gen and und
    assert sorted(base64.b64decode(src.split(",", 1)[1]) for src in page.images) == sorted(
        g.read_bytes() for g in grids
    )
    assert all(src.startswith("data:image/png;base64,") for src in page.images)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    numeric = {k for line in lines for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
    assert set(page.groups) == {"gen", "und", "train", "time"}
    assert sorted(k for keys in page.groups.values() for k in keys) == sorted(numeric)
    assert {"gen/reward_mean", "und/reward_mean", "gen/judge_acc", "gen/loss", "lr"} <= set(page.svgs[:10])


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
