"""FINN's CNV topology as a timm model: ``timm.create_model("finn_cnv", num_classes=10)``.

The BNN-PYNQ "CNV" network (Umuroglu et al., "FINN: A Framework for Fast, Scalable
Binarized Neural Network Inference", FPGA 2017; brevitas_examples' ``bnn_pynq`` CNV):
six unpadded 3x3 convolutions (64, 64, pool, 128, 128, pool, 256, 256) on 32x32 inputs,
then two 512-wide fully connected layers and the classifier (as 1x1 convolutions on the
1x1 feature map); every layer but the classifier is followed by BatchNorm and a ReLU. In full precision it is an ordinary timm model
(pretrained weights through ``checkpoint_path`` / ``pretrained_cfg_overlay=dict(file=...)``);
``recipes/finn_cnv_w1a1.yaml`` turns it into the W1A1 network FINN maps to hardware:
unpadded convs (FINN pads bipolar inputs with -1, PyTorch with 0: no padding, no
mismatch), conv -> BN -> sign -> max-pool (``activations.sign_before_pool``).

Registered with timm when ``lr_quant`` is imported. ``channels`` / ``fc_features`` shrink
it (tests).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["CNV"]


class CNV(nn.Module):
    """(conv-BN-ReLU) x2, max-pool, x2, max-pool, x2, then two (1x1 conv-BN-ReLU) and the
    1x1-conv head; flattened logits. The fully connected layers are 1x1 convolutions on
    the 1x1 feature map (the same function as Linear layers after a flatten): the signs
    between them then stay in the channels-last layout FINN streamlines into its MVAUs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 channels: Sequence[int] = (64, 128, 256), fc_features: int = 512,
                 img_size: int = 32, drop_rate: float = 0.0, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"finn_cnv got unexpected arguments {sorted(kwargs)}")
        if len(channels) != 3:
            raise ValueError(f"channels needs 3 widths (one per stage), got {channels}")
        layers, cin, size = [], in_chans, img_size
        for stage, width in enumerate(channels):
            for _ in range(2):
                layers += _conv_bn_relu(cin, width, 3)
                cin, size = width, size - 2
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        if size != 1:
            raise ValueError(f"img_size {img_size} leaves a {size}x{size} feature map after "
                             f"six unpadded 3x3 convs and two 2x2 pools; CNV needs 1x1 "
                             f"(img_size 32)")
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.fc = nn.Sequential(*_conv_bn_relu(cin, fc_features, 1),
                                *_conv_bn_relu(fc_features, fc_features, 1))
        # nn.Identity hands on the very tensor (the converter sees the head read the ReLU)
        self.head_drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.num_classes = num_classes
        self.head = nn.Conv2d(fc_features, num_classes, 1)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.head.in_channels, num_classes, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.fc(x))
        return x.flatten(1) if pre_logits else self.head(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _conv_bn_relu(cin: int, cout: int, kernel_size: int) -> list:
    return [nn.Conv2d(cin, cout, kernel_size, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def _register() -> None:
    """Register ``finn_cnv`` with timm (its pretrained cfg from this module's
    ``default_cfgs``, where timm's ``register_model`` looks for it)."""
    import timm
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

    if timm.is_model("finn_cnv"):
        return
    global default_cfgs
    default_cfgs = generate_default_cfgs({"finn_cnv": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5), "first_conv": "features.0", "classifier": "head",
        "license": "apache-2.0"}})

    def finn_cnv(pretrained: bool = False, **kwargs) -> CNV:
        """FINN's CNV (BNN-PYNQ), see :mod:`lr_quant.cnv`."""
        return build_model_with_cfg(CNV, "finn_cnv", pretrained, **kwargs)

    finn_cnv.__module__ = __name__
    register_model(finn_cnv)


_register()
