"""The `lr-quant` console script, run as a user would (subprocess)."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lr_quant.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--fp-epochs", "5", "--lr-epochs", "5", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "verified by qonnx" in result.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["frozen_accuracy"] > 0.8
    assert (out / "mlp_binary.onnx").stat().st_size > 0


def test_help_and_bad_arguments():
    result = run_cli("--help")
    assert result.returncode == 0 and "demo" in result.stdout
    result = run_cli("demo", "--distribution", "septenary")
    assert result.returncode != 0 and "invalid choice: 'septenary'" in result.stderr
    result = run_cli("demo", "--lr-epochs", "-1")
    assert result.returncode != 0 and "--lr-epochs must be >= 0" in result.stderr
