"""Plugins: discovery through real entry points, SUDER_LOAD_PLUGINS, failure isolation, name errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import suder
from suder import errors, plugins, registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


def _cli(*args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "suder", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_builtins_come_through_entry_points():
    pm = plugins.get_plugin_manager()
    pm.check_pending()
    names = {s.name for s in suder.list_backbones()}
    assert {"toy", "janus-pro", "show-o"} <= names
    assert registry.get_backbone_spec("toy").distribution == "suder"
    assert {"dsr", "dsr-consensus", "shapes-judge"} <= set(registry.rewards())


def test_unknown_backbone_lists_options():
    with pytest.raises(errors.UnknownNameError) as exc:
        suder.load_backbone("showo2")
    msg = str(exc.value)
    assert msg.startswith("Unknown backbone 'showo2'. Available: ") and "janus-pro, show-o, toy" in msg
    assert "Did you mean 'show-o'?" in msg


def test_unknown_backbone_cli_is_one_line():
    proc = _cli("eval", "--backbone", "showo2", "--model", "x", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Unknown backbone 'showo2'" in lines[0], proc.stderr


def test_duplicate_name_names_both_plugins():
    class Impostor:
        @suder.hookimpl
        def register_backbones(self, register):
            register("toy", lambda **kw: None, summary="not the real toy")

    plugins.register_plugin(Impostor(), name="impostor")
    with pytest.raises(errors.DuplicateNameError) as exc:
        registry.backbones()
    assert "'toy'" in str(exc.value) and "'impostor'" in str(exc.value) and "'toy'" in str(exc.value)


def _fake_dist(site: Path, name: str, entry: str, module_code: str | None) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info folder with entry points."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[suder]\n{entry}\n")
    if module_code is not None:
        mod = entry.split("=")[1].strip()
        (site / f"{mod}.py").write_text(module_code)


def test_broken_plugin_warns_and_others_load(tmp_path):
    _fake_dist(tmp_path, "suder-broken", "broken = suder_broken_mod", "raise ImportError('boom')\n")
    good = textwrap.dedent(
        """
        from suder import hookimpl

        @hookimpl
        def register_backbones(register):
            register("good", lambda **kw: None, summary="a good plugin")
        """
    )
    _fake_dist(tmp_path, "suder-good", "good = suder_good_mod", good)
    env = {"PYTHONPATH": str(tmp_path)}
    proc = _cli("backbones", "--json", env_extra=env)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert "good" in rows and rows["good"]["distribution"] == "suder-good" and "toy" in rows
    assert "suder plugin 'broken' from suder-broken failed to load" in proc.stderr
    # gate: empty = no third-party plugins; a list = only those
    rows = {
        r["name"] for r in json.loads(_cli("backbones", "--json", env_extra=env | {"SUDER_LOAD_PLUGINS": ""}).stdout)
    }
    assert "good" not in rows and "toy" in rows
    proc = _cli("backbones", "--json", env_extra=env | {"SUDER_LOAD_PLUGINS": "good"})
    assert "good" in {r["name"] for r in json.loads(proc.stdout)} and "broken" not in proc.stderr


def test_hello_plugin_installs_and_is_discovered(tmp_path):
    """A real `pip install` of the example package into a target folder, then discovery by entry point."""
    target = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "plugins" / "suder-hello"),
        ],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": str(target)}
    rows = {r["name"]: r for r in json.loads(_cli("backbones", "--json", env_extra=env).stdout)}
    assert rows["hello"]["distribution"] == "suder-hello" and rows["hello"]["plugin"] == "hello"
    code = (
        "import suder, json; from suder import registry; m = suder.load_backbone('hello');"
        "print(json.dumps([m.name, m.config.hidden_size, 'hello-brevity' in registry.rewards()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["hello", 64, True]


def test_cheap_imports():
    """`import suder` and `suder backbones` must not import transformers."""
    code = (
        "import sys, suder; suder.list_backbones(); from suder import cli;"
        "print('transformers' in sys.modules, 'trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr
