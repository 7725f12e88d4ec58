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
    env = {"PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}  # this checkout's suder beside the plugin
    rows = {r["name"]: r for r in json.loads(_cli("backbones", "--json", env_extra=env).stdout)}
    assert rows["hello"]["distribution"] == "suder-hello" and rows["hello"]["plugin"] == "hello"
    code = (
        "import suder, json; from suder import registry; m = suder.load_backbone('hello');"
        "from suder.config import resolve; c = resolve(backbone='hello');"
        f"from suder.testing import check_shapes_recipe; check_shapes_recipe('hello', {str(tmp_path / 'base')!r});"
        "print(json.dumps([m.name, m.config.hidden_size, 'hello-brevity' in registry.rewards(), c.lr, c.sources['lr'],"
        " __import__('os').path.basename(c.preset)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    # its ShapesWorld recipe's preset, a file shipped in the package, sets the run defaults
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["hello", 64, True, 3e-5, "preset", "shapes.yaml"]


def test_cheap_imports():
    """`import suder` and `suder backbones` must not import transformers."""
    code = (
        "import sys, suder; suder.list_backbones(); from suder import cli;"
        "print('transformers' in sys.modules, 'trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr


# ------------------------------------------------------------------------------------------- isolation
class _FakeEntryPoint:
    """What plugins.py reads of an ``importlib.metadata.EntryPoint``: name, dist (name, version), load()."""

    def __init__(self, name: str, dist: str, module: object):
        self.name, self.dist, self._module = name, type("Dist", (), {"name": dist, "version": "9.9"})(), module

    def load(self):
        return self._module


def _fake_entry_points(monkeypatch, *extra: _FakeEntryPoint, first: bool = False) -> None:
    """Installed entry points plus ``extra`` (listed before the built-ins when ``first``)."""
    import importlib.metadata

    real = importlib.metadata.entry_points

    def entry_points(**kw):
        eps = list(real(**kw))
        return [*extra, *eps] if first else [*eps, *extra]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    plugins.reset()


def _module(name: str, **hooks) -> object:
    import types

    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(mod, hook_name, suder.hookimpl(fn))
    return mod


def test_raising_hook_skips_only_its_plugin(capsys):
    def register_backbones(register):
        register("half-done", lambda **kw: None, summary="registered before the crash")
        raise RuntimeError("boom in backbones")

    def register_rewards(register):
        raise ValueError("boom in rewards")

    plugins.register_plugin(_module("crashy", register_backbones=register_backbones), name="crashy")
    with pytest.warns(
        plugins.SuderPluginWarning, match=r"'crashy'.*register_backbones hook and was skipped: RuntimeError"
    ):
        names = set(registry.backbones())
    assert {"toy", "janus-pro", "show-o"} <= names and "half-done" not in names
    assert registry.get_backbone_spec("toy").distribution == "suder"
    failure = plugins.failures()[0]
    assert failure.plugin == "crashy" and "boom in backbones" in failure.error
    plugins.register_plugin(_module("crashy-rewards", register_rewards=register_rewards), name="crashy-rewards")
    with pytest.warns(plugins.SuderPluginWarning, match="boom in rewards"):
        assert {"dsr", "dsr-consensus", "shapes-judge"} <= set(registry.rewards())
    # `suder backbones` lists both failing plugins with their errors, in JSON and in the table
    from suder.cli import main

    assert main(["backbones", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    failed = {r["plugin"]: r["error"] for r in rows if r["error"]}
    assert set(failed) == {"crashy", "crashy-rewards"} and "boom in rewards" in failed["crashy-rewards"]
    assert {r["name"] for r in rows if not r["error"]} >= {"toy", "janus-pro", "show-o"}
    assert main(["backbones"]) == 0
    table = capsys.readouterr().out
    assert "Skipped plugin 'crashy'" in table and "boom in backbones" in table and "toy" in table


def test_load_backbone_toy_works_beside_a_raising_plugin(tiny_toy_path):
    def register_backbones(register):
        raise RuntimeError("boom")

    plugins.register_plugin(_module("crashy", register_backbones=register_backbones), name="crashy")
    with pytest.warns(plugins.SuderPluginWarning, match="crashy"):
        model = suder.load_backbone("toy", model=tiny_toy_path)
    assert model.name == "toy"


@pytest.mark.parametrize("first", [False, True])
def test_third_party_entry_point_named_like_a_builtin_is_an_error(monkeypatch, first):
    def register_backbones(register):
        register("toy", lambda **kw: None, summary="an impostor")

    ep = _FakeEntryPoint("toy", "evil-toy", _module("evil", register_backbones=register_backbones))
    _fake_entry_points(monkeypatch, ep, first=first)  # listed after or before the built-ins: never a replacement
    with pytest.raises(errors.DuplicateNameError) as exc:
        suder.load_backbone("toy")
    msg = str(exc.value)
    assert "'toy'" in msg and "suder" in msg and "evil-toy" in msg and "SUDER_LOAD_PLUGINS" in msg
    from suder.cli import main

    plugins.reset()
    assert main(["backbones"]) == 2  # one line on stderr, not a traceback
    monkeypatch.setenv("SUDER_LOAD_PLUGINS", "")  # the way out the message names
    plugins.reset()
    assert registry.get_backbone_spec("toy").distribution == "suder"


def test_third_party_backbone_named_like_a_builtin_names_both_distributions(monkeypatch):
    def register_backbones(register):
        register("toy", lambda **kw: None, summary="an impostor")

    _fake_entry_points(
        monkeypatch, _FakeEntryPoint("not-toy", "evil-toy", _module("evil", register_backbones=register_backbones))
    )
    with pytest.raises(errors.DuplicateNameError) as exc:
        registry.backbones()
    assert "backbone 'toy' is registered by both plugin 'toy' (suder) and plugin 'not-toy' (evil-toy)" in str(exc.value)


def test_misspelt_hook_fails_at_load_with_the_closest_name(monkeypatch):
    def register_backbone(register):  # missing the final "s"
        register("typo", lambda **kw: None)

    def register_backbones(register):
        register("fine", lambda **kw: None)

    _fake_entry_points(
        monkeypatch,
        _FakeEntryPoint("typo", "suder-typo", _module("typo", register_backbone=register_backbone)),
        _FakeEntryPoint("fine", "suder-fine", _module("fine", register_backbones=register_backbones)),
    )
    with pytest.warns(plugins.SuderPluginWarning) as caught:
        pm = plugins.get_plugin_manager()
    message = str(caught[0].message)
    assert "'typo' from suder-typo" in message and "unknown hook 'register_backbone'" in message
    assert "did you mean 'register_backbones'?" in message
    pm.check_pending()  # nothing unknown is left registered
    assert {"fine", "toy"} <= set(registry.backbones()) and "typo" not in registry.backbones()
    assert [f.plugin for f in plugins.failures()] == ["typo"]
    # in-process registration fails at once
    with pytest.raises(errors.PluginError, match="did you mean 'register_backbones'"):
        plugins.register_plugin(_module("typo2", register_backbone=register_backbone), name="typo2")
    assert not pm.has_plugin("typo2")

    def register_backbones_with_extra(register, extra):  # hook arguments must be the spec's
        pass

    with pytest.raises(errors.PluginError, match="'extra'"):
        plugins.register_plugin(_module("extra", register_backbones=register_backbones_with_extra), name="extra")


def test_plugin_without_hooks_is_reported(monkeypatch):
    def register_backbones(register):  # not marked with @hookimpl
        register("forgotten", lambda **kw: None)

    import types

    mod = types.ModuleType("unmarked")
    mod.register_backbones = register_backbones
    _fake_entry_points(monkeypatch, _FakeEntryPoint("unmarked", "suder-unmarked", mod))
    with pytest.warns(plugins.SuderPluginWarning, match="'unmarked'.*implements no suder hook"):
        plugins.get_plugin_manager()


def test_rewards_declare_whether_they_need_the_reference():
    from suder import rewards

    def register_rewards(register):
        register("needs-ref", lambda direction, **o: None, ("und",), "reads ctx.reference", needs_reference=True)
        register(
            "maybe-ref",
            lambda direction, **o: None,
            ("gen", "und"),
            "reads ctx.reference when asked",
            needs_reference=lambda options: options.get("my_option") == "ref",
        )
        register("no-ref", lambda direction, **o: None)

    plugins.register_plugin(_module("ref-rewards", register_rewards=register_rewards), name="ref-rewards")
    assert rewards.needs_reference("needs-ref", {}) is True
    assert rewards.needs_reference("maybe-ref", {"my_option": "ref"}) is True
    assert rewards.needs_reference("maybe-ref", {"my_option": "other"}) is False
    assert rewards.needs_reference("no-ref", {}) is False
    # the built-ins declare theirs the same way
    assert rewards.needs_reference("dsr-consensus", {"consensus_source": "reference"}) is True
    assert rewards.needs_reference("dsr-consensus", {"consensus_source": "policy"}) is False
    assert rewards.needs_reference("dsr", {}) is False
    assert registry.get_reward_spec("dsr-consensus").needs_reference is not False


def test_needs_reference_must_be_bool_or_callable():
    def register_rewards(register):
        register("bad-ref", lambda direction, **o: None, needs_reference="yes")

    plugins.register_plugin(_module("bad-ref", register_rewards=register_rewards), name="bad-ref")
    with pytest.warns(plugins.SuderPluginWarning, match="needs_reference must be a bool or a callable"):
        assert "bad-ref" not in registry.rewards()
