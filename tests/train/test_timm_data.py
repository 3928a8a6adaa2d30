"""`lr-quant train` end to end on timm's data pipeline: a Hugging Face data set read from local
files (offline), a model whose pretrained_cfg has non-ImageNet statistics, mixup with label
smoothing; the resolved data config is logged, recorded in recipe.yaml and the checkpoints, and
`lr-quant eval` prepares the test images the same way."""

import json

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from lr_quant.checkpoint import load_checkpoint_meta
from lr_quant.cli import main
from lr_quant.data import DataConfig, build_datasets
from lr_quant.models import save_weights

STATS = dict(mean=[0.5, 0.25, 0.75], std=[0.5, 0.5, 0.25], crop_pct=1.0,
             interpolation="bilinear")


@pytest.mark.slow
def test_train_uses_the_models_statistics_on_an_hfds_data_set(tmp_path, capsys, monkeypatch,
                                                               write_split_folders):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_split_folders(tmp_path / "hf", per_class=24, size=16)
    torch.manual_seed(0)
    fp = save_weights(timm.create_model("resnet10t", num_classes=2), tmp_path / "fp.safetensors")
    overlay = "{pretrained_cfg_overlay: {mean: [0.5, 0.25, 0.75], std: [0.5, 0.5, 0.25], " \
              "crop_pct: 1.0, interpolation: bilinear}}"
    out = tmp_path / "run"
    rc = main(["train", "-c", "quickstart", "--output", str(out), "--model.checkpoint", str(fp),
               "--model.num_classes", "2", "--set", f"model.kwargs={overlay}",
               "--data.dataset", f"hfds/{tmp_path / 'hf'}", "--data.root", str(tmp_path / "c"),
               "--data.mixup", "0.2", "--train.label_smoothing", "0.1",
               "--train.epochs", "1", "--train.batch_size", "16", "--train.val_fraction", "0.25",
               "--train.sampled_networks", "0", "--train.bn_reestimate_batches", "1",
               "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "data config: input 3x16x16, mean (0.5, 0.25, 0.75), std (0.5, 0.5, 0.25), " \
           "bilinear, crop_pct 1 (center)" in stdout
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())["data"]
    assert {k: recorded[k] for k in STATS} == STATS and recorded["image_size"] == 16
    meta = load_checkpoint_meta(out / "final.safetensors")
    assert meta["data_config"]["mean"] == [0.5, 0.25, 0.75]
    assert meta["recipe"]["data"]["std"] == [0.5, 0.5, 0.25]
    metrics = json.loads((out / "metrics.json").read_text())

    # eval prepares the test split from the recorded config: the same accuracy
    rc = main(["eval", str(out / "final.safetensors")])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(metrics["final_test_accuracy"],
                                                           abs=1e-9)
    # and the images it saw are (pixels / 255 - mean) / std: the recorded statistics
    data = build_datasets(DataConfig(**recorded), 0.25, 0)
    x, _ = data.test[0]
    path = sorted((tmp_path / "hf" / "test" / "cat").glob("*.png"))
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in path]
    expected = [torch.from_numpy(((p - STATS["mean"]) / np.asarray(STATS["std"])).transpose(
        2, 0, 1)).float() for p in pixels]
    assert any(torch.allclose(x, e, atol=1e-6) for e in expected)
