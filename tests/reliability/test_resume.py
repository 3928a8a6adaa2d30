"""--resume applies and records the training settings it may change, refuses the others and
then writes nothing (issue 15: 4)."""

import pytest
import yaml

from lr_quant.checkpoint import load_checkpoint


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def logits_group(path):
    _, meta, state = load_checkpoint(path)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    return meta, groups["logits_lr"]


def test_changed_learning_rate_is_applied_and_recorded(stopped_run, fp_weights, cli):
    ckpt = stopped_run / "checkpoint.safetensors"
    meta, group = logits_group(ckpt)
    old = meta["recipe"]["train"]
    assert group["initial_lr"] == old["logits_lr"] != 1e-4 and old["grad_clip"] != 1
    rc, out, err = cli("train", "--output", stopped_run, "--model.checkpoint", fp_weights, "TINY",
                       "--resume", "--train.logits_lr", "1e-4", "--train.grad_clip", "1",
                       "--stop-after-steps", "3")
    assert rc == 0, err
    assert (f"resume applies the changed settings train.grad_clip: {old['grad_clip']!r} -> 1.0; "
            f"train.logits_lr: {old['logits_lr']!r} -> 0.0001") in out
    meta, group = logits_group(ckpt)
    # applied: the optimizer trained step 3 with the new base rate (same schedule position)
    assert group["initial_lr"] == 1e-4 and 0 < group["lr"] <= 1e-4
    # recorded: what was applied, nothing else
    assert meta["recipe"]["train"]["logits_lr"] == 1e-4 == meta["train"]["logits_lr"]
    assert meta["recipe"]["train"]["grad_clip"] == 1
    assert yaml.safe_load((stopped_run / "recipe.yaml").read_text())["train"]["logits_lr"] == 1e-4


@pytest.mark.parametrize("argv, change", [
    (["--set", "weights.conv=lr_ternary_per_channel"],
     "weights.conv: 'lr_binary_per_channel' -> 'lr_ternary_per_channel'"),
    (["--train.batch_size", "16"], "train.batch_size: 32 -> 16"),
    (["--data.image_size", "24"], "data.image_size: 16 -> 24"),
])
def test_a_refused_resume_lists_the_changes_and_writes_nothing(argv, change, stopped_run,
                                                               fp_weights, cli):
    before = snapshot(stopped_run)
    rc, _, err = cli("train", "--output", stopped_run, "--model.checkpoint", fp_weights, "TINY",
                     "--resume", *argv)
    assert rc == 2 and "a resumed run cannot change" in err and change in err, err
    assert snapshot(stopped_run) == before


def test_resume_of_a_final_checkpoint_is_refused_before_any_work(stopped_run, fp_weights,
                                                                 cli, tmp_path):
    import torch

    from lr_quant.checkpoint import save_checkpoint

    _, meta, _ = load_checkpoint(stopped_run / "checkpoint.safetensors")
    final = save_checkpoint(tmp_path / "final.safetensors", torch.nn.Linear(1, 1),
                            {**meta, "frozen": True})
    rc, _, err = cli("train", "--output", tmp_path / "new", "--model.checkpoint", fp_weights,
                     "TINY", "--resume", final)
    assert rc == 2 and "holds a frozen (final) network" in err, err
    assert not (tmp_path / "new").exists()
