"""The model's data config (timm.data.resolve_data_config) and the timm transforms built from
it, against numpy arithmetic on the pixels."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from lr_quant.data import DataConfig, image_transform, resolve, timm_data_config

HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5), crop_pct=1.0, interpolation="bilinear")


def _model(**overlay):
    return timm.create_model("resnet10t", num_classes=2, pretrained=False,
                             pretrained_cfg_overlay=overlay)


def _normalized(pixels: np.ndarray, mean, std) -> torch.Tensor:
    x = pixels.astype(np.float64) / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


def _image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_null_fields_come_from_the_model_and_recipe_fields_win():
    config = resolve(DataConfig(image_size=None), _model(**HALF, input_size=(3, 48, 48)))
    assert config.image_size == 48 and config.mean == [0.5] * 3 and config.std == [0.25, 0.5, 0.5]
    assert config.crop_pct == 1.0 and config.interpolation == "bilinear"
    assert config.crop_mode == "center"
    mine = resolve(DataConfig(image_size=16, mean=[0.1], interpolation="bicubic"), _model(**HALF))
    assert mine.image_size == 16 and mine.mean == [0.1] * 3 and mine.std == [0.25, 0.5, 0.5]
    assert mine.interpolation == "bicubic"
    assert timm_data_config(mine)["input_size"] == (3, 16, 16)
    # resolving a resolved config changes nothing (what eval / resume do with a recorded one)
    assert resolve(mine, _model()) == mine


def test_without_a_model_timm_defaults_apply():
    config = resolve(DataConfig(image_size=None))
    assert config.image_size == 224 and config.crop_pct == 0.875
    assert config.mean == pytest.approx([0.485, 0.456, 0.406])


def test_eval_transform_is_center_crop_then_the_models_normalization():
    config = resolve(DataConfig(image_size=8, crop_pct=0.5), _model(**HALF))
    pixels = _image(16)   # resize to 8 / 0.5 = 16: none; center crop 8 of 16: rows 4..11
    x = image_transform(config, training=False)(Image.fromarray(pixels))
    expected = _normalized(pixels[4:12, 4:12], HALF["mean"], HALF["std"])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_train_transform_applies_the_augmentation_fields():
    # a crop of the whole image (scale 1, ratio 1) at its own size, always flipped
    config = resolve(DataConfig(image_size=12, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=1.0),
                     _model(**HALF))
    pixels = _image(12, seed=1)
    x = image_transform(config, training=True)(Image.fromarray(pixels))
    expected = _normalized(pixels[:, ::-1], HALF["mean"], HALF["std"])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    # random erasing with probability 1 blanks a box (const mode: zeros after normalization)
    erased = image_transform(resolve(DataConfig(image_size=12, scale=[1.0, 1.0],
                                                ratio=[1.0, 1.0], hflip=0.0, re_prob=1.0),
                                     _model(**HALF)), training=True)
    torch.manual_seed(0)
    y = erased(Image.fromarray(pixels))
    untouched = _normalized(pixels, HALF["mean"], HALF["std"])
    changed = ((y - untouched).abs() > 1e-5).any(0)
    assert changed.any() and not changed.all() and (y[:, changed] == 0).all()


@pytest.mark.parametrize("field, value, message", [
    ("interpolation", "bicubc", "did you mean 'bicubic'"),
    ("mean", [0.1, 0.2], "1 or 3 values"),
    ("std", [0.0], "std must be > 0"),
    ("scale", [0.9, 0.1], "scale must be [min, max]"),
    ("mixup_mode", "pairs", "did you mean 'pair'"),
    ("hflip", 1.5, "hflip must be in [0, 1]"),
    ("dataset", "wds/shards", "streams samples"),
    ("dataset", "imagefoldr", "did you mean 'imagefolder'"),
    ("dataset", "hf/x", "timm data set name"),
])
def test_bad_data_fields_name_the_problem(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**{field: value})
