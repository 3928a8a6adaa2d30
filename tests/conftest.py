"""Shared pytest configuration: deterministic seeds and a quiet, single-threaded torch;
`fp_weights`, a tiny "pretrained" FP checkpoint for runs through `lr-quant train`;
`write_split_folders`, image data sets made on the fly."""

import os
import warnings

import pytest
import torch

# Tests run with pytest-xdist on 2 cores: one intra-op thread per worker.
torch.set_num_threads(int(os.environ.get("LR_QUANT_TEST_THREADS", "1")))
warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def fp_weights(tmp_path_factory):
    """A randomly initialized timm resnet10t (10 classes) saved as the FP weight file that
    recipes load with model.checkpoint (no hub download)."""
    import timm

    from lr_quant.models import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp") / "resnet10t_fp.safetensors"
    save_weights(timm.create_model("resnet10t", num_classes=10), path)
    return path


def _write_split_folders(root, splits=("train", "test"), classes=("cat", "dog"), per_class=4,
                         size=8):
    """root/<split>/<class>/<i>.png, random pixels with a class signal (the class' channel at
    255); returns {(split, class, i): pixels}."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                p = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                p[..., c % 3] = 255
                Image.fromarray(p).save(root / split / name / f"{i}.png")
                pixels[split, name, i] = p
    return pixels


@pytest.fixture
def write_split_folders():
    return _write_split_folders
