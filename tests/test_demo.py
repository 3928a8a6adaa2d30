"""Learning works: LR binary / ternary MLPs on the offline digits (3 seeds each).

Measured on this machine (test split of 450 images, chance = 10%):
  fine-tuned from FP (15 + 15 epochs): FP 97-99%, LR at conversion 78-85%,
      frozen LR binary 96-98%, ternary 97-98%;
  from scratch (15 epochs): frozen binary 85-86%, ternary 86-90%.
Bounds leave 4+ points of margin below the worst seed.
"""

import json

import pytest
import torch

from lr_quant import freeze
from lr_quant.data import digits_split
from lr_quant.demo import DemoConfig, accuracy, fit, mlp, run_demo, to_lr

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("distribution", ["binary", "ternary"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fine_tuning_from_fp_recovers_accuracy(distribution, seed):
    results = run_demo(DemoConfig(distribution=distribution, seed=seed, fp_epochs=15,
                                  lr_epochs=15, output_dir=None), log=lambda *_: None)
    assert results["fp_accuracy"] > 0.95
    assert results["frozen_accuracy"] > 0.92
    assert results["frozen_accuracy"] > results["converted_mode_accuracy"] + 0.05


@pytest.mark.parametrize("distribution", ["binary", "ternary"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_from_scratch_learns(distribution, seed):
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_split(seed=seed)
    model = to_lr(mlp(256), distribution)
    fit(model, x_train, y_train, epochs=15, lr=1e-2, batch_size=64, seed=seed)
    freeze(model)
    assert accuracy(model, x_test, y_test) > 0.75


def test_demo_writes_a_verified_qonnx_file(tmp_path):
    results = run_demo(DemoConfig(distribution="ternary", per_channel_scale=True, fp_epochs=5,
                                  lr_epochs=3, output_dir=str(tmp_path)), log=lambda *_: None)
    assert (tmp_path / "mlp_ternary.onnx").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["frozen_accuracy"] == results["frozen_accuracy"]
    assert results["qonnx_max_abs_error"] < 1e-4
