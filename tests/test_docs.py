"""Docs and examples stay current: every config field is documented, every recipe loads and names its command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from suder.config import FIELDS, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in FIELDS if f"| `{name}` |" not in doc]
    assert not missing, f"undocumented config fields: {missing}"


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load_and_open_with_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "suder" in first and str(path.relative_to(ROOT)) in first, first
    load_yaml(str(path))  # unknown keys would raise


def test_readme_has_two_setup_commands_and_suder_run():
    readme = (ROOT / "README.md").read_text()
    install = 'pip install "torch==2.13.0" -e ".[dev]" -e plugins/suder-emu3'
    assert install in readme and readme.count("    pip install") == 1  # one install command
    assert "HF_HUB_OFFLINE=1 python -m pytest" in readme
    assert "\n    suder run\n" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.replace("pip install", "pip install --quiet") in ci and "HF_HUB_OFFLINE=1 python -m pytest" in ci


# Internal notes (the paper, specs, reference notes) are not shipped; code and docs must not send users there.
INTERNAL = ("shared/reference", "shared/specs", "shared/paper", "dsr-prototype", "janus-transformers.md")


def test_no_pointers_to_internal_notes():
    hits = []
    for folder in ("suder", "docs", "examples", "plugins"):
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"):
                continue
            rel = str(path.relative_to(ROOT))
            text = path.read_text(encoding="utf-8")
            hits += [f"{rel}: {needle}" for needle in INTERNAL if needle in text]
    assert not hits, f"point to docs/ (or state the fact) instead of internal notes: {hits}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    for folder in ("docs", "research", "plugins"):
        files += sorted((ROOT / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def test_relative_links_resolve():
    """Every relative link in the docs, research notes and READMEs names a file that exists and, for a Markdown
    file, a heading it has (research/ moved out of docs/results.md; a moved section must not leave a dead link)."""
    broken = []
    for path in _markdown_files():
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            rel = f"{path.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{rel} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{rel} (no such heading)")
    assert not broken, f"dead links: {broken}"
