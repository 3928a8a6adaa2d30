"""QONNX export of LR models through Brevitas, verified by executing the file with qonnx.

    result = export_qonnx(model, example_input, "model.onnx")   # freeze, export, verify
    print(result.summary())

Modules (one concept each):
    driver    export_qonnx: argument checks, freeze policy, Brevitas export, cleanup
    results   ExportResult, QuantNodeInfo, Divergence and the two errors
    modules   module tracking (forward hooks), node scope -> module name, eval mode
    locate    the module a failing forward pass or export happened in
    graph     describe_qonnx: quantizer nodes and float layers of a QONNX graph
    run       run_qonnx, the PyTorch reference and the tolerance of a comparison
    verify    verify_qonnx: the file against PyTorch on several inputs
    diagnose  diagnose_qonnx: the first node whose output departs from its module's
"""

from .diagnose import diagnose_qonnx
from .driver import FREEZE_POLICIES, export_qonnx
from .graph import QUANT_OPS, WEIGHT_OPS, describe_qonnx
from .results import (Divergence, ExportResult, QONNXExportError, QONNXMismatchError,
                      QuantNodeInfo)
from .run import DEFAULT_ATOL, DEFAULT_RTOL, run_qonnx
from .verify import verify_qonnx

__all__ = [
    "export_qonnx",
    "run_qonnx",
    "verify_qonnx",
    "diagnose_qonnx",
    "describe_qonnx",
    "ExportResult",
    "QuantNodeInfo",
    "Divergence",
    "QONNXExportError",
    "QONNXMismatchError",
    "FREEZE_POLICIES",
    "QUANT_OPS",
    "WEIGHT_OPS",
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
]
