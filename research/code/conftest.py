"""The suite's fixtures (``tests/conftest.py``: ``tiny_toy``, the isolated cache) for the research tests, and
``tests/`` on ``sys.path`` for its tiny configurations; this folder is on ``sys.path`` for the modules here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1] / "tests"
for folder in (HERE, TESTS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

_spec = importlib.util.spec_from_file_location("suder_tests_conftest", TESTS / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
_isolated_cache, tiny_toy_path, tiny_toy = _suite._isolated_cache, _suite.tiny_toy_path, _suite.tiny_toy
