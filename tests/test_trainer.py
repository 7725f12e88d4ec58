"""The DSR trainer: strategies, algorithms, run outputs, resume, grad-accum equivalence, rewards, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import suder
from suder import plugins, rewards
from suder.config import resolve
from suder.errors import ConfigError, DataError, TrainingError
from suder.rollout import ALGORITHMS, Rollout, sample_group
from suder.worlds import shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=2, group_size=4, gen_batch_size=2, und_batch_size=2, eval_num=8, sample_every=1, save_every=0)


def _train(path, out, **kw):
    return suder.train("toy", model=path, output_dir=str(out), **(TINY | kw))


@pytest.mark.parametrize("algo", ["simpo", "grpo"])
@pytest.mark.parametrize("strategy", ["unified", "gen", "und", "separate"])
def test_every_strategy_and_algo_runs(tiny_toy_path, tmp_path, algo, strategy):
    res = _train(tiny_toy_path, tmp_path, algo=algo, strategy=strategy, switch_every=1)
    assert len(res.metrics) == 2
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["base_model"] == tiny_toy_path and run["final_model"] == str(tmp_path / "final")
    assert set(run["before"]) >= ({"t2i"} if strategy == "gen" else set()) and run["after"]
    if strategy == "separate":
        assert (tmp_path / "final" / "gen" / "model.safetensors").exists()
        assert (tmp_path / "final" / "und" / "model.safetensors").exists()
        assert "gen/loss" in res.metrics[0] and "und/loss" in res.metrics[1]  # they alternate
    else:
        suder.load_backbone("toy", model=res.final_model)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert "NaN" not in lines[0]


def test_every_trainable_parameter_changes_after_a_step(tiny_toy_path, tmp_path):
    before = suder.load_backbone("toy", model=tiny_toy_path).state_dict()
    res = _train(tiny_toy_path, tmp_path, steps=1, sample_every=0, lr=1e-3)
    after = suder.load_backbone("toy", model=res.final_model).state_dict()
    for name, p in before.items():
        if name == "codebook":
            assert torch.equal(p, after[name])
        else:
            assert not torch.equal(p, after[name]), f"{name} did not change"


def test_outputs_config_grids_checkpoints(tiny_toy_path, tmp_path):
    _train(tiny_toy_path, tmp_path, steps=3, save_every=2)
    cfg = (tmp_path / "config.yaml").read_text()
    assert "algo: simpo" in cfg and "cfg_policy: guided" in cfg
    assert (tmp_path / "samples" / "step-000001-gen.png").exists()
    assert (tmp_path / "samples" / "step-000001-und.png").exists()
    ck = tmp_path / "checkpoints" / "step-000002"
    assert (ck / "model" / "model.safetensors").exists() and (ck / "state").is_dir()
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_resume_gives_the_same_losses(tiny_toy_path, tmp_path):
    full = _train(tiny_toy_path, tmp_path / "a", steps=4, save_every=2, sample_every=0)

    class Stop(Exception):
        pass

    def crash(m):
        if m["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        suder.train(
            "toy",
            model=tiny_toy_path,
            output_dir=str(tmp_path / "b"),
            callback=crash,
            **(TINY | dict(steps=4, save_every=2, sample_every=0)),
        )
    resumed = _train(tiny_toy_path, tmp_path / "b", steps=4, save_every=2, sample_every=0, resume=True)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]  # the whole run's history, each step once
    for a, b in zip(full.metrics, resumed.metrics):
        for key in ("gen/loss", "und/loss", "gen/reward_mean", "und/reward_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


@pytest.mark.parametrize("algo", ["simpo", "grpo", "simpo-all-pairs"])
def test_grad_accumulation_equals_one_big_batch(tiny_toy_path, algo):
    """Two micro-batches with the whole batch's normalizer give the same update as one batch."""
    from suder.trainer import Trainer

    pairs = "all" if algo == "simpo-all-pairs" else "best-worst"
    algo = algo.split("-")[0]
    cfg = resolve(
        model=tiny_toy_path,
        algo=algo,
        simpo_gen_pairs=pairs,
        group_size=4,
        gen_batch_size=4,
        und_batch_size=4,
        output_dir="unused",
        steps=1,
        warmup_steps=1,
        grpo_beta=0.0,
    )
    results = []
    for split in (1, 2):
        torch.manual_seed(0)
        tr = Trainer(cfg)
        policy = tr.engines["policy"].backbone
        gen = torch.Generator().manual_seed(3)
        prompts = ["a red square", "two blue circles", "a white triangle", "a green circle above a red square"]
        samples = sample_group(policy, "gen", prompts, cfg, gen)
        r = rewards.dsr_generation(rewards.RewardContext(scorer=policy), samples)
        algo_obj = ALGORITHMS[algo]
        per = 4 // split
        micro = []
        for m in range(split):
            rows = list(range(m * per * 4, (m + 1) * per * 4))
            roll = Rollout("gen", samples.select(rows), r[rows], 4)
            micro.append({("policy", "gen"): algo_obj.prepare(policy, roll, cfg, None, [0])[0]})
        norm = {
            ("policy", "gen"): {
                "count": sum(b[("policy", "gen")].count for b in micro),
                "tokens": sum(b[("policy", "gen")].tokens for b in micro),
            }
        }
        tr.update("policy", micro, norm)  # the algorithm is cfg.algo_for("gen")
        results.append([p.detach().clone() for p in policy.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_rewards_batched_equal_one_by_one(tiny_toy):
    gen = torch.Generator().manual_seed(0)
    s = tiny_toy.sample_image(["a red square", "three blue triangles"], num_samples=4, generator=gen)
    ctx = rewards.RewardContext(scorer=tiny_toy, reference=tiny_toy)
    batched = rewards.dsr_generation(ctx, s)
    single = torch.cat([rewards.dsr_generation(ctx, s.select([i])) for i in range(len(s))])
    assert torch.allclose(batched, single, atol=1e-5)
    images = [shapes.render(x) for x in shapes.sample_scenes(2, seed=1)]
    t = tiny_toy.sample_text(images, num_samples=4, generator=gen)
    for fn in (rewards.dsr_understanding, rewards.dsr_consensus):
        batched = fn(ctx, t)
        single = torch.cat([fn(ctx, t.select([i])) for i in range(len(t))])
        assert torch.allclose(batched, single, atol=1e-4), fn.__name__


def test_consensus_is_image_term_plus_lambda_caption_term(tiny_toy):
    images = [shapes.render(x) for x in shapes.sample_scenes(2, seed=1)]
    t = tiny_toy.sample_text(images, num_samples=3, generator=torch.Generator().manual_seed(1))
    ctx = rewards.RewardContext(scorer=tiny_toy, reference=tiny_toy)
    image = tiny_toy.logp_image_given_text(t.images, t, policy="cond").sum()
    caption = tiny_toy.logp_text_given_image(t, t.images).sum()
    got = rewards.dsr_consensus(ctx, t, lam=0.5)
    assert torch.allclose(got, image + 0.5 * caption, atol=1e-4)


def _und_pairs_run(tiny_toy_path, out_root, pairs, *flags):
    """`suder run --simpo-und-pairs PAIRS [flags]` on the tiny toy: checks config.yaml, returns the metrics rows."""
    from suder import cli

    out = out_root / "-".join((pairs, *flags))
    args = ["run", "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "2", "--group-size", "4"]
    args += ["--gen-batch-size", "2", "--und-batch-size", "4", "--eval-num", "4", "--save-every", "0"]
    args += ["--text-temperature", "2.0", "--simpo-und-pairs", pairs, *flags]
    assert cli.main(args) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["und"]["simpo_pairs"] == pairs
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_all_pairs_option_reaches_the_update(tiny_toy_path, tmp_path):
    """`suder run --simpo-und-pairs all`: written to config.yaml, the understanding batches hold every ordered pair
    of a group (metric und/pairs_per_group > 1 where best vs worst has exactly 1), generation stays best vs worst,
    and the update differs from a best-vs-worst run of the same rollouts."""
    runs = {pairs: _und_pairs_run(tiny_toy_path, tmp_path, pairs) for pairs in ("best-worst", "all")}
    first = runs["all"][0]
    assert first["und/pairs_per_group"] > 1 and "gen/pairs_per_group" not in first
    assert first["und/simpo/pairs"] > runs["best-worst"][0]["und/simpo/pairs"]
    # the same rollouts at step 1 (nothing trained yet), a different understanding loss
    assert first["und/reward_mean"] == runs["best-worst"][0]["und/reward_mean"]
    assert first["und/loss"] != runs["best-worst"][0]["und/loss"]


def test_best_likeliest_pairs_the_best_with_the_policys_likeliest_loser(tiny_toy):
    """simpo_und_pairs best-likeliest: each group's pair is its best caption by reward against the caption the policy
    finds likeliest (teacher-forced mean log-prob, computed here independently of the sampler) among those with a
    lower reward; the monitor says how often that is the worst one."""
    pics = [shapes.render(s) for s in shapes.sample_scenes(3, seed=5)]
    t = tiny_toy.sample_text(pics, num_samples=4, generator=torch.Generator().manual_seed(2), temperature=2.0)
    forced = tiny_toy.logp_text_given_image(t, t.images).mean()
    # the last caption of each group is best; among the others the likelier one has the higher reward, so the
    # likeliest loser is never the worst (unless two tie)
    r = forced.detach().clone().view(3, 4)
    r[:, 3] = 10.0
    r = r.flatten()
    cfg = resolve(group_size=4, simpo_und_pairs="best-likeliest")
    batch, metrics = ALGORITHMS["simpo"].prepare(tiny_toy, Rollout("und", t, r, 4), cfg, None, [0])
    want = [4 * b + int(forced[4 * b : 4 * b + 3].argmax()) for b in range(3)]
    keep = [b for b in range(3) if t.texts[4 * b + 3] != t.texts[want[b]]]  # identical pairs are skipped
    assert all(r[w] > r.view(3, 4)[w // 4].min() for w in want)
    assert batch.count == len(keep) > 0
    assert batch.samples.texts == [t.texts[4 * b + 3] for b in keep] + [t.texts[want[b]] for b in keep]
    assert metrics["und/rejected_is_worst"] == 0.0
    assert "und/rejected_is_worst" not in ALGORITHMS["simpo"].prepare(
        tiny_toy, Rollout("und", t, r, 4), resolve(group_size=4), None, [0]
    )[1]


def test_min_gap_keeps_close_rewards_out_of_pairs(tiny_toy):
    """simpo_und_min_gap: a sample within the gap of the best is a tie, never the rejected one; a group whose rewards
    all lie within it gives no pair (counted); the generation direction keeps its own gap (0)."""
    pics = [shapes.render(s) for s in shapes.sample_scenes(3, seed=5)]
    t = tiny_toy.sample_text(pics, num_samples=4, generator=torch.Generator().manual_seed(2), temperature=2.0)
    forced = tiny_toy.logp_text_given_image(t, t.images).mean().view(3, 4)
    likeliest = forced[:, :3].argmax(-1)  # among the three losers of each group
    r = torch.zeros(3, 4)
    r[:, 3] = 1.0  # the best
    r[torch.arange(3), likeliest] = 0.8  # the likeliest loser: 0.2 below the best
    r[2] = torch.tensor([0.9, 0.95, 0.7, 1.0])  # group 2: all within 0.5 of its best
    r = r.flatten()
    prepare = ALGORITHMS["simpo"].prepare

    def pairs(**kw):
        batch, metrics = prepare(tiny_toy, Rollout("und", t, r, 4), resolve(group_size=4, **kw), None, [0])
        n = batch.count
        return list(zip(batch.samples.texts[:n], batch.samples.texts[n:])), metrics

    def rows(b, j):
        return t.texts[4 * b + 3], t.texts[4 * b + j]

    second = forced[:, :3].masked_fill(torch.nn.functional.one_hot(likeliest, 3).bool(), -1e9).argmax(-1)
    got, _ = pairs(simpo_und_pairs="best-likeliest")
    want = [rows(b, int(likeliest[b])) for b in range(3)]
    assert got == [p for p in want if p[0] != p[1]]
    got, metrics = pairs(simpo_und_pairs="best-likeliest", simpo_und_min_gap=0.5)
    want = [rows(b, int(second[b])) for b in range(2)]  # the likeliest loser is a tie now; group 2 has no pair
    assert got == [p for p in want if p[0] != p[1]] and metrics["und/groups_within_gap"] == 1.0
    got, metrics = pairs(simpo_und_min_gap=0.5)  # best vs worst: only group 2 drops out
    assert len(got) == len(pairs()[0]) - 1 and metrics["und/groups_within_gap"] == 1.0
    def all_pairs(gap):  # every ordered pair of a group's distinct captions whose rewards differ by more than gap
        n = 0
        for b in range(3):
            first = {}
            for j in range(4):
                first.setdefault(t.texts[4 * b + j], float(r[4 * b + j]))
            n += sum(x - y > gap for x in first.values() for y in first.values())
        return n

    batch, _ = prepare(tiny_toy, Rollout("und", t, r, 4), resolve(group_size=4, simpo_und_pairs="all"), None, [0])
    assert len(batch.pairs[0]) == all_pairs(1e-6)
    batch, _ = prepare(
        tiny_toy, Rollout("und", t, r, 4), resolve(group_size=4, simpo_und_pairs="all", simpo_und_min_gap=0.5),
        None, [0],
    )
    assert len(batch.pairs[0]) == all_pairs(0.5) < all_pairs(1e-6)
    _, metrics = pairs(simpo_gen_min_gap=0.5)  # the other direction's gap does not apply
    assert "und/groups_within_gap" not in metrics
    with pytest.raises(ConfigError, match="und.simpo_min_gap must be a number >= 0"):
        resolve(simpo_und_min_gap=-1.0)


def test_min_gap_from_the_cli(tiny_toy_path, tmp_path):
    """`--simpo-und-min-gap` reaches config.yaml and the update: a gap wider than any reward spread leaves every
    caption group without a pair (counted) while images still train."""
    rows = _und_pairs_run(tiny_toy_path, tmp_path, "best-likeliest", "--simpo-und-min-gap", "1e9")
    config = (tmp_path / "best-likeliest---simpo-und-min-gap-1e9" / "config.yaml").read_text()
    saved = yaml.safe_load(config)
    assert (saved["und"]["simpo_min_gap"], saved["gen"]["simpo_min_gap"]) == (1e9, 0.0)
    for row in rows:
        assert row["und/groups_within_gap"] == row["und/groups"] and "und/simpo/pairs" not in row
        assert row["gen/simpo/pairs"] > 0


def test_best_likeliest_from_the_cli(tiny_toy_path, tmp_path):
    """`suder run --simpo-und-pairs best-likeliest` reaches config.yaml and the update: one pair per group as with
    best vs worst, its monitor is logged, and on the same first rollouts some rejected caption is not the worst,
    so the loss differs from best vs worst's."""
    runs = {pairs: _und_pairs_run(tiny_toy_path, tmp_path, pairs) for pairs in ("best-worst", "best-likeliest")}
    first, plain = runs["best-likeliest"][0], runs["best-worst"][0]
    assert 0.0 <= first["und/rejected_is_worst"] <= 1.0 and "gen/rejected_is_worst" not in first
    assert first["und/reward_mean"] == plain["und/reward_mean"]
    assert first["und/simpo/pairs"] <= first["und/groups"]
    assert first["und/rejected_is_worst"] < 1.0 and first["und/loss"] != plain["und/loss"]


def test_zero_variance_groups_are_skipped_and_counted(tiny_toy):
    s = tiny_toy.sample_image(
        ["a red square", "a blue circle"], num_samples=4, generator=torch.Generator().manual_seed(0)
    )
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0])
    cfg = resolve(algo="grpo", group_size=4, grpo_beta=0.0)
    batch, metrics = ALGORITHMS["grpo"].prepare(tiny_toy, Rollout("gen", s, r, 4), cfg, None, [0])
    assert batch.count == 4 and metrics["gen/groups_skipped"] == 1.0
    batch, metrics = ALGORITHMS["simpo"].prepare(
        tiny_toy, Rollout("gen", s, r, 4), resolve(group_size=4), None, [0]
    )
    assert batch.count == 1 and metrics["gen/groups_skipped"] == 1.0
    assert batch.samples.prompts == ["a blue circle", "a blue circle"]


def test_grpo_fails_loudly_when_first_ratio_is_not_one(tiny_toy_path, tmp_path, monkeypatch):
    from suder.backbones.toy import ToyUnifiedLM

    original = ToyUnifiedLM.logp_image_given_text

    def noisy(self, images, texts, **options):
        lp = original(self, images, texts, **options)
        if torch.is_grad_enabled():
            lp.values = lp.values + 0.01
        return lp

    monkeypatch.setattr(ToyUnifiedLM, "logp_image_given_text", noisy)
    with pytest.raises(TrainingError, match="importance ratio is not 1"):
        _train(tiny_toy_path, tmp_path, algo="grpo", strategy="gen", steps=1)


def test_plugin_reward_needs_no_trainer_change(tiny_toy_path, tmp_path):
    seen = {}

    class LengthReward:
        @suder.hookimpl
        def register_rewards(self, register):
            def factory(direction, **options):
                def reward(ctx, samples):
                    seen["n"] = len(samples)
                    return torch.tensor([-float(len(t.split())) for t in samples.texts])

                return reward

            register("brevity", factory, ("und",), "shorter is better")

    plugins.register_plugin(LengthReward(), name="brevity-plugin")
    try:
        _train(tiny_toy_path, tmp_path, strategy="und", und_reward="brevity", steps=1)
    finally:
        plugins.unregister_plugin("brevity-plugin")
    assert seen["n"] == 2 * 4


def test_bad_inputs_are_one_line_errors(tiny_toy_path, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="has no prompts"):
        _train(tiny_toy_path, tmp_path / "r", prompts=str(empty), strategy="gen")
    with pytest.raises(DataError, match="does not exist"):
        _train(tiny_toy_path, tmp_path / "r", images=str(tmp_path / "missing"), strategy="und")
    with pytest.raises(ConfigError, match="Did you mean 'group_size'"):
        _train(tiny_toy_path, tmp_path / "r", groupsize=4)
    with pytest.raises(ConfigError, match="does not score the gen direction"):
        _train(tiny_toy_path, tmp_path / "r", gen_reward="dsr-consensus")
    proc = subprocess.run([sys.executable, "-m", "suder", "run", "--lrr", "1e-4"], capture_output=True, text=True)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Did you mean '--lr'" in lines[0], proc.stderr


def test_custom_data_files(tiny_toy_path, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red square"}\n{"prompt": "two blue circles"}\n')
    shapes.export(3, 0, tmp_path / "imgs")
    res = _train(tiny_toy_path, tmp_path / "r", prompts=str(prompts), images=str(tmp_path / "imgs"))
    assert res.before == {} and len(res.metrics) == 2  # no judge on user data
    assert "gen/judge_acc" not in res.metrics[0]


@pytest.mark.slow
def test_two_processes_hold_identical_weights(tiny_toy_path, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): after 2 DDP steps both ranks hold the same weights."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch, suder, torch.distributed as dist\n"
        "from suder.trainer import Trainer\nfrom suder.config import resolve\n"
        f"cfg = resolve(None, None, backbone='toy', model={tiny_toy_path!r}, output_dir={str(tmp_path / 'run')!r},"
        " steps=2, group_size=4, gen_batch_size=2, und_batch_size=2, sample_every=0, save_every=0)\n"
        "tr = Trainer(cfg)\nfor step in range(2):\n    m = tr.step(step)\n"
        "vec = torch.cat([p.detach().flatten() for p in tr.engines['policy'].backbone.parameters()])\n"
        "gathered = [torch.zeros_like(vec) for _ in range(2)]\ndist.all_gather(gathered, vec)\n"
        "assert tr.acc.num_processes == 2\n"
        "assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()\n"
        "base = torch.cat([p.flatten() for p in suder.load_backbone('toy', model=cfg.model).parameters()])\n"
        "assert not torch.equal(vec, base)\nprint('RANK_OK', dist.get_rank())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RANK_OK") == 2


def test_early_stopping_on_a_held_out_judged_slice(tiny_toy_path, tmp_path):
    """With a learning rate too small to change anything, the held-out score never improves: patience 1 stops
    the run at the second evaluation."""
    res = _train(
        tiny_toy_path,
        tmp_path,
        steps=5,
        lr=1e-12,
        eval_every=1,
        early_stopping_patience=1,
        early_stopping_num=8,
        sample_every=0,
    )
    assert res.stopped_early and len(res.metrics) == 2
    held = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "heldout/t2i" in x]
    assert [h["step"] for h in held] == [1, 2]
    assert json.loads((tmp_path / "run.json").read_text())["stopped_early"] is True


def test_training_guidance_scale_is_stored_with_the_model(tiny_toy_path, tmp_path):
    res = _train(tiny_toy_path, tmp_path, steps=1, strategy="gen", guidance_scale=2.0, sample_every=0)
    assert suder.load_backbone("toy", model=res.final_model).config.guidance_scale == 2.0
    assert json.loads((tmp_path / "run.json").read_text())["guidance_scale"] == 2.0


def test_simpo_nll_weight_reaches_the_loss_from_the_cli(tiny_toy_path, tmp_path):
    """`suder run --simpo-nll-weight 1`: in config.yaml, the `*/simpo/nll` metric is logged, and the first step's
    losses exceed plain SimPO's on the same rollouts by exactly the chosen samples' mean NLL."""
    from suder import cli

    runs = {}
    for weight in ("0", "1"):
        out = tmp_path / weight
        args = ["run", "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "1", "--group-size", "4"]
        args += ["--gen-batch-size", "2", "--und-batch-size", "2", "--eval-num", "4", "--sample-every", "0"]
        assert cli.main(args + ["--simpo-nll-weight", weight]) == 0
        assert f"simpo_nll_weight: {float(weight)}" in (out / "config.yaml").read_text()
        runs[weight] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    plain, nll = runs["0"], runs["1"]
    for d in ("gen", "und"):
        assert f"{d}/simpo/nll" in nll and f"{d}/simpo/nll" not in plain
        assert nll[f"{d}/reward_mean"] == plain[f"{d}/reward_mean"]  # the same rollouts
        assert nll[f"{d}/loss"] == pytest.approx(plain[f"{d}/loss"] + nll[f"{d}/simpo/nll"], rel=1e-5)


def test_a_run_at_another_scale_also_judges_the_base_at_its_own(tiny_toy_path, tmp_path, capsys, monkeypatch):
    """--guidance-scale other than the base's: before.json, run.json and the printed table also hold the base's
    T2I at its own scale, the very numbers a run at that scale starts from."""
    import suder.evaluate
    from suder import cli
    from suder.rollout import read_guidance

    judged, real = [], suder.evaluate.evaluate

    def spy(model, *a, **kw):  # the scale each judged evaluation samples at
        judged.append((read_guidance(model), kw.get("what", ("t2i", "caption"))))
        return real(model, *a, **kw)

    monkeypatch.setattr(suder.evaluate, "evaluate", spy)
    monkeypatch.setenv("COLUMNS", "200")
    own_scale = suder.load_backbone("toy", model=tiny_toy_path).config.guidance_scale
    args = ["run", "--model", tiny_toy_path, "--steps", "1", "--group-size", "2", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "8", "--sample-every", "0"]
    assert cli.main(args + ["--guidance-scale", "3", "--output-dir", str(tmp_path / "g3")]) == 0
    shown = capsys.readouterr().out
    own = json.loads((tmp_path / "g3" / "before.json").read_text())["base_guidance"]
    assert own["guidance_scale"] == own_scale != 3 and set(own) == {"guidance_scale", "t2i"}
    assert json.loads((tmp_path / "g3" / "run.json").read_text())["before"]["base_guidance"] == own
    assert f"base g={own_scale:g}" in shown
    assert cli.main(["report", str(tmp_path / "g3"), "--out", str(tmp_path / "page.html")]) == 0
    assert f"<td>base g={own_scale:g}</td>" in (tmp_path / "page.html").read_text()  # the report's row
    # before at 3, the base at its own scale (T2I only), then after at 3 again: the run's scale is restored
    assert judged == [(3.0, ("t2i", "caption")), (own_scale, ("t2i",)), (3.0, ("t2i", "caption"))]
    judged.clear()
    assert cli.main(args + ["--guidance-scale", str(own_scale), "--output-dir", str(tmp_path / "g1")]) == 0
    same = json.loads((tmp_path / "g1" / "before.json").read_text())
    assert "base_guidance" not in same and own["t2i"] == same["t2i"]
    assert "base g=" not in capsys.readouterr().out and len(judged) == 2


def test_a_separate_run_at_another_scale_judges_the_base_at_its_own(tiny_toy_path, tmp_path, monkeypatch):
    """strategy separate: the image model is judged at the base's own scale too, and after at the run's again."""
    import suder.evaluate
    from suder import cli
    from suder.rollout import read_guidance

    judged, real = [], suder.evaluate.evaluate

    def spy(model, *a, **kw):
        judged.append((read_guidance(model), kw.get("what")))
        return real(model, *a, **kw)

    monkeypatch.setattr(suder.evaluate, "evaluate", spy)
    own_scale = suder.load_backbone("toy", model=tiny_toy_path).config.guidance_scale
    out = tmp_path / "sep"
    args = ["run", "--model", tiny_toy_path, "--steps", "1", "--group-size", "2", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "8", "--sample-every", "0", "--strategy", "separate"]
    assert cli.main(args + ["--guidance-scale", "3", "--output-dir", str(out)]) == 0
    own = json.loads((out / "before.json").read_text())["base_guidance"]
    assert own["guidance_scale"] == own_scale != 3 and set(own) == {"guidance_scale", "t2i"}
    t2i = [scale for scale, what in judged if what == ("t2i",)]
    assert t2i == [3.0, own_scale, 3.0]


def test_greedy_caption_joins_every_group(tiny_toy):
    """text_greedy_in_group: row 0 of each group is the image's greedy caption, rows 1..G-1 are exactly what a
    plain call for G-1 samples draws with the same per-row generators (``row_generators``, which
    ``sample_group`` derives from its generator), and the joined rows (right-padded to one width) score
    teacher-forced as their own .logps."""
    from suder.rollout import policy_logps, row_generators

    pics = [shapes.render(s) for s in shapes.sample_scenes(6, seed=11)]
    cfg = resolve(steps=1, group_size=4, text_greedy_in_group=True)
    joined = sample_group(tiny_toy, "und", pics, cfg, torch.Generator().manual_seed(3))
    streams = row_generators(torch.Generator().manual_seed(3), 18, salt=1)
    sampled = tiny_toy.sample_text(pics, num_samples=3, generator=streams)
    greedy = tiny_toy.sample_text(pics, temperature=0.0)
    assert joined.num_samples == 4 and len(joined) == 24
    for i, picture in enumerate(pics):
        assert joined.texts[4 * i] == greedy.texts[i]
        assert joined.texts[4 * i + 1 : 4 * i + 4] == sampled.texts[3 * i : 3 * i + 3]
        assert all(im is picture for im in joined.images[4 * i : 4 * i + 4])
        for row, (source, r) in enumerate([(greedy, i)] + [(sampled, 3 * i + j) for j in range(3)]):
            width = int(source.mask[r].sum())
            assert torch.equal(joined.tokens[4 * i + row, :width], source.tokens[r, :width])
            assert int(joined.mask[4 * i + row].sum()) == width
    assert len(set(joined.texts)) > len(set(greedy.texts))  # the samples are not all greedy
    scored = policy_logps(tiny_toy, "und", joined, cfg)
    assert torch.equal(scored.mask, joined.mask)
    assert torch.allclose(scored.values, joined.logps, atol=1e-5)


def test_greedy_in_group_from_the_cli(tiny_toy_path, tmp_path):
    """`--text-greedy-in-group true` reaches config.yaml and the trainer: the greedy-caption monitors are logged
    (fractions of groups where the reward ranks the greedy caption best / worst, and its judge accuracy), and a run
    without the flag logs none of them."""
    from suder import cli

    args = ["run", "--model", tiny_toy_path, "--strategy", "und", "--steps", "2", "--group-size", "4"]
    args += ["--und-batch-size", "4", "--eval-num", "4", "--sample-every", "0"]
    logs = {}
    for name, flags in {"on": ["--text-greedy-in-group", "true"], "off": []}.items():
        out = tmp_path / name
        assert cli.main(args + flags + ["--output-dir", str(out)]) == 0
        logs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs[name + "_config"] = (out / "config.yaml").read_text()
    assert "text_greedy_in_group: true" in logs["on_config"]
    assert "text_greedy_in_group: false" in logs["off_config"]
    for row in logs["on"]:
        for key in ("und/greedy_chosen", "und/greedy_rejected", "und/greedy_judge_acc"):
            assert 0.0 <= row[key] <= 1.0
        assert row["und/greedy_chosen"] + row["und/greedy_rejected"] <= 1.0
    assert not any(k.startswith("und/greedy") for row in logs["off"] for k in row)


@pytest.mark.parametrize("algo", ["simpo", "grpo"])
def test_group_size_per_direction_from_the_cli(tiny_toy_path, tmp_path, monkeypatch, algo):
    """`--group-size 4 --und-group-size 3`: in config.yaml (the generation G resolved to 4), and what ran: 4 images
    per prompt and 3 captions per image sampled, rewarded and grouped, under SimPO and GRPO; G below 2 is a
    one-line error."""
    from suder import cli, trainer

    seen = []
    sample_group = trainer.sample_group

    def recording(model, direction, inputs, cfg, generator, chunks=None):
        samples = sample_group(model, direction, inputs, cfg, generator, chunks)
        seen.append((direction, len(inputs), len(samples), samples.num_samples))
        return samples

    def recorded(*args, **kwargs):
        rollout = Rollout(*args, **kwargs)
        seen.append((rollout.direction, "G", rollout.group_size, len(rollout.rewards)))
        return rollout

    monkeypatch.setattr(trainer, "sample_group", recording)
    monkeypatch.setattr(trainer, "Rollout", recorded)
    out = tmp_path / "run"
    args = ["run", "--model", tiny_toy_path, "--algo", algo, "--steps", "1", "--group-size", "4"]
    args += ["--und-group-size", "3", "--gen-batch-size", "2", "--und-batch-size", "2", "--eval-num", "4"]
    assert cli.main(args + ["--sample-every", "0", "--save-every", "0", "--output-dir", str(out)]) == 0
    config = (out / "config.yaml").read_text()
    saved = yaml.safe_load(config)
    assert (saved["group_size"], saved["gen"]["group_size"], saved["und"]["group_size"]) == (4, 4, 3)
    assert sorted(seen, key=str) == sorted(
        [("gen", 2, 8, 4), ("gen", "G", 4, 8), ("und", 2, 6, 3), ("und", "G", 3, 6)], key=str
    )
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["und/loss"] == metrics["und/loss"] and metrics["gen/loss"] == metrics["gen/loss"]  # not NaN
    with pytest.raises(ConfigError, match="und.group_size must be >= 2"):
        resolve(steps=1, und_group_size=1)


def test_algo_per_direction_from_the_cli(tiny_toy_path, tmp_path):
    """`--und-algo grpo`: in config.yaml; captions are trained by GRPO (its loss metrics, and a reference for its KL)
    and images by SimPO, whose first-step loss is the one a SimPO-only run gives on the very same rollouts."""
    from suder import cli

    args = ["run", "--model", tiny_toy_path, "--steps", "1", "--group-size", "4", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "4", "--sample-every", "0", "--save-every", "0"]
    runs = {}
    for name, flags in {"simpo": [], "split": ["--und-algo", "grpo"]}.items():
        out = tmp_path / name
        assert cli.main(args + flags + ["--output-dir", str(out)]) == 0
        runs[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        runs[name + "_config"] = (out / "config.yaml").read_text()
    split_config = yaml.safe_load(runs["split_config"])
    assert (split_config["gen"]["algo"], split_config["und"]["algo"]) == ("simpo", "grpo")
    split, simpo = runs["split"], runs["simpo"]
    assert "und/grpo/clip_frac" in split and "und/simpo/pairs" not in split
    assert "gen/simpo/pairs" in split and "gen/grpo/clip_frac" not in split
    assert split["und/grpo/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy at step 1
    assert split["gen/loss"] == pytest.approx(simpo["gen/loss"], rel=1e-6)
    assert split["und/reward_mean"] == simpo["und/reward_mean"] and split["und/loss"] != simpo["und/loss"]
    run = json.loads((tmp_path / "split" / "run.json").read_text())
    assert (run["algo"], run["gen_algo"], run["und_algo"]) == ("simpo", "simpo", "grpo")
    from suder.report import render

    assert "simpo (gen) / grpo (und)" in render(tmp_path / "split")
    assert "simpo (gen)" not in render(tmp_path / "simpo")


def test_reward_scorer_per_direction_from_the_cli(tiny_toy_path, tmp_path):
    """`--und-reward-scorer frozen`: in config.yaml, and at step 2 (the policy has moved) the caption rewards are the
    ones a fully frozen scorer gives and the image rewards the ones the policy gives, on the very same rollouts."""
    from suder import cli

    args = ["run", "--model", tiny_toy_path, "--steps", "2", "--group-size", "4", "--gen-batch-size", "2"]
    args += ["--und-batch-size", "2", "--eval-num", "4", "--sample-every", "0", "--lr", "1e-3"]
    runs = {}
    for name, flags in {
        "policy": ["--reward-scorer", "policy"],  # the toy's preset scores captions with the frozen base
        "frozen": ["--reward-scorer", "frozen"],
        "split": ["--und-reward-scorer", "frozen"],
    }.items():
        out = tmp_path / name
        assert cli.main(args + flags + ["--output-dir", str(out)]) == 0
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name + "_config"] = (out / "config.yaml").read_text()
    split, frozen = yaml.safe_load(runs["split_config"]), yaml.safe_load(runs["frozen_config"])
    assert (split["gen"]["reward_scorer"], split["und"]["reward_scorer"]) == ("policy", "frozen")
    assert frozen["gen"]["reward_scorer"] == "frozen"  # inherited from reward_scorer
    first = {name: runs[name][0] for name in ("policy", "frozen", "split")}
    assert first["policy"]["und/reward_mean"] == first["frozen"]["und/reward_mean"]  # one model still
    second = {name: runs[name][1] for name in ("policy", "frozen", "split")}
    for d in ("gen", "und"):
        assert second["policy"][f"{d}/reward_mean"] != second["frozen"][f"{d}/reward_mean"]  # the scorers differ now
    assert second["split"]["gen/reward_mean"] == pytest.approx(second["policy"]["gen/reward_mean"], rel=1e-6)
    assert second["split"]["und/reward_mean"] == pytest.approx(second["frozen"]["und/reward_mean"], rel=1e-6)
    with pytest.raises(ConfigError, match="und.reward_scorer"):
        resolve(und_reward_scorer="best")


def test_consensus_source_policy_reads_the_policy_not_the_scorer(tiny_toy, tiny_toy_path, tmp_path):
    """``consensus_source: policy``: the caption term is the policy's own likelihood, whoever scores the image term
    (before, it read the scorer: with ``und_reward_scorer: frozen`` it equalled ``reference``, and under
    ``separate`` it read the other model)."""
    import copy

    images = [shapes.render(x) for x in shapes.sample_scenes(2, seed=1)]
    t = tiny_toy.sample_text(images, num_samples=3, generator=torch.Generator().manual_seed(1))
    moved = copy.deepcopy(tiny_toy)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx = rewards.RewardContext(scorer=tiny_toy, reference=tiny_toy, policy=moved)
    image = tiny_toy.logp_image_given_text(t.images, t, policy="cond").sum()
    caption = moved.logp_text_given_image(t, t.images).sum()
    assert not torch.allclose(caption, tiny_toy.logp_text_given_image(t, t.images).sum(), atol=1e-2)
    got = rewards.dsr_consensus(ctx, t, lam=0.5, source="policy")
    assert torch.allclose(got, image + 0.5 * caption, atol=1e-4)
    # through the trainer: with a frozen caption scorer, ``policy`` and ``reference`` agree at step 1 (one model
    # still) and part at step 2 (the policy has moved)
    runs = {}
    for source in ("policy", "reference"):
        res = _train(
            tiny_toy_path, tmp_path / source, strategy="und", und_reward="dsr-consensus", consensus_source=source,
            und_reward_scorer="frozen", lr=1e-2, sample_every=0,
        )
        runs[source] = [m["und/reward_mean"] for m in res.metrics]
    assert runs["policy"][0] == pytest.approx(runs["reference"][0], rel=1e-6)
    assert runs["policy"][1] != runs["reference"][1]  # one model (bit for bit the same numbers) before the fix


def test_all_pairs_gate_on_the_pairs_not_on_best_vs_worst(tiny_toy):
    """``simpo_*_pairs: all`` counts repeated samples once (their first reward), so a group whose best and worst
    differ can still give no pair: tokens X Y X Y with rewards 0.5 0.5 1.0 0.0 (first X and first Y tie). Such a
    group gives no batch (before: kept by best vs worst, zero pairs, ZeroDivisionError in pairs_per_group); a
    group with pairs next to it trains alone."""
    gen = torch.Generator().manual_seed(0)
    s = tiny_toy.sample_image(["a red square", "a blue circle"], num_samples=2, generator=gen)
    assert not torch.equal(s.tokens[0], s.tokens[1]) and not torch.equal(s.tokens[2], s.tokens[3])
    tied = s.select([0, 1, 0, 1])
    r = torch.tensor([0.5, 0.5, 1.0, 0.0])
    cfg = resolve(group_size=4, simpo_gen_pairs="all")
    batch, metrics = ALGORITHMS["simpo"].prepare(tiny_toy, Rollout("gen", tied, r, 4), cfg, None, [0])
    assert batch is None and "gen/pairs_per_group" not in metrics
    both = s.select([0, 1, 0, 1, 2, 3, 2, 3])
    r2 = torch.cat([r, torch.tensor([1.0, 0.0, 0.5, 0.5])])
    batch, metrics = ALGORITHMS["simpo"].prepare(tiny_toy, Rollout("gen", both, r2, 4), cfg, None, [0])
    assert batch.count == 1 and metrics["gen/pairs_per_group"] == 1.0  # group 2: rows 4 > 5


def test_grpo_inner_iterations_count_a_rollouts_tokens_once(tiny_toy_path, tmp_path):
    """With ``grpo_iterations: 2`` the step's ``grpo/tokens`` and ``groups`` are the rollout's (before: tokens summed
    over the inner iterations, 1,024 reported for 512), and the means stay means (the first iteration's ratio is
    exactly 1, the second's near it; each iteration reports the KL over the same tokens)."""
    runs = {}
    for iterations in (1, 2):
        res = _train(
            tiny_toy_path, tmp_path / str(iterations), algo="grpo", strategy="gen", steps=1, grpo_iterations=iterations,
            sample_every=0,
        )
        runs[iterations] = res.metrics[0]
    one, two = runs[1], runs[2]
    assert one["gen/grpo/tokens"] > 0 and two["gen/grpo/tokens"] == one["gen/grpo/tokens"]
    assert two["gen/groups"] == one["gen/groups"] and two["optimizer_steps"] == 2
    assert one["gen/grpo/ratio_mean"] == 1.0 and two["gen/grpo/ratio_mean"] == pytest.approx(1.0, abs=0.05)
