"""convert(model, recipe): any timm / torch backbone -> LR network, with a report.

    model, report = convert_with_report(timm.create_model("resnet18"), load_recipe("resnet_w1"))
    print(report)            # every Conv/Linear: what it became, or why it stayed float

Conversion never silently changes what a layer computes: a layer it cannot convert exactly
stays in full precision and the report says why.

- :mod:`.handlers`: which layer classes convert to which LR / Brevitas class
  (:data:`LAYER_HANDLERS`, :func:`register_layer_handler`), the droppable activations.
- :mod:`.report`: :class:`ConversionReport`, one :class:`LayerReport` per Conv/Linear.
- :mod:`.plan`: the recipe's rules (overrides, keep_fp, weight quantizer per layer kind)
  applied to every Conv/Linear.
- :mod:`.trace`: one eval forward recording who reads the network input, each activation,
  each layer output, and each layer's weight outside its forward (such a layer stays float).
- :mod:`.swap`: :func:`convert` / :func:`convert_with_report`, the pass that uses them.

:func:`calibrate_thresholds` (from :mod:`lr_quant.quant.threshold`) sets every sign
threshold from a calibration batch.
"""

from ..quant.threshold import calibrate_thresholds
from .handlers import (DROPPABLE_ACTIVATIONS, LAYER_HANDLERS, LayerHandler, conv_linear_modules,
                       register_layer_handler)
from .report import ConversionReport, LayerReport
from .swap import convert, convert_with_report
from .trace import default_example_input

__all__ = [
    "convert",
    "convert_with_report",
    "calibrate_thresholds",
    "ConversionReport",
    "LayerReport",
    "LayerHandler",
    "LAYER_HANDLERS",
    "register_layer_handler",
    "DROPPABLE_ACTIVATIONS",
    "conv_linear_modules",
    "default_example_input",
]
