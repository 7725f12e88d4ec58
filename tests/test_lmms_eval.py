"""The lmms-eval model ``suder`` (suder/integrations/lmms_eval.py): lmms-eval's own CLI scores a saved toy on the
local ShapesWorld tasks of examples/lmms_eval/shapes, and its answers are exactly what the backbone computes for
each document's image; the request mapping (batches, stop strings, model_args, questions, log-likelihoods) and the
errors, in process. Needs the [lmms-eval] extra (skipped without it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import suder
from suder.errors import ConfigError, DataError
from suder.worlds import shapes

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "examples" / "lmms_eval" / "shapes"
NUM_SCENES = 6


def _lmms_eval():
    if os.environ.get("SUDER_REQUIRE_LMMS_EVAL"):  # .ci/run's lmms-eval venv: a skip there would hide a failure
        import lmms_eval  # noqa: F401
    pytest.importorskip("lmms_eval", reason="the [lmms-eval] extra is not installed")
    from suder.integrations import lmms_eval as adapter

    return adapter


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory) -> str:
    """A tiny random-weight toy, saved (what `pretrained=` loads)."""
    torch.manual_seed(0)
    model = suder.load_backbone("toy", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("toy")
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The example tasks with their scenes exported beside them (`suder world export --out .../scenes`)."""
    out = tmp_path_factory.mktemp("tasks") / "shapes"
    shutil.copytree(TASKS, out, ignore=shutil.ignore_patterns("scenes", "__pycache__"))
    shapes.export(NUM_SCENES, 0, out / "scenes")
    return out


def _entry_point_site(root: Path) -> Path:
    """A folder that makes this checkout's ``lmms_eval.models`` entry point (pyproject.toml) visible, as
    ``pip install -e .`` does: a dist-info with that entry point."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"suder": "suder.integrations.lmms_eval:manifest"}, declared
    info = root / "suder_checkout-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: suder-checkout\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nsuder = suder.integrations.lmms_eval:manifest\n")
    return root


def _images(task_dir: Path) -> list[tuple[dict, Image.Image]]:
    lines = (task_dir / "scenes" / "captions.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    return [(doc, Image.open(task_dir / "scenes" / doc["image"]).convert("RGB")) for doc in docs]


@pytest.mark.slow
def test_lmms_eval_cli_scores_a_saved_toy_on_the_local_shapes_tasks(toy_path, task_dir, tmp_path):
    """``python -m lmms_eval --model suder`` (found by entry point) on both example tasks: the results file has
    each task's metrics over NUM_SCENES samples; each caption is the toy's greedy caption of that document's image
    (cut at the task's "\\n", at most its 32 tokens), each choice's log-likelihood is ``logp_text_given_image`` of
    that caption and image, summed, and ``acc`` is the share of documents whose true caption scores highest."""
    _lmms_eval()
    site = _entry_point_site(tmp_path / "site")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "suder", "--model_args", f"backbone=toy,pretrained={toy_path}",
           "--batch_size", "4", "--tasks", "shapes_captions,shapes_choice", "--include_path", str(task_dir),
           "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results_file] = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_backend"] == "suder.integrations.lmms_eval.SuderLMM (simple)"
    assert results["n-samples"]["shapes_captions"]["effective"] == NUM_SCENES
    assert results["n-samples"]["shapes_choice"]["effective"] == NUM_SCENES
    assert {"exact_match,none", "judge,none"} <= set(results["results"]["shapes_captions"])
    samples = {t: [json.loads(line) for line in next(out.rglob(f"*_samples_{t}.jsonl")).read_text().splitlines()]
               for t in ("shapes_captions", "shapes_choice")}
    assert all(len(rows) == NUM_SCENES for rows in samples.values()), {t: len(r) for t, r in samples.items()}

    model = suder.load_backbone("toy", model=toy_path)
    docs = _images(task_dir)
    images = [image for _, image in docs]
    greedy = model.sample_text(images, temperature=0.0, max_tokens=32).texts
    by_doc = {row["doc_id"]: row for row in samples["shapes_captions"]}
    for i, (doc, image) in enumerate(docs):
        assert by_doc[i]["filtered_resps"] == greedy[i].split("\n")[0], i
        judged = shapes.satisfies(shapes.parse_image(image), greedy[i])
        assert by_doc[i]["exact_match"] == float(greedy[i] == doc["caption"]) and by_doc[i]["judge"] == judged

    choices = sorted({doc["caption"] for doc, _ in docs})
    hits = []
    for row in samples["shapes_choice"]:
        image = images[row["doc_id"]]
        with torch.no_grad():
            expected = model.logp_text_given_image(choices, [image] * len(choices)).sum()
        got = torch.tensor([float(ll) for ll, _ in row["filtered_resps"]])
        assert torch.allclose(got, expected, atol=1e-4), (row["doc_id"], got, expected)
        hits.append(int(got.argmax()) == choices.index(docs[row["doc_id"]][0]["caption"]))
    assert results["results"]["shapes_choice"]["acc,none"] == pytest.approx(sum(hits) / NUM_SCENES)


# ------------------------------------------------------------------------------------------- in process
def _requests(adapter, task_dir, kind: str, args: list[tuple]) -> tuple[list, dict]:
    """lmms-eval ``Instance``s over the task folder's documents; ``args``: (context, second, doc_id) each."""
    from lmms_eval.api.instance import Instance

    docs = [doc for doc, _ in _images(task_dir)]

    def doc_to_visual(doc):
        return [Image.open(task_dir / "scenes" / doc["image"])]

    requests = [Instance(request_type=kind, arguments=(ctx, second, doc_to_visual, doc_id, "shapes", "test"), idx=0,
                         metadata={"task": "shapes", "doc_id": doc_id, "repeats": 1})
                for ctx, second, doc_id in args]
    return requests, {"shapes": {"test": docs}}


def _model(adapter, toy_path, task_dict, **args):
    lm = adapter.SuderLMM(backbone="toy", pretrained=toy_path, **args)
    lm.task_dict = task_dict
    return lm


def test_generate_until_batches_cuts_at_until_and_takes_model_args_first(toy_path, task_dir):
    adapter = _lmms_eval()
    kwargs = {"until": ["\n"], "max_new_tokens": 32, "temperature": 0, "do_sample": False}
    requests, tasks = _requests(adapter, task_dir, "generate_until", [("Describe.", dict(kwargs), i)
                                                                      for i in range(NUM_SCENES)])
    images = [image for _, image in _images(task_dir)]
    one = _model(adapter, toy_path, tasks).generate_until(requests)
    three = _model(adapter, toy_path, tasks, batch_size=3).generate_until(requests)
    direct = suder.load_backbone("toy", model=toy_path).sample_text(images, temperature=0.0, max_tokens=32).texts
    assert one == three == direct
    assert all(len(text.split()) > 2 for text in one), one  # the random toy writes long captions

    short = _model(adapter, toy_path, tasks, max_new_tokens=2).generate_until(requests)
    assert short == [" ".join(text.split()[:2]) for text in direct]
    cut, _ = _requests(adapter, task_dir, "generate_until", [("Describe.", {**kwargs, "until": [" "]}, 0)])
    assert _model(adapter, toy_path, tasks).generate_until(cut) == [direct[0].split(" ")[0]]

    sampled = {"max_new_tokens": 8, "temperature": 1.0, "do_sample": True}
    hot, _ = _requests(adapter, task_dir, "generate_until", [("Describe.", dict(sampled), i) for i in range(4)])
    first = _model(adapter, toy_path, tasks, seed=3).generate_until(hot)
    assert first == _model(adapter, toy_path, tasks, seed=3).generate_until(hot)  # seeded: reproducible
    assert first != direct[:4] and _model(adapter, toy_path, tasks, temperature=0).generate_until(hot) == [
        " ".join(text.split()[:8]) for text in direct[:4]]


def test_the_question_replaces_a_caption_instruction_for_its_request_only(toy_path, task_dir, monkeypatch):
    """A backbone with ``caption_instruction`` (Janus-Pro) captions under each request's question, ``<image>``
    removed; the instruction is restored afterwards, and ``use_question=false`` keeps it throughout."""
    adapter = _lmms_eval()
    gen = {"max_new_tokens": 2}
    requests, tasks = _requests(adapter, task_dir, "generate_until", [("<image>\nWhat is red?", gen, 0),
                                                                      ("<image> How many?", gen, 1),
                                                                      ("<image>\nWhat is red?", gen, 2)])
    for use_question, expected in ((True, [("What is red?", 2), ("How many?", 1)]), (False, [("Describe it.", 3)])):
        lm = _model(adapter, toy_path, tasks, use_question=use_question, batch_size=4)
        seen, sample = [], lm.model.sample_text

        def recording(images, _sample=sample, _seen=seen, _lm=lm, **options):
            _seen.append((_lm.model.caption_instruction, len(images)))
            return _sample(images, **options)

        lm.model.caption_instruction = "Describe it."
        monkeypatch.setattr(lm.model, "sample_text", recording)
        assert len(lm.generate_until(requests)) == 3
        assert seen == expected  # one batch per question
        assert lm.model.caption_instruction == "Describe it."


def test_loglikelihood_is_the_whole_caption_log_prob_and_whether_greedy_writes_it(toy_path, task_dir):
    adapter = _lmms_eval()
    docs = _images(task_dir)
    model = suder.load_backbone("toy", model=toy_path)
    greedy, greedy_1 = model.sample_text([docs[0][1], docs[1][1]], temperature=0.0).texts
    other = docs[1][0]["caption"]
    requests, tasks = _requests(adapter, task_dir, "loglikelihood", [("Describe.", " " + greedy, 0),
                                                                     ("Describe.", " " + other, 0),
                                                                     ("Describe.", " " + other, 1)])
    out = _model(adapter, toy_path, tasks, batch_size=2).loglikelihood(requests)
    with torch.no_grad():
        expected = model.logp_text_given_image([greedy, other, other], [docs[0][1], docs[0][1], docs[1][1]]).sum()
    assert [r.text[1] for r in out] == [True, greedy == other, greedy_1 == other]
    assert torch.allclose(torch.tensor([r.text[0] for r in out]), expected, atol=1e-5)


def test_janus_pro_scores_each_request_under_its_own_question(tmp_path):
    """A saved tiny Janus-Pro through ``pretrained=``: each continuation's log-likelihood is the backbone's
    ``logp_text_given_image`` with the request's question as ``caption_instruction`` (two questions, two values)."""
    adapter = _lmms_eval()
    from janus_tiny import random_images, tiny_backbone
    from lmms_eval.api.instance import Instance

    tiny_backbone().save_pretrained(str(tmp_path / "janus"))
    images = random_images(2)
    asked = [("<image>\nWhat is it?", 0), ("<image>\nWhere is it?", 0), ("<image>\nWhat is it?", 1)]
    requests = [Instance(request_type="loglikelihood", arguments=(q, " a red square", lambda doc: [images[doc]], i,
                                                                  "t", "test"),
                         idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for q, i in asked]
    lm = adapter.SuderLMM(backbone="janus-pro", pretrained=str(tmp_path / "janus"), batch_size=2)
    lm.task_dict = {"t": {"test": [0, 1]}}
    got = [r.text[0] for r in lm.loglikelihood(requests)]
    assert lm.model.caption_instruction == "Describe this image."  # restored
    expected = []
    for question, i in asked:
        lm.model.caption_instruction = question.split("\n")[1]
        with torch.no_grad():
            expected.append(float(lm.model.logp_text_given_image(["a red square"], [images[i]]).sum()))
    assert got == pytest.approx(expected, abs=1e-4) and abs(expected[0] - expected[1]) > 1e-3, (got, expected)


def test_requests_and_arguments_it_cannot_serve_are_one_line_errors(toy_path, task_dir):
    adapter = _lmms_eval()
    requests, tasks = _requests(adapter, task_dir, "generate_until", [("Describe.", {}, 0)])
    with pytest.raises(ConfigError, match="pretrained=PATH"):
        adapter.SuderLMM(backbone="toy")
    with pytest.raises(ConfigError, match="batch_size must be a whole number of at least 1, got 0"):
        adapter.SuderLMM(backbone="toy", pretrained=toy_path, batch_size=0)
    with pytest.raises(ConfigError, match="multi-round"):
        _model(adapter, toy_path, tasks).generate_until_multi_round(requests)
    two = requests[0].args[2](tasks["shapes"]["test"][0]) * 2
    requests[0].arguments = (*requests[0].args[:2], lambda doc: two, *requests[0].args[3:])
    with pytest.raises(DataError, match="document 0 2 visual"):
        _model(adapter, toy_path, tasks).generate_until(requests)


def test_a_separate_strategy_final_folder_is_scored_by_its_und_model(tmp_path):
    adapter = _lmms_eval()
    (tmp_path / "final" / "gen").mkdir(parents=True)
    (tmp_path / "final" / "und").mkdir()
    (tmp_path / "single").mkdir()
    assert adapter.und_folder(str(tmp_path / "final")) == str(tmp_path / "final" / "und")
    assert adapter.und_folder(str(tmp_path / "single")) == str(tmp_path / "single")


def test_lmms_eval_resolves_the_entry_point_manifest_to_the_adapter():
    adapter = _lmms_eval()
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(adapter.manifest())
    assert registry.get_model_class("suder") is adapter.SuderLMM


def test_suder_never_imports_lmms_eval():
    """``import suder`` and the CLI leave lmms-eval alone (and the layer contract keeps it so)."""
    code = "import sys, suder, suder.cli, suder.trainer; print('lmms_eval' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_a_suder_module_importing_the_integrations_breaks_the_layer_contract(tmp_path):
    pytest.importorskip("importlinter")
    shutil.copytree(ROOT / "suder", tmp_path / "suder", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

    def lint() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, "--no-cache", "--contract", "integrations"], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                              timeout=120)

    assert lint().returncode == 0
    cli = tmp_path / "suder" / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _uses_integration():\n    from .integrations import lmms_eval\n")
    done = lint()
    assert done.returncode == 1 and "suder.cli -> suder.integrations.lmms_eval" in done.stdout, done.stdout
