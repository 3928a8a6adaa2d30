"""Quantized models without LR layers (STE: Brevitas binary weights, `ste_sign`
activations) through `lr-quant train / eval / export`: finalize re-estimates BatchNorm on
the trained network (nothing to freeze or sample), writes final.safetensors and
metrics.json, and the final checkpoint evaluates to the reported accuracy and exports to a
QONNX file that qonnx verifies."""

import json
import re

import onnx
import pytest

from lr_quant.cli import main
from lr_quant.train import NO_LR_NETWORK

STE_W1 = ["--set", "weights.conv=brevitas_binary", "--set", "weights.depthwise=brevitas_binary",
          "--set", "weights.linear=brevitas_binary"]
STE_A1 = ["--set", "activations.quantizer=ste_sign", "--set", "activations.drop_relu=true",
          "--set", "activations.threshold_init=median"]
# one epoch of 6 steps on 15% of the digits (16x16); sampled_networks stays at the
# recipe's 2, which a model without LR layers ignores
SHORT = ["--train.epochs", "1", "--data.train_fraction", "0.15", "--train.batch_size", "32",
         "--train.bn_reestimate_batches", "2", "--train.val_fraction", "0.05", "--no-progress"]
ONE_EPOCH = ["-c", "quickstart", *SHORT]
# the packaged W1A1 default (STE weights and signs) on the quick start's model and data
PACKAGED_W1A1 = ["-c", "resnet_w1a1", "--model.name", "resnet10t", "--model.num_classes", "10",
                 "--data.dataset", "digits", "--data.image_size", "16", *SHORT]


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flags, bipolar_nodes", [
    (ONE_EPOCH + STE_W1, 13),            # 13 binary conv weights (first conv and fc float)
    (ONE_EPOCH + STE_W1 + STE_A1, 26),   # + 13 sign activations
    (PACKAGED_W1A1, 26),                 # recipes/resnet_w1a1.yaml: the same, as shipped
], ids=["STE-W1", "STE-W1A1", "resnet_w1a1"])
def test_ste_recipe_trains_evaluates_and_exports(flags, bipolar_nodes, tmp_path, fp_weights,
                                                capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--output", out, "--model.checkpoint", fp_weights,
                           *flags], capsys)
    assert rc == 0, err
    assert ("sampled_networks=2 ignored" in stdout) == ("quickstart" in flags)
    assert "trained, BN re-estimated" in stdout and "LR trained" not in stdout
    for name in ("final.safetensors", "metrics.json", "checkpoint.safetensors", "history.csv"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_network"] == NO_LR_NETWORK
    assert {"fp_test_accuracy", "converted_test_accuracy", "trained_val_accuracy",
            "trained_test_accuracy", "frozen_val_accuracy", "frozen_test_accuracy"} <= set(metrics)
    assert not [k for k in metrics if k.startswith(("lr_mode", "sampled"))]
    assert metrics["final_test_accuracy"] == metrics["frozen_test_accuracy"]

    # oracle: the final checkpoint, rebuilt from its recipe and evaluated again
    rc, stdout, err = run(["eval", out / "final.safetensors"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["network"].startswith("final") and result["count"] == 450
    assert result["accuracy"] == pytest.approx(metrics["final_test_accuracy"], abs=1e-9)

    onnx_path = out / "m.onnx"
    rc, stdout, err = run(["export", out / "final.safetensors", "--output", onnx_path], capsys)
    assert rc == 0, err
    error = float(re.search(r"max abs error (\S+)", stdout).group(1))
    assert error < 1e-4, stdout
    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node]
    assert ops.count("BipolarQuant") == bipolar_nodes

    # the training checkpoint is not the final network: evaluated and labelled as such,
    # refused by export
    rc, stdout, err = run(["eval", out / "checkpoint.safetensors"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["network"].startswith("training checkpoint")
    rc, _, err = run(["export", out / "checkpoint.safetensors"], capsys)
    assert rc == 2 and "not a frozen network" in err
