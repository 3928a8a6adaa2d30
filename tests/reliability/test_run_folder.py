"""Outputs never overwrite inputs; one run per output folder, one process at a time; the
output folder is checked before any work (issue 15: 1, 2, 8a)."""

import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple

import pytest

import lr_quant.train.pipeline as pipeline


def snapshot(folder):
    """{name: (bytes, mtime)} of every file in `folder`."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as building the data."""
    def boom(*_):
        raise AssertionError("the command started working before refusing")
    monkeypatch.setattr(pipeline, "build_datasets_for", boom)


# -- 1: no output onto an input ---------------------------------------------------------
def test_export_refuses_to_overwrite_its_checkpoint(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    final = run / "final.safetensors"
    final.write_bytes(b"trained weights")
    (run / "link.onnx").symlink_to(final)
    before = snapshot(run)
    for output in (final, run / "link.onnx", tmp_path / "run" / ".." / "run" / final.name):
        rc, _, err = cli("export", final, "--output", output)
        assert rc == 2 and "would overwrite the input checkpoint" in err, err
        assert len(err.strip().splitlines()) == 1
    onnx = run / "model.onnx"   # the default output (checkpoint.with_suffix(".onnx")) too
    onnx.write_bytes(b"onnx")
    rc, _, err = cli("export", onnx)
    assert rc == 2 and "would overwrite the input checkpoint" in err, err
    onnx.unlink()
    assert snapshot(run) == before


@pytest.mark.parametrize("argv, flag", [
    (["convert", "-c", "{run}/recipe.yaml", "--model.num_classes", "10", "--output", "{run}"],
     "-c"),
    (["convert", "-c", "quickstart", "--model.checkpoint", "{run}/converted.safetensors",
      "--model.num_classes", "10", "--output", "{run}", "--force"], "--model.checkpoint"),
    (["train", "TINY", "-c", "{run}/recipe.yaml", "--output", "{run}", "--force"], "-c"),
    (["train", "TINY", "--model.checkpoint", "{run}/final.safetensors", "--output", "{run}",
      "--resume"], "--model.checkpoint"),
    (["quickstart", "--recipe", "{run}/recipe.yaml", "--output", "{run}"], "--recipe"),
])
def test_recipe_commands_refuse_to_overwrite_their_inputs(argv, flag, tmp_path, cli, no_work):
    from lr_quant.recipe import load_recipe

    run = tmp_path / "run"
    run.mkdir()
    load_recipe("quickstart").to_yaml(run / "recipe.yaml")
    for name in ("converted.safetensors", "final.safetensors", "checkpoint.safetensors"):
        (run / name).write_bytes(b"weights")
    before = snapshot(run)
    rc, _, err = cli(*[a.replace("{run}", str(run)) for a in argv])
    assert rc == 2 and f"would overwrite the input {flag} " in err, err
    assert snapshot(run) == before


# -- 2: one run per folder, one process at a time ---------------------------------------
@pytest.mark.parametrize("name", ["checkpoint.safetensors", "final.safetensors",
                                  "metrics.json", "recipe.yaml"])
def test_train_refuses_a_folder_that_holds_a_run(name, tmp_path, fp_weights, cli, no_work):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text("a previous run")
    before = snapshot(run)
    rc, _, err = cli("train", "--output", run, "--model.checkpoint", fp_weights, "TINY")
    assert rc == 2 and f"holds a previous run ({name})" in err and "--force" in err, err
    assert snapshot(run) == before


def test_force_replaces_the_previous_run(tmp_path, fp_weights, cli):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("final.safetensors", "metrics.json", "history.csv", "recipe.yaml",
                 "checkpoint.safetensors.tmp"):
        (run / name).write_text("previous run")
    (run / "notes.txt").write_text("mine")
    rc, _, err = cli("train", "--output", run, "--model.checkpoint", fp_weights, "TINY",
                     "--force", "--stop-after-steps", "1")
    assert rc == 0, err
    # nothing of the previous run is left beside the new one; other files are kept
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "notes.txt",
                                                     "recipe.yaml"]
    assert "previous run" not in (run / "recipe.yaml").read_text()


def test_resume_without_a_checkpoint_fails(tmp_path, fp_weights, cli, no_work):
    run = tmp_path / "run"
    rc, _, err = cli("train", "--output", run, "--model.checkpoint", fp_weights, "TINY",
                     "--resume")
    assert rc == 2 and "nothing to continue" in err, err
    assert not run.exists()


def test_force_and_resume_of_the_same_run_contradict(stopped_run, fp_weights, cli, no_work):
    before = snapshot(stopped_run)
    rc, _, err = cli("train", "--output", stopped_run, "--model.checkpoint", fp_weights, "TINY",
                     "--resume", "--force")
    assert rc == 2 and "--force would delete" in err, err
    assert snapshot(stopped_run) == before


def test_a_second_concurrent_training_fails_at_once(tmp_path, fp_weights, cli, no_work):
    """Another process holds the run folder (as a running `lr-quant train` does)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242')\n"
         "print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        rc, _, err = cli("train", "--output", run, "--model.checkpoint", fp_weights, "TINY")
        assert rc == 2 and "is in use by another lr-quant process (pid 4242)" in err, err
        assert time.time() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run.iterdir()) == [".lock"]   # the holder's


def test_the_lock_is_held_for_the_run_and_released(tmp_path, fp_weights, cli, monkeypatch):
    from lr_quant.run_folder import RunFolderError, run_folder_lock

    run = tmp_path / "run"
    real_fit = pipeline.Trainer.fit
    seen = []

    def fit(self, *args, **kwargs):   # while training: a second holder is refused
        with pytest.raises(RunFolderError, match="in use"):
            with run_folder_lock(run):
                pass
        seen.append(True)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Trainer, "fit", fit)
    rc, _, err = cli("train", "--output", run, "--model.checkpoint", fp_weights, "TINY",
                     "--stop-after-steps", "1")
    assert rc == 0 and seen, err
    assert not (run / ".lock").exists()
    with run_folder_lock(run):   # released
        pass


# -- 8a: the output folder is checked before any work ------------------------------------
@pytest.mark.parametrize("command", ["train", "convert", "export"])
def test_an_output_that_cannot_be_created_fails_first(command, tmp_path, fp_weights, cli,
                                                     no_work):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = {"train": ["train", "--output", blocker / "run", "--model.checkpoint", fp_weights,
                      "TINY"],
            "convert": ["convert", "-c", "quickstart", "--model.num_classes", "10",
                        "--model.checkpoint", fp_weights, "--output", blocker / "run"],
            "export": ["export", fp_weights, "--output", blocker / "m.onnx"]}[command]
    rc, out, err = cli(*argv)
    assert rc == 2 and f"cannot create output folder {blocker}" in err, err
    assert "Traceback" not in err and out == ""


def test_a_full_disk_fails_first_and_says_what_it_needs(tmp_path, fp_weights, cli, no_work,
                                                       monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 * 2**20, 9 * 2**20, 2**20))
    rc, _, err = cli("train", "--output", tmp_path / "run", "--model.checkpoint", fp_weights,
                     "TINY")
    # resnet10t: 4.9 M parameters x 32 bytes
    assert rc == 2 and "not enough free space" in err and "about 150 MB needed" in err, err
    assert "1 MB free" in err
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_fails_first(tmp_path, fp_weights, cli, no_work, monkeypatch):
    """A read-only folder (simulated: root may write into a chmod 0500 folder, and CI runs
    as root): the probe file cannot be created."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    rc, _, err = cli("train", "--output", locked / "run", "--model.checkpoint", fp_weights,
                     "TINY")
    assert rc == 2 and f"cannot write to {locked}" in err, err
    assert "Permission denied" in err and not (locked / "run").exists()
