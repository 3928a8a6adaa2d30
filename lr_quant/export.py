"""QONNX export of LR models through Brevitas, verified by executing the file with qonnx.

`export_qonnx` uses Brevitas' QONNX manager with the TorchScript exporter
(`dynamo=False`): the dynamo exporter emits a 2-input Gemm that qonnx's GemmToMatMul
cannot handle and drops QuantTensor wrappers on residual models (Brevitas #1608).
LR layers export as the plain Brevitas layers they are in eval(): binary weights as
BipolarQuant, other value sets as a narrow-range signed `Quant`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .freeze import is_frozen
from .nn.lr_layers import lr_layers

__all__ = ["export_qonnx", "run_qonnx", "verify_qonnx", "QONNXMismatchError"]


class QONNXMismatchError(AssertionError):
    """The exported QONNX model does not reproduce the PyTorch model."""


def export_qonnx(
        model: nn.Module,
        example_input: torch.Tensor,
        path: Union[str, Path],
        cleanup: bool = True,
        require_frozen: bool = False) -> Path:
    """Export `model` (in eval mode) to QONNX at `path`; returns the path.

    The model is switched to eval() for the export and restored afterwards. With
    `require_frozen`, unfrozen LR layers are an error (an LR layer in eval() exports its
    mode, which is what `freeze(model)` fixes).
    """
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if require_frozen and lr_layers(model) and not is_frozen(model):
        unfrozen = [n for n, m in lr_layers(model) if not m.is_lr_frozen]
        raise ValueError(f"model has unfrozen LR layers {unfrozen}: call lr_quant.freeze first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            brevitas_export_qonnx(model, args=example_input, export_path=str(path), dynamo=False)
    finally:
        model.train(was_training)
    if cleanup:
        cleaned = cleanup_model(ModelWrapper(str(path)))
        cleaned.save(str(path))
    return path


def run_qonnx(path: Union[str, Path], inputs: np.ndarray) -> np.ndarray:
    """Execute a QONNX file with qonnx's reference executor on one input array."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = ModelWrapper(str(path))
    input_name = model.graph.input[0].name
    output_name = model.graph.output[0].name
    expected = tuple(model.get_tensor_shape(input_name))
    inputs = np.asarray(inputs, dtype=np.float32)
    if tuple(inputs.shape) != expected:
        raise ValueError(
            f"input of shape {tuple(inputs.shape)} does not fit {path}, exported for input "
            f"shape {expected} (QONNX files have static shapes: export with an example input "
            f"of the shape you will run)")
    result = execute_onnx(model, {input_name: inputs})
    return result[output_name]


def verify_qonnx(
        path: Union[str, Path],
        model: nn.Module,
        inputs: Sequence[torch.Tensor],
        atol: float = 1e-5,
        rtol: float = 1e-5) -> float:
    """Check that the QONNX file reproduces `model` (eval mode) on every input.

    Returns the max absolute error; raises QONNXMismatchError when any output differs by
    more than atol + rtol * |reference|.
    """
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        for i, x in enumerate(inputs):
            with torch.no_grad():
                reference = model(x)
            reference = getattr(reference, "value", reference).detach().cpu().numpy()
            got = run_qonnx(path, x.detach().cpu().numpy())
            if got.shape != reference.shape:
                raise QONNXMismatchError(
                    f"input {i}: QONNX output shape {got.shape} != PyTorch {reference.shape}")
            err = np.abs(got - reference)
            worst = max(worst, float(err.max(initial=0.0)))
            if not np.all(err <= atol + rtol * np.abs(reference)):
                raise QONNXMismatchError(
                    f"input {i}: QONNX output differs from PyTorch by up to {err.max():.3g} "
                    f"(atol={atol}, rtol={rtol}) in {path}")
    finally:
        model.train(was_training)
    return worst
