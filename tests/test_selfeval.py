"""Held-out self-evaluation, selection of final/, the guard and the drift monitors (``suder.selfeval``,
``suder.monitors``), on the tiny toy."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import suder
from suder import monitors, selfeval
from suder.config import resolve
from suder.errors import ConfigError
from suder.trainer import Trainer

TINY = dict(group_size=4, gen_batch_size=2, und_batch_size=2, eval_num=8, sample_every=0, save_every=0,
            selfeval_num=4, overwrite=True)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return suder.load_backbone("toy", model=str(folder)).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scripted(monkeypatch, values: list[float]) -> None:
    """``selfeval/score`` reads ``values`` in order, one per evaluation (the selection logic under test, not the
    tiny model's noise)."""
    it = iter(values)
    monkeypatch.setattr(selfeval, "score", lambda now, base: next(it))


def _user_data(tmp_path: Path, prompts: int = 8, images: int = 8) -> tuple[Path, Path]:
    from suder.worlds import shapes

    texts = list(dict.fromkeys(shapes.sample_prompts(200, seed=5)))[:prompts]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(texts + texts[:1]) + "\n")  # a prompt twice: both copies go to one side
    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(shapes.sample_scenes(images, seed=6)):
        shapes.render(scene).save(folder / f"{i:02d}.png")
    (folder / "copy.png").write_bytes((folder / "00.png").read_bytes())  # the same image under another name
    return pfile, folder


# ------------------------------------------------------------------------------------------- the slice
def test_heldout_slice_is_removed_from_training(tmp_path, tiny_toy_path):
    """The held-out prompts and images (a duplicate prompt, an image copied under another name included) are not
    in the training pools, and a run's rollouts over several epochs of the pool never draw them."""
    pfile, folder = _user_data(tmp_path)
    cfg = resolve(model=tiny_toy_path, backbone="toy", prompts=str(pfile), images=str(folder),
                  output_dir=str(tmp_path / "run"), steps=3, eval_every=3, heldout=0.25, **TINY)
    trainer = Trainer(cfg)
    held = trainer.held
    assert len(held.prompts) == 2 and len(held.images) == 2  # round(0.25 * 8 distinct), round(0.25 * 9 files)
    assert not set(held.prompts) & set(trainer.pools["gen"].items)
    digests = {selfeval._digest(f) for f in held.images}
    assert not digests & {selfeval._digest(f) for f in trainer.pools["und"].items}
    seen_prompts, seen_images = set(), set()
    for step in range(3):  # 3 steps x 2 micro-batches x 2 prompts: every training prompt is drawn
        trainer.step(step)
        for r in trainer.last_rollouts:
            if r.direction == "gen":
                seen_prompts |= set(r.samples.prompts)
            else:
                seen_images |= {im.tobytes() for im in r.samples.images}
    assert seen_prompts == set(trainer.pools["gen"].items)
    assert not seen_prompts & set(held.prompts)
    assert not seen_images & {Image.open(f).convert("RGB").tobytes() for f in held.images}


def test_heldout_slice_is_the_same_for_every_seed(tmp_path):
    pfile, folder = _user_data(tmp_path, prompts=20)
    slices = [selfeval.heldout_split(resolve(backbone="toy", prompts=str(pfile), images=str(folder), seed=s,
                                             eval_every=1, heldout=0.1), {"gen": None, "und": None})[1]
              for s in (0, 1)]
    assert slices[0].prompts == slices[1].prompts and slices[0].images == slices[1].images


def test_heldout_files_replace_the_fraction_and_leave_nothing_held_out_in_training(tmp_path):
    pfile, folder = _user_data(tmp_path)
    held_file = tmp_path / "held.txt"
    held_file.write_text(pfile.read_text().splitlines()[0] + "\n")
    cfg = resolve(backbone="toy", prompts=str(pfile), images=str(folder), eval_every=1, heldout_prompts=str(held_file),
                  heldout_images=str(folder))
    with pytest.raises(suder.errors.DataError, match="Every image of .* is held out"):
        selfeval.heldout_split(cfg, {"gen": None, "und": None})
    cfg = resolve(backbone="toy", prompts=str(pfile), eval_every=1, strategy="gen", heldout_prompts=str(held_file))
    pools, held = selfeval.heldout_split(cfg, {"gen": None})
    assert held.prompts == [pfile.read_text().splitlines()[0]]
    assert held.prompts[0] not in pools["gen"].items and len(pools["gen"]) == 7  # both copies of it left out
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    (held_dir / "h.png").write_bytes((folder / "00.png").read_bytes())
    cfg = resolve(backbone="toy", images=str(folder), eval_every=1, strategy="und", heldout_images=str(held_dir))
    pools, held = selfeval.heldout_split(cfg, {"und": None})
    assert held.images == [held_dir / "h.png"]
    assert sorted(f.name for f in pools["und"].items) == [f"{i:02d}.png" for i in range(1, 8)]  # 00 and its copy out


def test_shapes_world_heldout_prompts_and_scenes_are_not_in_the_training_pools(tiny_toy_path, tmp_path):
    cfg = resolve(model=tiny_toy_path, backbone="toy", output_dir=str(tmp_path), eval_every=1, selfeval_num=64)
    from suder.data import image_pool, prompt_pool

    pools = {"gen": prompt_pool(None, cfg.seed), "und": image_pool(None, cfg.seed)}
    same, held = selfeval.heldout_split(cfg, pools)
    assert same == pools and len(held.prompts) == 64 and len(held.images) == 64
    assert not set(held.prompts) & set(pools["gen"].items) and not set(held.images) & set(pools["und"].items)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(select_final="best"), "select_final best needs the held-out self-evaluation"),
        (dict(guard_drop=0.5), "guard_drop needs the held-out self-evaluation"),
        (dict(eval_every=1, guard_drop=-1.0), "guard_drop must be a positive number"),
        (dict(eval_every=1, guard_lr_factor=0.0), r"guard_lr_factor must be in \(0, 1\]"),
        (dict(heldout=0.1), "ShapesWorld holds out its own"),
        (dict(eval_every=1, select_final="first"), "select_final must be one of last, best"),
        (dict(eval_every=1, prompts="p.txt", images="d"), "pass --heldout 0.05"),
    ],
)
def test_settings_that_cannot_work_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        resolve(backbone="toy", **kw)


# ------------------------------------------------------------------------------------------- the scorer
def test_self_score_is_the_frozen_bases_not_the_policys(tiny_toy):
    """``gen_frozen``/``und_frozen`` are the frozen base's rewards of the policy's samples, ``*_policy`` the
    policy's own: recomputed here from the samples with each model, and they differ once the policy has moved."""
    from suder.engine import Reference
    from suder.worlds import shapes

    base = tiny_toy
    policy = copy.deepcopy(base)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = resolve(backbone="toy", eval_every=1, selfeval_num=4)
    held = selfeval.HeldOut(prompts=shapes.sample_prompts(4, seed=3), images=shapes.sample_scenes(4, seed=3),
                            load=shapes.render)
    out = selfeval.self_evaluate(policy, policy, Reference(base), held, cfg)
    prompts = held.prompts
    for model, key in ((base, "gen_frozen"), (policy, "gen_policy")):
        want = model.logp_text_given_image(prompts, out["images"]).mean()
        assert torch.allclose(out[key], want, atol=1e-5), key
    pictures = held.pictures()
    caps = policy.sample_text(pictures, generator=torch.Generator().manual_seed(selfeval.SELF_EVAL_SEED + 1),
                              temperature=0.0)
    assert list(caps.texts) == out["captions"]
    for model, key in ((base, "und_frozen"), (policy, "und_policy")):
        want = (model.logp_image_given_text(pictures, caps, policy="cond").sum()
                + cfg.consensus_lambda * model.logp_text_given_image(caps, pictures).sum())
        assert torch.allclose(out[key], want, rtol=1e-5), key
    assert not torch.allclose(out["gen_frozen"], out["gen_policy"])


def test_the_run_scores_with_the_frozen_base_while_the_policy_trains(tiny_toy_path, tmp_path):
    """The default reward scorer is the policy, yet the self-evaluation keeps a frozen copy of the base: after
    training it still holds the base's weights while the policy's have moved."""
    cfg = resolve(model=tiny_toy_path, backbone="toy", output_dir=str(tmp_path), steps=2, eval_every=2, lr=1e-2,
                  **TINY)
    assert cfg.reward_scorer == "policy"
    trainer = Trainer(cfg)
    trainer.run()
    base = _weights(Path(tiny_toy_path))
    assert _same(trainer.reference.model.state_dict(), base)
    assert not _same(trainer.engines["policy"].backbone.state_dict(), base)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["selfeval/gen_gap"] == pytest.approx(row["selfeval/gen_policy"] - row["selfeval/gen_frozen"])
    assert row["selfeval/gen_gap"] != 0


# ------------------------------------------------------------------------------------------- selection
def test_select_final_best_keeps_the_best_steps_weights_and_the_last_beside(tiny_toy_path, tmp_path, monkeypatch):
    _scripted(monkeypatch, [1.0, 3.0, 2.0])
    res = suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path), steps=3, eval_every=1,
                      select_final="best", lr=1e-2, **{**TINY, "save_every": 1, "sample_every": 1})
    run = json.loads((tmp_path / "run.json").read_text())["selfeval"]
    assert (run["final_step"], run["last_step"], run["best_step"]) == (2, 3, 2)
    # final/'s model card says which step it holds and shows that step's samples, not the last step's
    from suder.hub import sample_grid

    assert "These are the weights of step 2 of 3" in (tmp_path / "final" / "README.md").read_text()
    shown = np.asarray(Image.open(tmp_path / "final" / "samples.png").convert("RGB"))
    assert np.array_equal(shown, np.asarray(sample_grid(tmp_path, 2)))
    assert not np.array_equal(shown, np.asarray(sample_grid(tmp_path)))
    assert _same(_weights(Path(res.final_model)), _weights(tmp_path / "checkpoints" / "step-000002" / "model"))
    assert not _same(_weights(tmp_path / "last"), _weights(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "selfeval.json").read_text()) == {"step": 2, "score": 3.0}
    assert not (tmp_path / "best").exists()  # moved, not copied


def test_suder_run_says_which_step_final_holds(tiny_toy_path, tmp_path, monkeypatch, capsys):
    """The user's path: `suder run --select-final best --eval-every 1` ends by saying which step final/ holds,
    the best and last self-scores and where the last weights are."""
    from suder.cli import main

    _scripted(monkeypatch, [1.0, 3.0, 2.0])
    args = ["run", "--model", str(tiny_toy_path), "--output-dir", str(tmp_path / "run"), "--steps", "3",
            "--eval-every", "1", "--select-final", "best", "--selfeval-num", "4", "--group-size", "4",
            "--gen.batch-size", "2", "--und.batch-size", "2", "--eval-num", "8", "--sample-every", "0",
            "--save-every", "1"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "Self-evaluation: final/ holds step 2 (select_final: best)" in out
    assert "best held-out self-score +3.000 at step 2, last +2.000" in out
    assert f"the last step's weights are in {tmp_path / 'run' / 'last'}" in out


def test_select_final_last_is_the_last_weights(tiny_toy_path, tmp_path, monkeypatch):
    _scripted(monkeypatch, [1.0, 3.0, 2.0])
    suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path), steps=3, eval_every=1, lr=1e-2, **TINY)
    run = json.loads((tmp_path / "run.json").read_text())["selfeval"]
    assert (run["final_step"], run["best_step"]) == (3, 2)
    assert not (tmp_path / "last").exists() and not (tmp_path / "best").exists()


def test_guard_stops_when_the_score_falls_below_its_best(tiny_toy_path, tmp_path, monkeypatch):
    _scripted(monkeypatch, [1.0, 0.8, 0.3, 2.0])
    res = suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path), steps=4, eval_every=1,
                      guard_drop=0.5, **TINY)
    run = json.loads((tmp_path / "run.json").read_text())
    assert res.stopped_early and run["steps"] == 3 and run["selfeval"]["stopped_at"] == 3


def test_guard_rollback_restores_the_best_weights_at_a_lower_rate(tiny_toy_path, tmp_path, monkeypatch):
    _scripted(monkeypatch, [1.0, 0.2, 0.9])
    seen = {}

    def callback(metrics):
        if metrics["step"] == 2:  # just after the rollback
            seen["weights"] = {k: v.clone() for k, v in trainer.engines["policy"].backbone.state_dict().items()}

    cfg = resolve(model=tiny_toy_path, backbone="toy", output_dir=str(tmp_path), steps=3, eval_every=1, lr=1e-2,
                  lr_schedule="constant", warmup_steps=0, guard_drop=0.5, guard_action="rollback",
                  guard_lr_factor=0.25, **TINY)
    trainer = Trainer(cfg, callback=callback)
    res = trainer.run()
    assert _same(seen["weights"], _weights(tmp_path / "best"))
    assert json.loads((tmp_path / "best" / "selfeval.json").read_text())["step"] == 1
    assert [m["lr"] for m in res.metrics] == pytest.approx([1e-2, 1e-2, 2.5e-3])
    run = json.loads((tmp_path / "run.json").read_text())["selfeval"]
    assert run["rollbacks"] == [{"step": 2, "score": 0.2, "to_step": 1}] and not res.stopped_early


def test_a_resumed_run_keeps_its_best_so_far(tiny_toy_path, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint (best at step 2) resumes; the later, lower scores do not replace
    the best, so final/ holds step 2's weights."""
    _scripted(monkeypatch, [1.0, 3.0, 2.0])
    kw = dict(model=tiny_toy_path, output_dir=str(tmp_path), steps=4, eval_every=1, select_final="best", lr=1e-2,
              **{**TINY, "save_every": 2})

    def crash(metrics):
        if metrics["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        suder.train("toy", callback=crash, **kw)
    step2 = _weights(tmp_path / "checkpoints" / "step-000002" / "model")
    _scripted(monkeypatch, [2.0, 2.5])
    suder.train("toy", resume=True, **{k: v for k, v in kw.items() if k != "overwrite"})
    run = json.loads((tmp_path / "run.json").read_text())["selfeval"]
    assert (run["final_step"], run["best_score"]) == (2, 3.0)
    assert _same(_weights(tmp_path / "final"), step2)


# ------------------------------------------------------------------------------------------- monitors
def test_image_statistics_of_known_images():
    black = Image.new("RGB", (16, 16), (0, 0, 0))
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    noise = Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    s = monitors.image_stats([black, red])
    assert s["brightness"] == pytest.approx(0.299 / 2)
    assert s["saturation"] == pytest.approx(0.5) and s["colour_entropy"] == 0 and s["uniform_images"] == 1
    n = monitors.image_stats([noise])
    assert n["uniform_images"] == 0 and n["colour_entropy"] > 5  # 64 colours at most: 6 bits
    assert monitors.caption_stats(["a red Circle", "a red square"]) == {"caption_words": 3.0, "caption_vocab": 4.0}


def test_identical_groups_counts_groups_whose_samples_are_all_the_same():
    from suder.protocol import ImageSamples, TextSamples

    tokens = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 5]])
    images = ImageSamples(prompts=["a"] * 4, tokens=tokens, logps=torch.zeros(2 * 2, 2), num_samples=2)
    assert monitors.identical_groups("gen", images, 2) == 0.5
    z = torch.zeros(4, 1)
    texts = TextSamples(texts=["x", "x", "x", "y"], tokens=z.long(), logps=z, mask=z.bool(), num_samples=2)
    assert monitors.identical_groups("und", texts, 2) == 0.5


def test_a_drift_warning_is_given_once_per_monitor():
    base = {"brightness": 0.4, "caption_words": 10.0}
    warned: list[str] = []
    with pytest.warns(monitors.DriftWarning, match="drift/brightness moved more than 0.15"):
        assert monitors.check({"drift/brightness": 0.1, "drift/caption_words": 12.0}, base, warned, 5) == [
            "brightness"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitors.check({"drift/brightness": 0.05}, base, warned, 6) == []
    with pytest.warns(monitors.DriftWarning, match="caption_words"):
        monitors.check({"drift/caption_words": 25.0}, base, warned, 7)
    assert warned == ["brightness", "caption_words"]


def test_identical_groups_warn_on_a_sustained_rise_over_the_runs_start():
    """A base that starts with many identical groups (a confident captioner) is not a drift, nor is one noisy
    step; the mean of the last 20 steps 0.25 above the first 20's (and above 0.5) is."""
    start = [{"drift/und_identical_groups": 0.6, "drift/gen_identical_groups": 0.0}] * 20
    warned: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitors.check_identical(start[:10] + [{"drift/und_identical_groups": 1.0}], warned, 11) == []
        noisy = start + start[:19] + [{"drift/und_identical_groups": 1.0, "drift/gen_identical_groups": 1.0}]
        assert monitors.check_identical(noisy, warned, 40) == []
    risen = start + [{"drift/und_identical_groups": 0.9, "drift/gen_identical_groups": 0.0}] * 20
    with pytest.warns(monitors.DriftWarning, match="und_identical_groups averaged over 20 steps is above 0.5"):
        assert monitors.check_identical(risen, warned, 40) == ["und_identical_groups"]


def test_drift_metrics_are_logged_every_step_and_at_evaluations(tiny_toy_path, tmp_path):
    suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path), steps=2, eval_every=2, **TINY)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("drift/gen_identical_groups" in r and "drift/und_identical_groups" in r for r in rows)
    assert {"drift/brightness", "drift/brightness_base", "drift/caption_vocab", "selfeval/score"} <= set(rows[1])
    assert "selfeval/score" not in rows[0]
    base = json.loads((tmp_path / "selfeval.json").read_text())
    assert rows[1]["drift/brightness_base"] == base["drift"]["brightness"]
    assert base["summary"]["gen_gap"] == 0 and base["heldout"] == {"prompts": 4, "images": 4}
    from suder.report import render

    page = render(tmp_path)
    assert 'id="group-selfeval"' in page and 'id="group-drift"' in page and "final/ = step <b>2</b>" in page


@pytest.mark.slow
def test_two_processes_log_and_decide_the_same(tiny_toy_path, tmp_path):
    """Rank 0 evaluates; every rank gets the same self-evaluation metrics, and both save best/ and final/."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = root / "tests" / "distributed_scripts" / "selfeval.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           str(script), tiny_toy_path, str(tmp_path)]
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert all("selfeval/score" in m and "drift/brightness" in m for m in ranks[0]["metrics"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["num_processes"] == 2 and run["selfeval"]["final_step"] == run["selfeval"]["best_step"]


# ------------------------------------------------------------------------------------------- benchmarks/selection.py
def _selection():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "selection.py"
    spec = importlib.util.spec_from_file_location("selection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_by_hand():
    sel = _selection()
    assert sel.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert sel.spearman([1, 2, 2, 4], [10, 20, 20, 40]) == pytest.approx(1.0)  # ties share their rank
    assert math.isnan(sel.spearman([1, 2], [3, 3]))


def test_selection_benchmark_reproduces_the_runs_self_scores(tiny_toy_path, tmp_path):
    """On a tiny run with a checkpoint every step, the tool's self-score of each checkpoint is the one the run
    logged at that step, its choices follow its own numbers, and it writes the JSON."""
    run = tmp_path / "run"
    suder.train("toy", model=tiny_toy_path, output_dir=str(run), steps=3, eval_every=1, lr=1e-2,
                **{**TINY, "save_every": 1})
    result = _selection().main([str(run), "--eval-num", "8", "--out", str(tmp_path / "sel.json")])
    logged = {json.loads(x)["step"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    rows = result["checkpoints"]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["model"] == str(run / "final")
    for r in rows:
        assert r["self_score"] == pytest.approx(logged[r["step"]]["selfeval/score"], rel=1e-4, abs=1e-6)
    assert result["label_free_step"] == max(rows, key=lambda r: r["self_score"])["step"]
    chosen = next(r for r in rows if r["step"] == result["label_free_step"])
    assert result["judge_gain_label_free_vs_last"] == pytest.approx(chosen["judge"] - rows[-1]["judge"])
    assert result["within_1_point"] == (max(r["judge"] for r in rows) - chosen["judge"] <= 1.0)
    assert json.loads((tmp_path / "sel.json").read_text())["label_free_step"] == result["label_free_step"]


def test_the_slice_is_held_out_even_while_no_evaluation_runs(tmp_path):
    """heldout without eval_every still keeps the slice out of training (no self-evaluation yet), so a resumed run
    that turns eval_every on trains on the same data as before."""
    pfile, folder = _user_data(tmp_path)
    pools = {"gen": None, "und": None}
    off = selfeval.heldout_split(resolve(backbone="toy", prompts=str(pfile), images=str(folder), heldout=0.25), pools)
    on = selfeval.heldout_split(resolve(backbone="toy", prompts=str(pfile), images=str(folder), heldout=0.25,
                                        eval_every=5), pools)
    assert off[1] is None and on[1] is not None
    assert off[0]["gen"].items == on[0]["gen"].items and off[0]["und"].items == on[0]["und"].items
    assert not set(on[1].prompts) & set(off[0]["gen"].items)
