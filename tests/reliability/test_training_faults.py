"""Training faults (issue 15, items 3, 8b and 8c): a NaN / runaway stop that keeps the last
sane checkpoint and says how to continue, a corrupt image named in one line, Ctrl-C with the
resume command and no temporary files left (nor any a killed run left)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_quant.checkpoint import load_checkpoint, save_checkpoint
from lr_quant.data import Datasets, DataError, build_datasets, digits_split
from lr_quant.nn import LRQuantLinear
from lr_quant.quant import lr_weight_quant
from lr_quant.train import LAST_CHECKPOINT, LossDivergedError, NonFiniteLossError, Trainer
from lr_quant.train_config import DataConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _data(n_train=300):
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    train = TensorDataset(x_train[30:n_train], y_train[30:n_train])
    return Datasets(train=train, val=TensorDataset(x_train[:30], y_train[:30]),
                    test=TensorDataset(x_test, y_test), num_classes=10, train_eval=train,
                    example_shape=(64,))


def _model():
    torch.manual_seed(0)
    quant = lr_weight_quant("binary", False)
    return nn.Sequential(LRQuantLinear(64, 16, weight_quant=quant), nn.BatchNorm1d(16),
                         nn.ReLU(), LRQuantLinear(16, 10, weight_quant=quant))


def _trainer(out, logs=None, **cfg):
    cfg = {"epochs": 2, "batch_size": 50, "seed": 0, **cfg}
    return Trainer(_model(), TrainConfig(**cfg), _data(), output_dir=out,
                   log=(logs.append if logs is not None else (lambda *_: None)), progress=False)


def _set_learning_rates(trainer, lr):
    """What --train.lr_* 1e6 does from the next step on (optimizer and schedule)."""
    trainer.scheduler.base_values = [lr] * len(trainer.scheduler.base_values)
    for group in trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr


def _largest(state):
    return max(v.abs().max().item() for v in state.values() if v.is_floating_point())


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(".tmp") or p.name.endswith((".tmp", ".pending"))
                  or ".tmp." in p.name)


# -- item 3: NaN / runaway stops -------------------------------------------------------------
def test_nan_stop_keeps_the_last_checkpoint_whose_loss_was_checked(tmp_path):
    """After 3 sane steps the rates jump to 1e6: the update of step 4 wrecks the weights
    (finite, huge) and step 5's loss stops training. The kept checkpoint is step 3's (its
    parameters gave step 4's sane loss), not step 4's, and the message gives the command."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("# written by lr-quant train\n")
    trainer = _trainer(out, optimizer="sgd", logits_lr=0.05, params_lr=0.01,
                       checkpoint_every=1)
    trainer.fit(stop_after_steps=3)
    good = load_checkpoint(out / LAST_CHECKPOINT)[0]
    _set_learning_rates(trainer, 1e6)
    with pytest.raises(NonFiniteLossError) as stop:
        trainer.fit()
    message = str(stop.value)
    assert "at epoch 1, step 5" in message, message
    model_state, meta, _ = load_checkpoint(out / LAST_CHECKPOINT)
    assert meta["global_step"] == 3
    assert all(torch.equal(model_state[k], good[k]) for k in good)
    assert _largest(model_state) < 100
    assert f"the last good checkpoint is {out / LAST_CHECKPOINT} (step 3)" in message
    assert (f"lr-quant train -c {out / 'recipe.yaml'} --output {out} --resume "
            f"--train.logits_lr 0.005 --train.params_lr 0.001 --train.grad_clip 1") in message
    assert "\n" not in message and _leftovers(out) == []


def test_resume_with_lower_learning_rates_applies_them(tmp_path):
    """The stored optimizer state carries its learning rates (1e6 here): resuming with sane
    flags must train with those, not hit NaN again at the same step."""
    out = tmp_path / "run"
    trainer = _trainer(out, optimizer="sgd", logits_lr=0.05, params_lr=0.01)
    trainer.fit(stop_after_steps=3)
    _set_learning_rates(trainer, 1e6)
    trainer.save(out / LAST_CHECKPOINT)   # its optimizer holds lr 1e6 (as the did)
    assert load_checkpoint(out / LAST_CHECKPOINT)[2]["optimizer"]["param_groups"][0]["lr"] == 1e6
    resumed = _trainer(out, optimizer="sgd", logits_lr=0.05, params_lr=0.01, grad_clip=1.0)
    resumed.resume(out / LAST_CHECKPOINT)
    # the default cosine schedule (no warmup) at the restored step 3
    factor = 0.5 * (1 + math.cos(math.pi * 3 / resumed.total_steps))
    groups = resumed.optimizer.param_groups
    assert {g["initial_lr"] for g in groups} == {0.05, 0.01}
    assert [g["lr"] for g in groups] == pytest.approx([g["initial_lr"] * factor for g in groups])
    history = resumed.fit()
    assert len(history) == 2 and np.isfinite(history[-1]["train_loss"])
    assert _largest(load_checkpoint(out / LAST_CHECKPOINT)[0]) < 100


def test_runaway_loss_stops_instead_of_finishing_at_garbage(tmp_path):
    """Adam at 1e6 keeps the loss finite but astronomically high: without the divergence
    check the run ends normally. train.divergence_factor (100) stops it; 0 switches it off."""
    _trainer(None, logits_lr=1e6, params_lr=1e6, divergence_factor=0).fit()   # finishes
    logs = []
    trainer = _trainer(tmp_path / "run", logs, logits_lr=1e6, params_lr=1e6)
    with pytest.raises(LossDivergedError, match=r"ran away: above train.divergence_factor "
                                                r"\(100\) x its reference level .*training "
                                                r"stopped \(no good checkpoint was written\)"):
        trainer.fit()
    assert not (tmp_path / "run" / LAST_CHECKPOINT).exists()
    assert _leftovers(tmp_path / "run") == []


def test_divergence_rule_tolerates_noise_and_uses_the_best_running_median(tmp_path):
    trainer = _trainer(None)
    for value in [2.3, 2.0, 1.5, 0.5, 0.2, 30.0, 0.3]:   # 150 x the last loss: a spike, fine
        trainer._check_loss(torch.tensor(value))
    assert trainer.state.loss_best == pytest.approx(1.5)   # lowest median of the windows so far
    assert trainer._loss_limit() == pytest.approx(150.0)   # 100 x max(best, 1)
    for value in [0.1] * 25:   # a well-fit model: the floor of 1 keeps the limit at 100
        trainer._check_loss(torch.tensor(value))
    assert trainer.state.loss_best == pytest.approx(0.1) and trainer._loss_limit() == 100.0
    trainer._check_loss(torch.tensor(99.0))
    with pytest.raises(LossDivergedError):
        trainer._check_loss(torch.tensor(101.0))


def test_divergence_factor_is_a_recipe_field():
    from lr_quant.cli import build_parser, resolve_recipe

    args = build_parser().parse_args(["train", "-c", "quickstart", "--output", "x",
                                      "--train.divergence_factor", "1000"])
    assert resolve_recipe(args).train.divergence_factor == 1000
    assert TrainConfig().divergence_factor == 100 and TrainConfig(divergence_factor=0)
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        TrainConfig(divergence_factor=0.5)


def test_cli_sgd_at_1e6_stops_without_a_wrecked_checkpoint(tmp_path, fp_weights, capsys):
    """The issue's command: the first update already wrecks the weights, so no checkpoint is
    kept (the old one held weights ~2e14) and the message says how to start again."""
    from lr_quant.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--output", str(out), "--model.checkpoint", str(fp_weights), "-c",
               "quickstart", "--train.epochs", "1", "--data.train_fraction", "0.15",
               "--train.batch_size", "32", "--train.val_fraction", "0.05", "--no-progress",
               "--train.optimizer", "sgd", "--train.logits_lr", "1e6", "--train.params_lr",
               "1e6", "--train.checkpoint_every", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "training stopped" in err and "--train.grad_clip 1" in err
    assert f"-c {out / 'recipe.yaml'} --output NEW_FOLDER" in err
    kept = out / LAST_CHECKPOINT
    assert not kept.exists() or _largest(load_checkpoint(kept)[0]) < 1e3
    assert _leftovers(out) == []


# -- item 8b: a corrupt image ----------------------------------------------------------------
def _image_folder(root, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_one_line_naming_the_file(tmp_path, damage):
    _image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "2.png"
    bad.write_bytes(b"not a png" if damage == "garbage" else bad.read_bytes()[:60])
    data = build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8),
                          val_fraction=0.0)
    for workers in (0, 1):   # in the main process, and re-raised from a worker
        with pytest.raises(DataError) as error:
            for _ in DataLoader(data.train, batch_size=4, num_workers=workers):
                pass
        message = str(error.value)
        assert message.startswith(f"cannot read image {bad} (") and "\n" not in message
        assert "delete or replace the file" in message


def test_corrupt_first_image_fails_when_the_data_is_built(tmp_path):
    _image_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "0.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        build_datasets(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))


# -- item 8c: Ctrl-C, temporary files --------------------------------------------------------
def test_ctrl_c_prints_the_resume_command_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("# written by lr-quant train\n")
    logs = []
    trainer = _trainer(out, logs, checkpoint_every=2)
    set_schedules = trainer._set_schedules

    def interrupt_at_step_5(step):
        if step == 4:
            raise KeyboardInterrupt
        set_schedules(step)

    monkeypatch.setattr(trainer, "_set_schedules", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert logs[-1] == (f"interrupted at epoch 1, step 4; the last checkpoint is "
                        f"{out / LAST_CHECKPOINT} (step 4); continue with: lr-quant train -c "
                        f"{out / 'recipe.yaml'} --output {out} --resume")
    assert load_checkpoint(out / LAST_CHECKPOINT)[1]["global_step"] == 4
    assert _leftovers(out) == []


def test_interrupted_checkpoint_write_removes_its_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_checkpoint(tmp_path / "checkpoint.safetensors", nn.Linear(2, 2), {"step": 1})
    write = safetensors.torch.save_file

    def write_then_interrupt(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt   # SIGINT lands when the (Rust) write returns

    monkeypatch.setattr(safetensors.torch, "save_file", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, nn.Linear(2, 2), {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
    assert load_checkpoint(path)[1] == {"step": 1}


def test_temporary_files_of_a_killed_run_are_removed_when_training_starts(tmp_path):
    """SIGKILL mid-write leaves safetensors' hidden .tmpXXXXXX, our <name>.tmp and an
    unconfirmed checkpoint.safetensors.pending; the next run removes them."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [".tmpAb12Cd", "checkpoint.safetensors.tmp", "checkpoint.safetensors.pending",
             "history.csv.tmp", "curves.tmp.png", "recipe.yaml.tmp"]
    for name in stale + ["notes.txt", ".tmpdir_note"]:
        (out / name).write_bytes(b"x" * 10)
    logs = []
    _trainer(out, logs, epochs=1).fit()
    assert not any((out / name).exists() for name in stale)
    assert (out / "notes.txt").exists() and (out / ".tmpdir_note").exists()
    assert any("removed temporary files" in line and ".tmpAb12Cd" in line for line in logs)


@pytest.mark.slow
def test_sigint_through_the_cli(tmp_path, fp_weights):
    """A real SIGINT in `lr-quant train`: the resume command is printed, the process ends
    with status 130, no temporary file is left, and the command resumes."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)}
    argv = [sys.executable, "-m", "lr_quant.cli", "train", "--output", str(out),
            "--model.checkpoint", str(fp_weights), "-c", "quickstart", "--train.epochs", "1",
            "--data.train_fraction", "0.3", "--train.batch_size", "16", "--no-progress",
            "--train.checkpoint_every", "1"]
    # a shell without job control starts background jobs with SIGINT ignored, and the child
    # would inherit that: give it the default disposition, as an interactive terminal does
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / LAST_CHECKPOINT).exists() and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output   # the CLI maps KeyboardInterrupt to 130
    hint = next(line for line in output.splitlines() if line.startswith("interrupted at"))
    command = hint.split("continue with: ", 1)[1]
    assert command == f"lr-quant train -c {out / 'recipe.yaml'} --output {out} --resume"
    assert _leftovers(out) == []
    step = load_checkpoint(out / LAST_CHECKPOINT)[1]["global_step"]
    assert f"the last checkpoint is {out / LAST_CHECKPOINT} (step {step})" in hint
    resumed = subprocess.run([sys.executable, "-m", "lr_quant.cli", *command.split()[1:],
                              "--no-progress", "--stop-after-steps", str(step + 1)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
