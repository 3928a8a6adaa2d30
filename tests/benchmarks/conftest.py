"""The benchmarks package lives beside lr_quant at the repository root (not installed): the
fixture imports its modules from there."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmark_modules():
    """``benchmark_modules("quality", "report")`` -> the modules benchmarks.<name>."""
    def load(*names):
        sys.path.insert(0, str(ROOT))
        try:
            return tuple(importlib.import_module(f"benchmarks.{n}") for n in names)
        finally:
            sys.path.remove(str(ROOT))
    return load
