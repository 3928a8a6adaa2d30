"""Shared by the reliability probes: the CLI driven in process, tiny training settings, and a
stopped 2-step run to resume from."""

import shutil

import pytest

from lr_quant.cli import main

# tiny and fast: a 15 % digits split, 6 steps per epoch
TINY = ["-c", "quickstart", "--train.epochs", "2", "--data.train_fraction", "0.15",
        "--train.batch_size", "32", "--train.sampled_networks", "1",
        "--train.bn_reestimate_batches", "2", "--train.val_fraction", "0.05", "--no-progress"]


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr) of `lr-quant argv` run in process; an
    argument "TINY" stands for the TINY settings."""
    def run(*argv):
        rc = main([str(b) for a in argv for b in (TINY if a == "TINY" else [a])])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.fixture(scope="session")
def _stopped_run(tmp_path_factory, fp_weights):
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", "--output", str(out), "--model.checkpoint", str(fp_weights), *TINY,
                 "--stop-after-steps", "2"]) == 0
    return out


@pytest.fixture
def stopped_run(_stopped_run, tmp_path):
    """A copy of a run folder stopped after 2 steps: recipe.yaml + checkpoint.safetensors."""
    return shutil.copytree(_stopped_run, tmp_path / "run")
