"""The layers are checked, not hoped for: the import-linter contracts in pyproject.toml hold (and break when a lower
layer imports a higher one), and no module of suder uses another module's private names (ruff's PLC2701 sees only
``from x import _y`` from outside the package; ``shapes._phrase`` from ``suder.evaluate`` went unseen)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path, *args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")  # the dev extra installs it (.ci/run)
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)


def test_import_contracts_hold():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" in done.stdout and " 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("suder/backbones/show_o/shapes_world.py", "from ...trainer import train", "backbones"),
        ("suder/backbones/janus_pro/modeling.py", "from ...config import TrainConfig", "backbones"),
        ("suder/worlds/shapes.py", "from ..rewards import dsr_generation", "world"),
        ("suder/protocol.py", "from .registry import load_backbone", "foundation"),
        ("suder/losses.py", "from .rollout import Rollout", "foundation"),
        ("suder/plugins.py", "from .registry import reset", "plugin-layer"),
        ("suder/plugins.py", "from .registry import reset", "acyclic"),
        ("suder/backbones/janus_pro/modeling.py", "from .backbone import DEFAULT_MODEL", "acyclic"),
    ],
)
def test_a_lower_layer_importing_a_higher_one_breaks_a_contract(tmp_path, module, line, contract):
    """The contract (by its id in pyproject.toml) on a copy of suder with one forbidden import added, inside a
    function (a lazy import is still an import); it holds on the copy without it."""
    shutil.copytree(ROOT / "suder", tmp_path / "suder", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path, "--contract", contract).returncode == 0
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n\ndef _layer_violation():\n    {line}\n")
    done = lint_imports(tmp_path, "--contract", contract)
    assert done.returncode == 1 and "1 broken" in done.stdout, done.stdout + done.stderr


def private_uses(package: Path) -> list[str]:
    """``file:line name`` for every use, in a module of ``package``, of a private name of another module of it:
    ``from .x import _y`` and ``x._y`` where ``x`` is a module imported from the package."""
    top = package.name
    found = []
    for path in sorted(package.rglob("*.py")):
        dotted = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        here = dotted.removesuffix(".__init__")
        parent = here if path.name == "__init__.py" else here.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules: set[str] = set()  # local names bound to a module of the package
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = parent.split(".")[: len(parent.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                if base.split(".")[0] != top:
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if (package.parent / Path(*target.split("."))).with_suffix(".py").is_file() or (
                        package.parent / Path(*target.split(".")) / "__init__.py"
                    ).is_file():
                        modules.add(alias.asname or alias.name)
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and base != here:
                        found.append(f"{path.relative_to(package.parent)}:{node.lineno} {base}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top and alias.asname:
                        modules.add(alias.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    assert private_uses(ROOT / "suder") == []


def test_private_uses_sees_both_kinds(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "world.py").write_text("def _phrase(x):\n    return x\n\n\ndef phrase(x):\n    return _phrase(x)\n")
    (pkg / "sub" / "audit.py").write_text(
        "from .. import world\nfrom ..world import _phrase, phrase\n\n\ndef f():\n    return world._phrase(1), phrase\n"
    )
    assert private_uses(pkg) == ["pkg/sub/audit.py:2 pkg.world._phrase", "pkg/sub/audit.py:6 world._phrase"]
