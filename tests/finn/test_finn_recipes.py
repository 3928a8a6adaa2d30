"""Every packaged FINN recipe, the way a user runs it: `lr-quant train` (1 epoch on the
offline digits) -> `lr-quant export` -> finn-plus' build steps up to the estimate reports.

The oracle is the frozen PyTorch network (loaded back from final.safetensors): FINN's
python execution after streamlining and after partitioning must reproduce it, the whole
network must sit in one StreamingDataflowPartition, and FINN must estimate every layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lr_quant
from lr_quant.cli import main
from lr_quant.finn import verdict_of
from lr_quant.recipe import Recipe
from lr_quant.summary import model_summary
from lr_quant.train import load_trained_model

RECIPES = sorted((Path(lr_quant.__file__).resolve().parents[1] / "recipes").glob("finn_*.yaml"))
#: small widths of the models the FINN recipes name (the topology is what FINN sees), and
#: the input size: a timm ResNet's last stage must stay >= 2x2 at the check (FINN's python
#: execution cannot run a padded 3x3 conv on a 1x1 map)
TINY_MODELS = {
    "finn_cnv": ("{channels: [8, 16, 16], fc_features: 16}", 32),
    "resnet10t": ("{avg_down: false, stem_width: 8, channels: [8, 16, 16, 16]}", 40),
}


def test_there_is_a_finn_recipe_for_each_tiny_model():
    assert {Recipe.from_yaml(p).model.name for p in RECIPES} <= set(TINY_MODELS)
    assert RECIPES


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_finn_recipe_trains_exports_and_maps_into_one_dataflow_partition(path, tmp_path, capsys):
    recipe = Recipe.from_yaml(path)
    kwargs, size = TINY_MODELS[recipe.model.name]
    run = tmp_path / "run"
    argv = ["train", "-c", str(path), "--output", str(run), "--data.dataset", "digits",
            "--data.image_size", str(size), "--train.epochs", "1", "--train.batch_size", "64",
            "--data.train_fraction", "0.5", "--train.sampled_networks", "1",
            "--train.bn_reestimate_batches", "2", "--no-progress",
            "--set", f"model.kwargs={kwargs}"]
    assert main(argv) == 0
    # the user's command: export, verify with qonnx, then finn-plus' build steps
    onnx_path = tmp_path / "model.onnx"
    rc = main(["export", str(run / "final.safetensors"), "--output", str(onnx_path), "--finn"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "FINN (finn-plus build steps): one dataflow partition, outputs equal" in stdout
    work = tmp_path / "model_finn" / "finn"
    result = json.loads((work / "result.json").read_text())
    expected = np.load(work / "io.npz")["expected"]

    # the oracle: the frozen PyTorch network reloaded from final.safetensors
    model, _, _ = load_trained_model(run / "final.safetensors")
    with torch.no_grad():
        again = model.eval()(torch.from_numpy(np.load(work / "io.npz")["inputs"])).numpy()
    np.testing.assert_allclose(again, expected, rtol=0, atol=1e-6)
    assert len({tuple(r) for r in np.round(expected, 4)}) > 1  # not a constant network
    flow = result["dataflow"]
    assert result["ok"], result["problems"]
    assert flow["partitions"] == 1
    assert set(flow["outside"]) <= {"Transpose", "Reshape", "Flatten", "TopK"}
    for step in ("step_streamline", "step_create_dataflow_partition"):
        assert flow["stages"][step]["max_abs_err"] <= 1e-3, step
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    ops = flow["partition_op_types"]
    assert sum(v for k, v in ops.items() if k.startswith("MVAU")) == len(layers)
    assert all(v["LUT"] > 0 for k, v in flow["estimates"].items() if k.startswith("MVAU"))

    # the summary's FINN column from this verdict: every layer mapped, FINN's line below
    summary = model_summary(model, torch.zeros(1, 3, size, size), finn=verdict_of(result))
    assert {r.finn for r in summary.rows} == {"yes (FINN build)"}
    footer = summary.table().splitlines()[-1]
    assert footer.startswith("FINN (finn-plus build steps): one dataflow partition")
    lut = sum(v["LUT"] for k, v in flow["estimates"].items() if k != "total")
    assert f"LUT {lut:,.0f}" in footer and all(f"{n} {k}" in footer for k, n in ops.items())
