"""Checkpoints: safetensors + JSON, atomic, no pickle; clear errors on bad files."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lr_quant.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint,
                                 load_model_state, restore_rng_state, save_checkpoint)
from lr_quant.nn import LRQuantLinear


def small():
    return nn.Sequential(LRQuantLinear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def test_round_trip_of_model_optimizer_and_rng(tmp_path):
    model = small()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    rng = capture_rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    meta = {"epoch": 2, "history": [{"loss": float("nan")}], "name": "x"}
    path = save_checkpoint(tmp_path / "c.safetensors", model, meta,
                           {"optimizer": opt.state_dict(), "rng": rng, "tup": (1, "a")})
    assert not (tmp_path / "c.safetensors.tmp").exists()
    state, meta2, training = load_checkpoint(path)
    assert meta2["epoch"] == 2 and meta2["name"] == "x" and np.isnan(meta2["history"][0]["loss"])
    assert training["tup"] == (1, "a")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    opt2 = torch.optim.Adam(small().parameters(), lr=1e-2)
    opt2.load_state_dict(training["optimizer"])
    assert set(training["optimizer"]["state"]) == set(opt.state_dict()["state"])
    restore_rng_state(training["rng"])
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_files_hold_no_pickle(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", small(), {"k": 1},
                           {"rng": capture_rng_state()})
    head = path.read_bytes()[:8]
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(head, "little")])
    assert header["__metadata__"]["format"] == "lr_quant.checkpoint/1"
    assert b"\x80\x04" not in path.read_bytes()[:16]  # not a pickle/zip file


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", small(), {"epoch": 1})
    import safetensors.torch as st

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, small(), {"epoch": 2})
    assert load_checkpoint(path)[1]["epoch"] == 1


def test_corrupt_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint(tmp_path / "c.safetensors", small(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(path)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an lr_quant checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", small(), {"architecture": "small"})
    state, meta, _ = load_checkpoint(path)
    other = nn.Sequential(LRQuantLinear(6, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    with pytest.raises(CheckpointError, match=r"does not fit this model.*shape mismatches 0\."):
        load_model_state(other, state, source=str(path))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_model_state(nn.Sequential(LRQuantLinear(6, 5)), state)
    with pytest.raises(CheckpointError, match="for architecture 'small', the model is 'resnet'"):
        load_model_state(small(), state, architecture=meta["architecture"],
                         expected_architecture="resnet")
    load_model_state(small(), state)


RECIPE_FILES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _tiny_model(recipe):
    """A small timm model the recipe is meant for, and its input size."""
    import timm

    if recipe.model.name == "finn_cnv":
        return timm.create_model("finn_cnv", num_classes=4, channels=(4, 8, 8),
                                 fc_features=8), 32
    kwargs = recipe.model.kwargs if recipe.finn else {}   # e.g. avg_down: false
    return timm.create_model("test_efficientnet" if "mobilenet" in recipe.name
                             else "test_resnet", num_classes=4, **kwargs), 16


def _converted(recipe):
    from lr_quant.convert import convert

    torch.manual_seed(0)
    model, size = _tiny_model(recipe)
    return convert(model, recipe, example_input=torch.randn(2, 3, size, size)), size


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_every_packaged_recipe_round_trips_a_trained_checkpoint(path, tmp_path):
    """A trained model's checkpoint loads into a freshly converted model and gives the same
    outputs. Runtime-statistics scales (the int8 input quantizer of finn_cnv_w1a1) are left
    out of a fresh model's state_dict() by Brevitas until initialized."""
    from lr_quant.recipe import Recipe

    recipe = Recipe.from_yaml(path)
    trained, size = _converted(recipe)
    trained.train()
    torch.manual_seed(1)
    for _ in range(2):
        trained(torch.randn(8, 3, size, size)).sum().backward()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "c.safetensors", trained, meta={})
    state, _, _ = load_checkpoint(tmp_path / "c.safetensors")

    fresh, _ = _converted(recipe)
    load_model_state(fresh, state)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)


def test_an_uninitialized_runtime_scale_may_be_absent_but_not_an_unknown_key(tmp_path):
    from lr_quant.recipe import load_recipe

    recipe = load_recipe("finn_cnv_w1a1")
    state = _converted(recipe)[0].state_dict()
    assert not any(k.endswith("scaling_impl.value") and "input_quant" in k for k in state)
    load_model_state(_converted(recipe)[0], state)  # the fresh model collects them later
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys extra.weight"):
        load_model_state(_converted(recipe)[0], state)
