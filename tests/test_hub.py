"""Model cards and the Hub: the card a run writes (read back with huggingface_hub's own ModelCard), the command it
names, its base model and license, and every upload call up to the network (HfApi replaced by a recorder)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from suder import cli, hub
from suder.config import resolve
from suder.errors import ConfigError, HubError
from suder.outputs import config_yaml
from suder.run_options import parse_run

REPO = "someone/toy-dsr"


class FakeApi:
    """Stands in for ``huggingface_hub.HfApi``: records each call and what the uploaded folder held."""

    calls: list[tuple[str, tuple, dict]] = []
    uploaded: dict[str, str] = {}
    fail: Exception | None = None

    def __init__(self, token=None, **kw):
        FakeApi.calls.append(("init", (), {"token": token, **kw}))

    def create_repo(self, *args, **kw):
        FakeApi.calls.append(("create_repo", args, kw))
        return f"https://huggingface.co/{args[0]}"

    def create_branch(self, *args, **kw):
        FakeApi.calls.append(("create_branch", args, kw))

    def upload_folder(self, **kw):
        if FakeApi.fail is not None:
            raise FakeApi.fail
        FakeApi.calls.append(("upload_folder", (), kw))
        FakeApi.uploaded = {p.name: p.read_text() for p in Path(kw["folder_path"]).glob("*.md")}
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc", commit_message=kw["commit_message"],
            commit_description="", oid="abc",
        )


def _online(mp: pytest.MonkeyPatch, token: str | None = "hf_test") -> None:
    """A machine with the network and a token, whose Hub is the recorder."""
    FakeApi.calls, FakeApi.uploaded, FakeApi.fail = [], {}, None
    mp.setattr(huggingface_hub, "HfApi", FakeApi)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    mp.setattr(huggingface_hub, "get_token", lambda: token)


def _calls(name: str) -> list[tuple[tuple, dict]]:
    return [(a, kw) for n, a, kw in FakeApi.calls if n == name]


@pytest.fixture(scope="module")
def pushed_run(tiny_toy_path, tmp_path_factory):
    """One real tiny run through the CLI, with checkpoints, sample grids and push_to_hub into the recorder."""
    out = tmp_path_factory.mktemp("hub") / "run"
    argv = ["run", "--model", tiny_toy_path, "--output-dir", str(out), "--steps", "2", "--group-size", "4",
            "--gen.batch-size", "2", "--und.batch-size", "2", "--eval-num", "8", "--save-every", "1",
            "--sample-every", "1", "--lr", "1e-5", "--push-to-hub", "--hub-repo-id", REPO, "--hub-private"]
    with pytest.MonkeyPatch.context() as mp:
        _online(mp)
        assert cli.main(argv) == 0
    return out, list(FakeApi.calls), dict(FakeApi.uploaded), argv


# ------------------------------------------------------------------------------------------ the card of a run
def test_a_run_writes_a_hub_card_in_final_and_each_checkpoint(pushed_run):
    out, _, _, _ = pushed_run
    card = ModelCard.load(out / "final" / "README.md")  # huggingface_hub parses the metadata and the text
    assert card.data.base_model is None  # --model was a local folder: on no Hub
    assert card.data.library_name == "suder" and card.data.pipeline_tag == "any-to-any"
    assert card.data.model_name == "toy-dsr" and card.text.startswith("\n# Model Card for toy-dsr\n")
    assert {"suder", "dual-self-rewards", "simpo", "toy", "shapes-world", "text-to-image"} <= set(card.data.tags)
    assert card.data.license is None and "License: not stated" in card.text  # the tiny base has no card
    run = json.loads((out / "run.json").read_text())
    for label in ("before", "after"):  # the judge table is run.json's, in %
        row = next(line for line in card.text.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {100 * run[label]['t2i']['overall']:.1f} |" in row, row
    change = 100 * (run["after"]["caption_greedy"]["overall"] - run["before"]["caption_greedy"]["overall"])
    assert next(line for line in card.text.splitlines() if line.startswith("| change |")).endswith(f"{change:+.1f} |")
    assert f"suder.load_backbone(\"toy\", model=snapshot_download(\"{REPO}\"))" in card.text  # pushed: its repo
    grid = Image.open(out / "final" / "samples.png")
    gen, und = Image.open(out / "samples" / "step-000002-gen.png"), Image.open(out / "samples" / "step-000002-und.png")
    assert grid.size == (max(gen.width, und.width), 2 * max(gen.height, und.height))  # the last step's two grids
    assert grid.crop((0, 0, *gen.size)).tobytes() == gen.convert("RGB").tobytes()
    assert "![Samples at step 2](samples.png)" in card.text

    ckpt = ModelCard.load(out / "checkpoints" / "step-000001" / "model" / "README.md")
    assert "checkpoint at step 1" in ckpt.text and "| before |" not in ckpt.text  # lighter: no after-table
    assert "![Samples at step 1](samples.png)" in ckpt.text
    assert (out / "checkpoints" / "step-000001" / "model" / "samples.png").is_file()


def test_the_cards_command_makes_the_same_run(pushed_run):
    """The command in the card, parsed as `suder run` parses it, resolves to the run's settings."""
    out, _, _, argv = pushed_run
    text = ModelCard.load(out / "final" / "README.md").text
    block = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["suder", "run"]
    config_file, flags = parse_run(words[2:])
    again = resolve(config_file, flags).to_flat_dict()
    saved = resolve(str(out / "config.yaml")).to_flat_dict()
    assert again == saved
    assert flags["lr"] == "1e-05" and flags["hub_repo_id"] == REPO and flags["push_to_hub"] is True


def _run_folder(tmp_path: Path, **flags) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_yaml(resolve(flags=flags)))
    return run


def test_the_command_names_only_what_the_user_set(tmp_path):
    run = _run_folder(
        tmp_path, algo="grpo", group_size=4, **{"gen.group_size": 16}, text_greedy_in_group=True,
        backbone_options={"lora": True}, report_to="tensorboard", overwrite=True,
    )
    assert hub.command(hub.read_run(run)) == (
        "suder run --backbone-options '{lora: true}' --algo grpo --group-size 4 --text-greedy-in-group "
        "--report-to tensorboard --gen.group-size 16"
    )  # und.group_size and und.algo follow the globals; --overwrite is how that command treated its folder
    assert hub.command(hub.read_run(_run_folder(tmp_path / "x", seed=1, **{"und.algo": "simpo"}))) == (
        "suder run --seed 1 --und.algo simpo"
    )


def test_the_judge_table_is_run_jsons_column_by_column(tmp_path):
    run = _run_folder(tmp_path, strategy="separate")
    before = {"t2i": {"single": 0.5, "pair": 0.25, "count": 0.125, "relation": 0.0625, "overall": 0.3},
              "caption": {"overall": 0.7}, "caption_greedy": {"overall": 0.9}}
    after = {"t2i": {"single": 0.625, "pair": 0.5, "count": 0.25, "relation": 0.125, "overall": 0.4},
             "caption": {"overall": 0.75}, "caption_greedy": {"overall": 0.95}}
    (run / "run.json").write_text(json.dumps({"before": before, "after": after, "steps": 7, "stopped_early": True}))
    text = hub.model_card(run).text
    assert "| before | 50.0 | 25.0 | 12.5 | 6.2 | 30.0 | 70.0 | 90.0 |" in text
    assert "| after | 62.5 | 50.0 | 25.0 | 12.5 | 40.0 | 75.0 | 95.0 |" in text
    assert "| change | +12.5 | +25.0 | +12.5 | +6.2 | +10.0 | +5.0 | +5.0 |" in text
    assert "- steps: 7 (stopped early" in text
    # the separate strategy's two models are in gen/ and und/
    assert 'suder.load_backbone("toy", model=f"{folder}/gen")' in text and 'model=f"{folder}/und")' in text


# ------------------------------------------------------------------------------------------ base and license
def _hub_cache(root: Path, repo_id: str, card: str) -> Path:
    """A model's README.md as the Hub cache keeps it (refs/main -> snapshots/<commit>/)."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "README.md").write_text(card)
    return root


def test_base_model_and_license_come_from_the_base(tmp_path, monkeypatch):
    cache = _hub_cache(tmp_path / "hf", "org/unified-1b", "---\nlicense: mit\n---\n# a base\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    card = hub.model_card(_run_folder(tmp_path / "a", model="org/unified-1b"))
    assert card.data.base_model == "org/unified-1b" and card.data.license == "mit"
    assert "[org/unified-1b](https://huggingface.co/org/unified-1b)" in card.text

    card = hub.model_card(_run_folder(tmp_path / "b", model="org/not-cached"))  # never fetched: no license
    assert card.data.base_model == "org/not-cached" and card.data.license is None
    assert "License: not stated" in card.text

    local = tmp_path / "local-base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: base-license\nlicense_link: LICENSE\n---\n")
    card = hub.model_card(_run_folder(tmp_path / "c", model=str(local)))
    assert card.data.base_model is None and card.data.license == "other"  # a local folder is on no Hub
    assert card.data.license_name == "base-license" and card.data.license_link == "LICENSE"
    assert f"the local checkpoint `{local}`" in card.text

    card = hub.model_card(_run_folder(tmp_path / "d"))  # the embedded ShapesWorld default
    assert "base_model" not in card.data.to_dict() and card.data.license is None
    assert "embedded ShapesWorld base" in card.text and "License: none stated" in card.text


def test_a_run_without_samples_or_judge_has_a_card_without_them(tmp_path):
    run = _run_folder(tmp_path, prompts="p.txt", images="imgs", backbone="toy")
    (run / "final").mkdir()
    hub.write_card(run, run / "final")
    card = ModelCard.load(run / "final" / "README.md")
    assert "## Samples" not in card.text and "judge accuracy" not in card.text
    assert not (run / "final" / "samples.png").exists()
    assert "shapes-world" not in card.data.tags and "prompts `p.txt`, images `imgs`" in card.text


# ------------------------------------------------------------------------------------------ pushing
def test_push_to_hub_uploads_final_at_the_end_of_the_run(pushed_run):
    out, calls, uploaded, _ = pushed_run
    assert [n for n, _, _ in calls] == ["init", "create_repo", "upload_folder"]  # once, at the end
    (args, kw), = [(a, k) for n, a, k in calls if n == "create_repo"]
    assert args == (REPO,) and kw == {"private": True, "repo_type": "model", "exist_ok": True}
    (_, kw), = [(a, k) for n, a, k in calls if n == "upload_folder"]
    assert kw["folder_path"] == str(out / "final") and kw["repo_id"] == REPO and kw["revision"] is None
    assert kw["commit_message"] == "suder: final model after 2 steps"
    assert uploaded["README.md"] == (out / "final" / "README.md").read_text()  # the card was written before


def test_a_push_refused_at_the_end_of_a_run_says_the_run_is_saved(tiny_toy_path, tmp_path, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    import suder

    _online(monkeypatch)
    FakeApi.fail = HfHubHTTPError("403 Forbidden", response=SimpleNamespace(headers={}, request=None))
    out = tmp_path / "r"
    with pytest.raises(HubError) as exc:
        suder.train("toy", model=tiny_toy_path, output_dir=str(out), steps=1, group_size=4, gen_batch_size=2,
                    und_batch_size=2, eval_num=4, sample_every=0, save_every=0, push_to_hub=True, hub_repo_id=REPO)
    assert "403 Forbidden" in str(exc.value) and f"`suder push {out} --repo-id {REPO}`" in str(exc.value)
    assert (out / "run.json").is_file() and (out / "final" / "README.md").is_file()


@pytest.fixture
def run_copy(pushed_run, tmp_path):
    """A copy of the tiny run whose cards a test may rewrite."""
    return Path(shutil.copytree(pushed_run[0], tmp_path / "run"))


def test_suder_push_passes_every_option_to_huggingface_hub(run_copy, monkeypatch, capsys):
    _online(monkeypatch, token=None)
    argv = ["push", str(run_copy), "--repo-id", "me/other", "--private", "--branch", "dev", "--commit-message", "hi",
            "--token", "hf_given"]
    assert cli.main(argv) == 0
    assert FakeApi.calls[0] == ("init", (), {"token": "hf_given"})
    assert _calls("create_repo") == [(("me/other",), {"private": True, "repo_type": "model", "exist_ok": True})]
    assert _calls("create_branch") == [(("me/other",), {"branch": "dev", "repo_type": "model", "exist_ok": True})]
    (_, kw), = _calls("upload_folder")
    assert kw == {"repo_id": "me/other", "folder_path": str(run_copy / "final"), "repo_type": "model",
                  "revision": "dev", "commit_message": "hi", "ignore_patterns": ["*.tmp", ".*"]}
    assert "https://huggingface.co/me/other/commit/abc" in capsys.readouterr().err
    # the card push_to_hub wrote, edited by nobody since, now names the repo of this push
    card = FakeApi.uploaded["README.md"]
    assert 'snapshot_download("me/other")' in card and f'snapshot_download("{REPO}")' not in card


def test_suder_push_of_a_checkpoint_names_this_repo_in_an_untouched_card(run_copy, monkeypatch):
    _online(monkeypatch)
    folder = run_copy / "checkpoints" / "step-000001" / "model"
    assert 'snapshot_download("REPO_ID")' in (folder / "README.md").read_text()
    assert cli.main(["push", str(run_copy), "--repo-id", "me/ckpt", "--checkpoint", "step-1"]) == 0
    (args, kw), = _calls("create_repo")
    assert kw["private"] is None  # the Hub's default visibility
    (_, kw), = _calls("upload_folder")
    assert kw["folder_path"] == str(folder) and kw["revision"] is None
    assert kw["commit_message"] == "suder: checkpoint at step 1 of run"
    assert 'snapshot_download("me/ckpt")' in FakeApi.uploaded["README.md"]  # untouched: rewritten for this repo
    assert ModelCard(FakeApi.uploaded["README.md"]).data.model_name == "ckpt"

    edited = (folder / "README.md").read_text().replace("## Method", "## Method\n\nMy notes.")
    (folder / "README.md").write_text(edited)
    assert cli.main(["push", str(run_copy), "--repo-id", "me/ckpt2", "--checkpoint", "1"]) == 0
    assert FakeApi.uploaded["README.md"] == edited  # a card the user edited is uploaded as it is


def test_a_run_folder_without_a_card_gets_one_when_pushed(run_copy, monkeypatch):
    _online(monkeypatch)
    (run_copy / "final" / "README.md").unlink()
    (run_copy / "final" / "samples.png").unlink()
    assert cli.main(["push", str(run_copy), "--repo-id", "me/old-run"]) == 0
    assert 'snapshot_download("me/old-run")' in FakeApi.uploaded["README.md"]
    assert (run_copy / "final" / "samples.png").is_file()


@pytest.mark.parametrize("case,fragment", [
    ("offline", "HF_HUB_OFFLINE is set"),
    ("no token", "No Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token."),
    ("bad repo id", "'me/a/b' is not a Hub repository id"),
    ("no checkpoint", "has no checkpoint 'step-7'; its checkpoints: step-000001."),
    ("not a run", "is not a suder run folder (no config.yaml)"),
    ("http error", "Pushing '"),
])
def test_push_errors_are_one_line_before_any_upload(case, fragment, run_copy, monkeypatch, capsys):
    _online(monkeypatch, token=None if case == "no token" else "hf_x")
    if case == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if case == "http error":
        from huggingface_hub.errors import HfHubHTTPError

        response = SimpleNamespace(headers={}, request=None)
        FakeApi.fail = HfHubHTTPError("403 Forbidden: you cannot write to me/x", response=response)
    argv = ["push", str(run_copy if case != "not a run" else run_copy / "samples"), "--repo-id",
            "me/a/b" if case == "bad repo id" else "me/x"] + (["--checkpoint", "step-7"] if case == "no checkpoint"
                                                                 else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not _calls("upload_folder")
    if case == "http error":
        assert "403 Forbidden" in err and "--token" in err


def test_push_to_hub_without_a_repo_id_fails_at_config_time(tmp_path, capsys):
    with pytest.raises(ConfigError, match="push_to_hub needs hub_repo_id"):
        resolve(flags={"push_to_hub": True})
    assert cli.main(["run", "--push-to-hub", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "push_to_hub needs hub_repo_id" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # before any work: no base built, no folder


def test_push_to_hub_without_a_token_fails_before_the_run(tiny_toy_path, tmp_path, monkeypatch):
    import suder

    _online(monkeypatch, token=None)
    with pytest.raises(HubError, match="No Hugging Face token"):
        suder.train("toy", model=tiny_toy_path, output_dir=str(tmp_path / "r"), steps=1, push_to_hub=True,
                    hub_repo_id=REPO)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_push_settings_may_change_on_resume(tmp_path):
    run = _run_folder(tmp_path, steps=1)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["push_to_hub"] is False and saved["hub_repo_id"] is None and saved["hub_private"] is False
    from suder.outputs import MAY_CHANGE_ON_RESUME

    assert {"push_to_hub", "hub_repo_id", "hub_private"} <= set(MAY_CHANGE_ON_RESUME)


def test_push_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["push", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--repo-id", "--checkpoint", "--private", "--revision", "--branch", "--commit-message", "--token"):
        assert option in out
