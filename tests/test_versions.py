"""The supported version ranges have one source, pyproject.toml: the docs state them, the Emu3 plugin allows the same
transformers, and .ci/run's second venv installs their lower bounds."""

import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> dict[str, Requirement]:
    deps = tomllib.loads(path.read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def _lower(req: Requirement) -> str:
    (bound,) = [s.version for s in req.specifier if s.operator == ">="]
    return bound


def test_quickstart_states_pyprojects_ranges():
    """Each row of docs/quickstart.md's version table names pyproject's specifier exactly (`>=5.24,<6`)."""
    reqs = _requirements(ROOT / "pyproject.toml")
    doc = (ROOT / "docs" / "quickstart.md").read_text()
    rows = re.findall(r"^\| ([a-z, ]+) \| (`[^|]+`) \|", doc, flags=re.M)
    stated = {}
    for names, ranges in rows:
        for name, spec in zip(names.split(", "), re.findall(r"`([^`]+)`", ranges), strict=True):
            stated[name] = spec
    assert set(stated) == {"transformers", "accelerate", "trl", "diffusers", "peft", "tyro", "torch"}, stated
    for name, spec in stated.items():
        assert Requirement(f"{name}{spec}").specifier == reqs[name].specifier, (name, spec, str(reqs[name]))


def test_emu3_plugin_allows_suders_transformers():
    """The plugin is installed beside suder in both CI venvs: a narrower range would hold the main venv below the
    newest transformers suder allows, or make the oldest one uninstallable."""
    suder = _requirements(ROOT / "pyproject.toml")["transformers"]
    plugin = _requirements(ROOT / "plugins" / "suder-emu3" / "pyproject.toml")["transformers"]
    assert plugin.specifier == suder.specifier, (str(plugin), str(suder))


def test_ci_installs_the_lower_bounds_in_its_second_venv():
    """.ci/run's own line that reads the oldest versions, run on pyproject.toml, gives each lower bound pinned."""
    (line,) = [x for x in (ROOT / ".ci" / "run").read_text().splitlines() if x.startswith("oldest=$(")]
    got = subprocess.run(["bash", "-c", f"{line}; echo $oldest"], cwd=ROOT, capture_output=True, text=True, check=True)
    reqs = _requirements(ROOT / "pyproject.toml")
    want = {f"{n}=={_lower(reqs[n])}" for n in ("transformers", "accelerate", "trl")}
    assert set(got.stdout.split()) == want
