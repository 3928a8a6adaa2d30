"""lr_quant: LR-nets (local reparameterization over discrete weights) for Brevitas."""

from . import distributions, functional
from .distributions import get_distribution
from .compile_regions import set_compile
from .freeze import freeze, is_frozen, unfreeze
from .nn import (LRQuantConv1d, LRQuantConv2d, LRQuantConv3d, LRQuantLinear, StochasticSign,
                 StochasticTernarySign, lr_layers, lr_regularization)
from .quant import (LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst,
                    LRTernaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst, lr_weight_quant)

__version__ = "0.1.0"

__all__ = [
    "distributions",
    "functional",
    "get_distribution",
    "freeze",
    "unfreeze",
    "is_frozen",
    "set_compile",
    "LRQuantLinear",
    "LRQuantConv1d",
    "LRQuantConv2d",
    "LRQuantConv3d",
    "lr_layers",
    "lr_regularization",
    "StochasticSign",
    "StochasticTernarySign",
    "LRBinaryWeightPerTensorConst",
    "LRBinaryWeightPerChannelFloat",
    "LRTernaryWeightPerTensorConst",
    "LRTernaryWeightPerChannelFloat",
    "lr_weight_quant",
]

# recipes: convert any timm backbone into an LR network
# (`lr_quant.convert` is the subpackage: use `from lr_quant.convert import convert`)
from . import convert, recipe, registry  # noqa: E402
from .convert import ConversionReport, convert_with_report  # noqa: E402
from .quant.threshold import calibrate_thresholds  # noqa: E402
from .recipe import Recipe, RecipeError, load_recipe  # noqa: E402
from . import cnv  # noqa: E402,F401  (registers timm's "finn_cnv")

__all__ += [
    "convert",
    "recipe",
    "registry",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "convert_with_report",
    "ConversionReport",
    "calibrate_thresholds",
]
