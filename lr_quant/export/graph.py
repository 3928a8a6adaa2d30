"""Inspection of a QONNX graph: its quantizer nodes and its float (unquantized) layers."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .modules import scope_module
from .results import QuantNodeInfo
from .run import load

__all__ = ["describe_qonnx", "QUANT_OPS", "WEIGHT_OPS"]

#: Quantizer op types (qonnx custom ops).
QUANT_OPS = ("Quant", "BipolarQuant", "IntQuant", "Trunc")
#: Ops whose second input is a weight (a float layer when it is a plain initializer).
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def describe_qonnx(path_or_model) -> Tuple[List[QuantNodeInfo], List[str]]:
    """(quantizer nodes, float layers) of a QONNX file or ModelWrapper (see QuantNodeInfo).

    A float layer is a Conv/Gemm/MatMul node whose weight is a plain initializer; it is
    named by its module when the node carries its TorchScript scope.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    model = path_or_model if isinstance(path_or_model, ModelWrapper) else load(path_or_model)
    graph_inputs = {i.name for i in model.graph.input}
    quant_nodes: List[QuantNodeInfo] = []
    floats: List[str] = []
    for node in model.graph.node:
        scope = node.doc_string
        module = scope_module(scope)
        if node.op_type in QUANT_OPS:
            attrs = {a.name: a for a in node.attribute}
            scale = model.get_initializer(node.input[1]) if len(node.input) > 1 else None
            if node.op_type == "BipolarQuant":
                bits, signed, narrow = 1.0, True, None
            else:
                bw = model.get_initializer(node.input[3]) if len(node.input) > 3 else None
                bits = float(np.asarray(bw).reshape(-1)[0]) if bw is not None else float("nan")
                signed = bool(attrs["signed"].i) if "signed" in attrs else None
                narrow = bool(attrs["narrow"].i) if "narrow" in attrs else None
            if model.get_initializer(node.input[0]) is not None:
                role = "weight"
            elif node.input[0] in graph_inputs:
                role = "input"
            else:
                role = "activation"
            producer = model.find_producer(node.input[0])
            consumers = tuple(c.op_type for c in model.find_consumers(node.output[0]) or [])
            quant_nodes.append(QuantNodeInfo(
                node=node.name, op_type=node.op_type, role=role, bit_width=bits,
                signed=signed, narrow=narrow,
                scale_shape=tuple(np.shape(scale)) if scale is not None else (),
                scale_is_one=scale is not None and bool(np.all(np.asarray(scale) == 1.0)),
                producer=producer.op_type if producer is not None else None,
                consumers=consumers, module=module))
        elif node.op_type in WEIGHT_OPS and len(node.input) > 1 and \
                model.get_initializer(node.input[1]) is not None:
            floats.append(module or node.name)
    return quant_nodes, floats
