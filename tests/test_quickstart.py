"""Pretrained weights through timm, and `lr-quant quickstart` end to end (console script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from lr_quant.models import ModelError, create_model, save_weights


# subprocesses import this checkout (not whatever lr_quant the environment points at)
REPO_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")] if p)}

def test_local_pretrained_file_loads_through_timm(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=10)
    path = save_weights(source, tmp_path / "fp.safetensors")
    model = create_model("resnet10t", 10, pretrained=str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k   # classifier kept too
    # other number of classes: timm re-initializes the classifier, the backbone loads
    model20 = create_model("resnet10t", 20, pretrained=str(path))
    assert model20.fc.out_features == 20
    assert torch.equal(model20.conv1[0].weight, source.conv1[0].weight)


def test_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        create_model("resnet10t", 10, pretrained=str(tmp_path / "nope.safetensors"))
    path = save_weights(torch.nn.Linear(3, 3), tmp_path / "linear.safetensors")
    with pytest.raises(ModelError, match="do not fit 'resnet10t'"):
        create_model("resnet10t", 10, pretrained=str(path))
    with pytest.raises(ModelError, match="unknown timm model 'resnet_nope'"):
        create_model("resnet_nope", 10)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="without a network pass a local file"):
        create_model("resnet10t", 10, pretrained=True)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's main command as a user runs it. Measured here (2 shared CPU cores):
    FP 98%, LR at conversion 10%, frozen LR binary 95-96% after the recipe's epochs."""
    out = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "lr_quant.cli", "quickstart", "--output", str(out),
         "--no-progress"], capture_output=True, text=True, timeout=1200, env=REPO_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("recipe.yaml", "checkpoint.safetensors", "final.safetensors", "history.csv",
                 "history.json", "curves.png", "metrics.json", "summary.txt",
                 "resnet10t_lr.onnx", "fp_resnet10t_digits16.safetensors"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fp_test_accuracy"] > 0.93
    assert metrics["frozen_test_accuracy"] > 0.85
    assert metrics["frozen_test_accuracy"] > metrics["converted_test_accuracy"] + 0.3
    assert metrics["qonnx_max_abs_error"] < 1e-4
    stdout = result.stdout
    assert "verified by qonnx" in stdout and "compression x" in stdout
    assert "frozen (mode), BN re-estimated" in stdout
