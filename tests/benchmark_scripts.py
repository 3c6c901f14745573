"""The benchmark scripts, loaded in a test as ``python benchmarks/NAME.py`` loads them: with their
folder on ``sys.path``, where their shared ``bench_common`` module lives."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def load(name: str) -> ModuleType:
    """A fresh module object of benchmarks/NAME.py."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
