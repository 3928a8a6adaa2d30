"""Data sets read through timm.data.create_dataset: image folders and .tar splits, Hugging Face
datasets from local files (offline), torchvision names; labels and images against the files."""

import tarfile

import numpy as np
import pytest
import torch

from lr_quant.data import DataConfig, DataError, build_datasets, dataset_labels, open_source

MEAN, STD = (0.5, 0.25, 0.5), (0.5, 0.5, 0.25)


def _prepared(p):
    x = (p.astype(np.float64) / 255 - np.asarray(MEAN)) / np.asarray(STD)
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


def _config(**kw):
    return DataConfig(image_size=8, mean=list(MEAN), std=list(STD), crop_pct=1.0, **kw)


def test_hugging_face_local_folder_reads_offline(tmp_path, monkeypatch, write_split_folders):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pixels = write_split_folders(tmp_path / "hf")
    data = build_datasets(_config(dataset=f"hfds/{tmp_path / 'hf'}", root=str(tmp_path / "cache")),
                          val_fraction=0.25, seed=0)
    assert data.num_classes == 2 and len(data.test) == 8
    assert len(data.train) + len(data.val) == 8
    # no "validation" split: the test split is found; every label and image is the file's
    labels = dataset_labels(data.test)
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    for k in range(len(data.test)):
        x, y = data.test[k]
        name = ("cat", "dog")[y]
        assert any(torch.allclose(x, _prepared(pixels["test", name, i]), atol=1e-6)
                   for i in range(4))
    with pytest.raises(DataError, match=r"none of the splits \['holdout'\].*--data.test_split"):
        open_source(_config(dataset=f"hfds/{tmp_path / 'hf'}", root=str(tmp_path / "cache"),
                            test_split="holdout"))


def test_image_folders_as_tar_files(tmp_path, write_split_folders):
    pixels = write_split_folders(tmp_path / "src", splits=("train", "val"))
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}.tar", "w") as tar:
            for name in ("cat", "dog"):
                tar.add(tmp_path / "src" / split / name, arcname=name)
    data = build_datasets(_config(dataset="imagefolder", root=str(root)), val_fraction=0.0)
    assert data.num_classes == 2 and len(data.train) == 8 and len(data.test) == 8
    assert dataset_labels(data.train).tolist() == [0] * 4 + [1] * 4
    x, y = data.test[5]
    assert y == 1 and any(torch.allclose(x, _prepared(pixels["val", "dog", i]), atol=1e-6)
                          for i in range(4))


def test_split_classes_must_agree(tmp_path, write_split_folders):
    write_split_folders(tmp_path, splits=("train",))
    write_split_folders(tmp_path / "x", splits=("val",), classes=("cat", "cow"))
    (tmp_path / "x" / "val").rename(tmp_path / "val")
    with pytest.raises(DataError, match="different classes"):
        open_source(_config(dataset="imagefolder", root=str(tmp_path)))


def test_torchvision_names_go_through_timm(tmp_path):
    with pytest.raises(DataError, match=r"cifar100 not found .*--data.download true"):
        open_source(DataConfig(dataset="torch/cifar100", root=str(tmp_path)))
