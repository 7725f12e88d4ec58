"""The engine object (``suder.engine``): every use of a trained model goes through its prepared module, the LoRA
reference reads under the policy's ``reference_scope()``, and the run writer saves the models it is given."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from suder.config import resolve
from suder.engine import Dispatch, Reference
from suder.outputs import ModelsToSave, RunWriter

PROTOCOL = ("sample_image", "sample_text", "logp_image_given_text", "logp_text_given_image")


def test_every_use_of_the_trained_model_in_a_step_runs_inside_the_prepared_forward(tiny_toy_path, monkeypatch):
    """DDP and ZeRO-2 see only what runs inside the prepared module's ``forward``: sampling, rewards, old log-probs
    and the losses of a step (both directions, GRPO with its reference copy) all call the trained backbone there."""
    from suder.trainer import Trainer

    cfg = resolve(
        model=tiny_toy_path, algo="grpo", steps=1, group_size=4, gen_batch_size=2, und_batch_size=2, output_dir="x"
    )
    tr = Trainer(cfg)
    backbone = tr.engines["policy"].backbone
    depth, calls = [0], []
    forward = Dispatch.forward

    def counted(self, fn):
        depth[0] += 1
        try:
            return forward(self, fn)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(Dispatch, "forward", counted)
    for name in PROTOCOL:
        monkeypatch.setattr(backbone, name, _spy(getattr(backbone, name), name, calls, depth))
    tr.step(0)
    assert {name for name, _ in calls} == set(PROTOCOL)
    assert [c for c in calls if c[1] != 1] == []  # each inside exactly one prepared forward


def _spy(method, name, calls, depth):
    """``method``, recording (``name``, how many prepared forwards it runs inside) at each call."""

    def spy(*args, **kwargs):
        calls.append((name, depth[0]))
        return method(*args, **kwargs)

    return spy


class _Scoped:
    """Records whether each protocol call ran inside ``reference_scope()``, and what it was given."""

    def __init__(self):
        self.inside = False

    @contextlib.contextmanager
    def reference_scope(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def sample_image(self, prompts, **options):
        return ("sample_image", self.inside, prompts, options)

    def sample_text(self, images, **options):
        return ("sample_text", self.inside, images, options)

    def logp_image_given_text(self, images, texts, **options):
        return ("logp_image_given_text", self.inside, (images, texts), options)

    def logp_text_given_image(self, texts, images, **options):
        return ("logp_text_given_image", self.inside, (texts, images), options)


def test_a_lora_reference_reads_every_protocol_method_under_the_policys_reference_scope():
    model = _Scoped()
    scoped, copy = Reference(model, scope=model), Reference(model)
    assert scoped.sample_image(["p"], num_samples=2) == ("sample_image", True, ["p"], {"num_samples": 2})
    assert scoped.sample_text(["i"], temperature=0.0) == ("sample_text", True, ["i"], {"temperature": 0.0})
    assert scoped.logp_image_given_text("i", "t", policy="cond") == (
        "logp_image_given_text",
        True,
        ("i", "t"),
        {"policy": "cond"},
    )
    assert scoped.logp_text_given_image("t", "i") == ("logp_text_given_image", True, ("t", "i"), {})
    assert not model.inside  # left after each call
    assert [copy.sample_image([])[1], copy.logp_text_given_image("t", "i")[1]] == [False, False]  # a copy: no scope


def test_the_run_writer_saves_the_models_it_is_given(tmp_path):
    """``RunWriter`` gets records, not the trainer: each view is entered (every process: gathering sharded weights
    needs them all) and saved into its subfolder by the main process, with the ShapesWorld marker when given."""
    entered = []

    class Model:
        def __init__(self, tag):
            self.tag = tag

        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "weights").write_text(self.tag)

    def view(tag):
        @contextlib.contextmanager
        def gathered():
            entered.append(tag)
            yield Model(tag)

        return gathered

    models = ModelsToSave({"gen": view("g"), "und": view("u")}, marker={"backbone": "show-o", "trained_from": "b"})
    RunWriter(tmp_path, main=True).save_models(models, tmp_path / "m")
    assert [(tmp_path / "m" / s / "weights").read_text() for s in ("gen", "und")] == ["g", "u"]
    marker = json.loads((tmp_path / "m" / "gen" / "pretrain.json").read_text())
    assert marker == {"backbone": "show-o", "trained_from": "b", "run": str(tmp_path)}
    RunWriter(tmp_path, main=False).save_models(ModelsToSave({"": view("p")}), tmp_path / "other")
    assert entered == ["g", "u", "p"] and not (tmp_path / "other").exists()
    RunWriter(tmp_path, main=True).save_models(ModelsToSave({"": view("p")}), tmp_path / "one")
    assert (tmp_path / "one" / "weights").read_text() == "p" and not (tmp_path / "one" / "pretrain.json").exists()
