"""The `lr-quant` command line: help, recipe overrides, bad inputs, train / resume / eval /
export / summary on a tiny run (in process, and as a console script in test_quickstart)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lr_quant.checkpoint import save_checkpoint
from lr_quant.cli import build_parser, main, parse_value, resolve_recipe


# subprocesses import this checkout (not whatever lr_quant the environment points at)
REPO_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")] if p)}

def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_names_every_command():
    result = subprocess.run([sys.executable, "-m", "lr_quant.cli", "--help"],
                            capture_output=True, text=True, timeout=300, env=REPO_ENV)
    assert result.returncode == 0
    for cmd in ("quickstart", "train", "convert", "eval", "export", "summary"):
        assert cmd in result.stdout
    assert "lr-quant quickstart" in result.stdout


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("cosine") == "cosine" and parse_value("[1, 2]") == [1, 2]


def test_overrides_apply_in_order():
    args = build_parser().parse_args(
        ["train", "-c", "quickstart", "--output", "x", "--train.epochs", "7",
         "--train.logits_lr", "1e-3", "--data.image_size", "24", "--train.grad_clip", "null",
         "--set", "weights.conv=lr_ternary_per_channel", "--set", "train.sign_noise_std.end=0.2"])
    recipe = resolve_recipe(args)
    assert recipe.train.epochs == 7 and recipe.train.logits_lr == 1e-3
    assert recipe.data.image_size == 24 and recipe.train.grad_clip is None
    assert recipe.weights.conv.name == "lr_ternary_per_channel"
    assert recipe.train.sign_noise_std.end == 0.2
    assert recipe.model.name == "resnet10t"   # from the file


@pytest.mark.parametrize("argv, message", [
    (["--train.epochs", "-1"], "train.epochs: epochs must be >= 0"),
    (["--set", "train.epoch=3"], "unknown key 'epoch'"),
    (["--train.optimizer", "adamx"], "train.optimizer: optimizer='adamx' is not a timm optimizer"),
    (["--train.schedule", "cosin"], "schedule='cosin' is not one of"),
    (["--train.batch_size", "many"], "expected an integer"),
    (["-c", "no_such_recipe.yaml"], "recipe file 'no_such_recipe.yaml' does not exist"),
    (["--data.dataset", "imagefolder", "--data.root", "{tmp}/missing"], "does not exist"),
    (["--model.name", "resnet_nonexistent"], "unknown timm model 'resnet_nonexistent'"),
    (["--model.checkpoint", "{tmp}/nope.safetensors"], "does not exist"),
])
def test_bad_inputs_fail_with_one_clear_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = [] if "-c" in argv else ["-c", "quickstart"]
    rc, out, err = run(["train", "--output", tmp_path / "run", *base, *argv], capsys)
    assert rc == 2
    assert message in err, err
    assert "Traceback" not in err


def test_corrupt_checkpoint_and_foreign_checkpoint(tmp_path, capsys):
    bad = tmp_path / "final.safetensors"
    bad.write_bytes(b"\x00" * 100)
    rc, _, err = run(["eval", bad], capsys)
    assert rc == 2 and "corrupt or unreadable" in err
    other = save_checkpoint(tmp_path / "other.safetensors", torch.nn.Linear(2, 2), {"x": 1})
    rc, _, err = run(["export", other], capsys)
    assert rc == 2 and "does not record its recipe" in err


TINY = ["-c", "quickstart", "--train.epochs", "2", "--data.train_fraction", "0.15",
        "--train.batch_size", "32", "--train.sampled_networks", "1",
        "--train.bn_reestimate_batches", "2", "--train.val_fraction", "0.05", "--no-progress"]


@pytest.mark.slow
def test_train_with_a_timm_optimizer_and_schedule(tmp_path, fp_weights, capsys):
    """--train.optimizer lamb --train.schedule tanh: one epoch trains with timm's Lamb (its
    groups in the checkpoint) at tanh rates: the history's rates (of the epoch's last step
    t = T - 1 of T) follow lr * (1 - tanh(-7 (1 - t / T) + 3 t / T)) / 2."""
    import math

    from lr_quant.checkpoint import load_checkpoint

    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--output", out, "--model.checkpoint", fp_weights, *TINY,
                           "--train.epochs", "1", "--train.sampled_networks", "0",
                           "--train.optimizer", "lamb", "--train.schedule", "tanh"], capsys)
    assert rc == 0, err
    _, meta, state = load_checkpoint(out / "checkpoint.safetensors")
    groups = state["optimizer"]["param_groups"]
    assert all("trust_clip" in g for g in groups)   # Lamb's
    (row,) = json.loads((out / "history.json").read_text())
    steps, train = row["step"], meta["train"]
    tr = (steps - 1) / steps
    factor = 0.5 * (1 - math.tanh(-7 * (1 - tr) + 3 * tr))
    assert row["logits_lr"] == pytest.approx(train["logits_lr"] * factor, rel=1e-9)
    assert row["lr"] == pytest.approx(train["params_lr"] * factor, rel=1e-9)


@pytest.mark.slow
def test_train_stop_resume_eval_export_summary(tmp_path, fp_weights, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--output", out, "--model.checkpoint", fp_weights, *TINY,
                           "--stop-after-steps", "3"], capsys)
    assert rc == 0, err
    assert "stopped after 3 steps" in stdout and not (out / "final.safetensors").exists()
    # a quantizer the checkpoint was not made for: refused with a clear message
    rc, _, err = run(["train", "--output", out, "--model.checkpoint", fp_weights, *TINY,
                      "--set", "weights.conv=lr_ternary_per_channel", "--resume"], capsys)
    assert rc == 2 and "a resumed run cannot change" in err and "weights.conv" in err
    rc, stdout, err = run(["train", "--output", out, "--model.checkpoint", fp_weights, *TINY,
                           "--resume"], capsys)
    assert rc == 0, err
    assert "resumed from" in stdout and "at epoch 1, step 3/" in stdout
    for name in ("recipe.yaml", "checkpoint.safetensors", "final.safetensors", "history.csv",
                 "history.json", "curves.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "fp_test_accuracy" in metrics and "frozen_test_accuracy" in metrics

    rc, stdout, err = run(["eval", out / "final.safetensors"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["network"] == "frozen"
    assert result["accuracy"] == pytest.approx(metrics["final_test_accuracy"], abs=1e-9)

    rc, stdout, err = run(["export", out / "final.safetensors", "--output", out / "m.onnx"], capsys)
    assert rc == 0, err
    assert "verified by qonnx" in stdout and (out / "m.onnx").stat().st_size > 0
    rc, _, err = run(["export", out / "checkpoint.safetensors"], capsys)
    assert rc != 0 and "not a frozen network" in err

    rc, stdout, err = run(["summary", out / "final.safetensors"], capsys)
    assert rc == 0, err
    assert "LRQuantConv2d" in stdout and "compression x" in stdout
