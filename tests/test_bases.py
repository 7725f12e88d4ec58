"""The ShapesWorld bases shipped with suder: every embedded default starts from the same weights on every machine,
checked against their SHA-256 sums, without pre-training; ``rebuild_base`` still builds one here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import suder.pretrain as pretrain_mod
from suder import cli
from suder.errors import BackboneError

ROOT = Path(__file__).resolve().parents[1]
BUILT_INS = ("toy", "show-o", "janus-pro")


@pytest.fixture
def no_pretraining(monkeypatch, tmp_path):
    """An empty cache, and pre-training that fails the test if anything asks for it."""
    monkeypatch.setenv("SUDER_CACHE", str(tmp_path / "cache"))

    def boom(*args, **kwargs):
        raise AssertionError("pre-trained a base instead of using the shipped one")

    monkeypatch.setattr(pretrain_mod, "pretrain", boom)
    return tmp_path / "cache"


@pytest.mark.parametrize("backbone", BUILT_INS)
def test_each_embedded_default_starts_from_its_shipped_base(backbone, no_pretraining):
    recipe = pretrain_mod.shapes_recipe(backbone)
    path = pretrain_mod.ensure_base(backbone)
    assert path == Path(recipe.shipped) and path.parent == pretrain_mod.SHIPPED
    info = json.loads((path / "pretrain.json").read_text())
    assert (info["backbone"], info["version"]) == (backbone, recipe.version)
    assert (info["steps"], info["seed"]) == (recipe.pretrain.get("steps", 500), recipe.pretrain.get("seed", 0))
    assert len(pretrain_mod.verify_checksums(path)) == 64
    assert not no_pretraining.exists()  # nothing built, nothing cached


def test_the_checksums_are_sha256sum_files(tmp_path):
    """SHA256SUMS is in sha256sum's own format, so `sha256sum -c` checks a shipped base too."""
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum here")
    for backbone in BUILT_INS:
        folder = pretrain_mod.SHIPPED / backbone
        proc = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=folder, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "model" in proc.stdout


@pytest.fixture
def copied_base(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(pretrain_mod.SHIPPED / "toy", folder)
    return folder


def test_a_changed_file_is_a_one_line_error(copied_base):
    digest = pretrain_mod.verify_checksums(copied_base)
    weights = copied_base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(BackboneError, match=r"fails its checksum: model\.safetensors differs") as err:
        pretrain_mod.verify_checksums(copied_base)
    assert "\n" not in str(err.value) and "--rebuild-base" in str(err.value)
    assert pretrain_mod.write_checksums(copied_base) and pretrain_mod.verify_checksums(copied_base) != digest


def test_a_missing_added_or_unlisted_file_is_refused(copied_base):
    (copied_base / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(BackboneError, match="does not list"):
        pretrain_mod.verify_checksums(copied_base)
    (copied_base / "adapter_model.safetensors").unlink()
    (copied_base / "config.json").unlink()
    with pytest.raises(BackboneError, match="missing config.json"):
        pretrain_mod.verify_checksums(copied_base)
    (copied_base / "SHA256SUMS").unlink()
    with pytest.raises(BackboneError, match="no SHA256SUMS"):
        pretrain_mod.verify_checksums(copied_base)


def test_a_corrupt_shipped_base_stops_the_run_before_training(monkeypatch, copied_base, no_pretraining):
    """ensure_base verifies what it hands out: a damaged install is an error, never a silently different base."""
    import dataclasses

    recipe = pretrain_mod.shapes_recipe("toy")
    monkeypatch.setattr(pretrain_mod, "shapes_recipe", lambda name: dataclasses.replace(recipe, shipped=copied_base))
    assert pretrain_mod.ensure_base("toy") == copied_base
    (copied_base / "config.json").write_text((copied_base / "config.json").read_text() + " ")
    with pytest.raises(BackboneError, match="fails its checksum: config.json"):
        pretrain_mod.ensure_base("toy")


def test_rebuild_or_another_recipe_builds_here(monkeypatch, tmp_path):
    """rebuild_base, another seed or step count, or a recipe whose version moved past its shipped base: built
    here from the recipe and cached, with its own SHA256SUMS; the shipped folder is left alone."""
    import dataclasses

    monkeypatch.setenv("SUDER_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(model, *, out, steps, seed, callback):
        calls.append((model, steps, seed))
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_bytes(b"weights")
        return pretrain_mod.PretrainResult(None, out, 1.0, [0.5], 0.5)

    monkeypatch.setattr(pretrain_mod, "pretrain", fake)
    shipped = pretrain_mod.SHIPPED / "toy"
    before = (shipped / "SHA256SUMS").read_text()
    built = pretrain_mod.ensure_base("toy", rebuild=True)
    assert built == tmp_path / "cache" / "toy-base-v1-steps500-seed0" and calls == [("toy", 500, 0)]
    assert pretrain_mod.verify_checksums(built) and (shipped / "SHA256SUMS").read_text() == before
    assert pretrain_mod.ensure_base("toy", seed=1).name == "toy-base-v1-steps500-seed1"
    recipe = pretrain_mod.shapes_recipe("toy")
    moved = dataclasses.replace(recipe, version="v2")
    monkeypatch.setattr(pretrain_mod, "shapes_recipe", lambda name: moved)
    assert pretrain_mod.shipped_base("toy") is None
    assert pretrain_mod.ensure_base("toy").name == "toy-base-v2-steps500-seed0"
    assert calls[-1] == ("toy", 500, 0) and len(calls) == 3


def test_a_plugin_recipe_ships_a_base_the_same_way(monkeypatch, tmp_path, tiny_toy_path, no_pretraining):
    """What suder pretrain writes (model, pretrain.json with how it was built, SHA256SUMS) is what a package
    ships: a recipe whose ``shipped`` names such a folder, for the steps and seed it was built with, starts runs
    from it; for other steps it builds here."""
    import dataclasses

    assert pretrain_mod.verify_checksums(tiny_toy_path)  # pretrain(out=...) wrote the sums
    info = json.loads((Path(tiny_toy_path) / "pretrain.json").read_text())
    assert {"torch", "cpu", "threads"} <= set(info["built_with"])
    recipe = dataclasses.replace(pretrain_mod.shapes_recipe("toy"), version=info["version"],
                                 pretrain=dict(steps=info["steps"], seed=info["seed"]), shipped=tiny_toy_path)
    monkeypatch.setattr(pretrain_mod, "shapes_recipe", lambda name: recipe)
    assert pretrain_mod.ensure_base("toy") == Path(tiny_toy_path)
    with pytest.raises(AssertionError, match="pre-trained a base"):  # another step count: not the shipped one
        pretrain_mod.ensure_base("toy", steps=info["steps"] + 1)
    with pytest.raises(BackboneError, match="must be the path of a folder"):
        pretrain_mod.ShapesRecipe(shipped=3)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BUILT_INS)
def test_suder_run_starts_from_the_shipped_base(backbone, tmp_path, monkeypatch):
    """The user's path: `suder run --backbone NAME` with an empty cache trains the shipped base (no pre-training),
    and run.json names it with its digest; `--rebuild-base` is a setting recorded in config.yaml."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUDER_CACHE", str(cache))
    out = tmp_path / "run"
    args = ["run", "--backbone", backbone, "--steps", "1", "--eval-num", "4", "--group-size", "2",
            "--batch-size", "1", "--grad-accum", "1", "--save-every", "0", "--sample-every", "0",
            "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"base: {pretrain_mod.SHIPPED / backbone}" in proc.stderr + proc.stdout
    assert "pretrain base" not in proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["base_model"] == str(pretrain_mod.SHIPPED / backbone)
    assert run["base_sha256"] == pretrain_mod.base_digest(pretrain_mod.SHIPPED / backbone)
    assert not cache.exists()


def test_rebuild_base_is_a_run_setting(monkeypatch):
    import importlib

    import suder.trainer as trainer_mod

    seen, built = {}, []

    def fake_train(model=None, algo=None, *, config_file=None, flags=None, callback=None, **kw):
        from suder.config import resolve

        seen["cfg"] = resolve(config_file, flags, **kw)
        raise SystemExit(0)

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(trainer_mod, "preflight", lambda cfg: None)
    monkeypatch.setattr(importlib.import_module("suder.pretrain"), "ensure_base",
                        lambda *a, **kw: built.append((a, kw)))
    with pytest.raises(SystemExit):
        cli.main(["run", "--steps", "1", "--rebuild-base"])
    assert built[0][1]["rebuild"] is True
    assert seen["cfg"].rebuild_base is True and seen["cfg"].sources["rebuild_base"] == "flags"


@pytest.mark.slow
def test_the_wheel_ships_the_bases(tmp_path):
    """`pip install suder` (a wheel) carries every base file and its SHA256SUMS, not only editable installs."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "runs",
                                                             "__pycache__", "research", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("suder-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for backbone in BUILT_INS:
        folder = pretrain_mod.SHIPPED / backbone
        for f in folder.rglob("*"):
            if f.is_file():
                assert f"suder/bases/{backbone}/{f.relative_to(folder).as_posix()}" in names
