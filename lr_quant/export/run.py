"""Running a QONNX file (qonnx's reference executor) and the PyTorch model on the same
input, and comparing their tensors."""

from __future__ import annotations

import os
from typing import Dict, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._tensor import as_tensor
from .results import QONNXExportError, first_line

__all__ = ["run_qonnx", "load", "check_input_shape", "execute", "torch_reference", "tolerance",
           "max_abs", "DEFAULT_ATOL", "DEFAULT_RTOL", "PathLike"]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5

PathLike = Union[str, os.PathLike]


def load(path) -> "ModelWrapper":  # noqa: F821
    """The QONNX file at `path` as a qonnx ModelWrapper."""
    from qonnx.core.modelwrapper import ModelWrapper
    return ModelWrapper(str(path))


def check_input_shape(model, path, inputs: np.ndarray) -> Tuple[str, str]:
    """(graph input name, graph output name); a ValueError when `inputs` does not have the
    graph's static input shape."""
    input_name = model.graph.input[0].name
    output_name = model.graph.output[0].name
    expected = tuple(model.get_tensor_shape(input_name))
    if tuple(inputs.shape) != expected:
        raise ValueError(
            f"input of shape {tuple(inputs.shape)} does not fit {path}, exported for input "
            f"shape {expected} (QONNX files have static shapes: export with an example input "
            f"of the shape you will run)")
    return input_name, output_name


def run_qonnx(path: PathLike, inputs: np.ndarray) -> np.ndarray:
    """Execute a QONNX file with qonnx's reference executor on one input array."""
    from qonnx.core.onnx_exec import execute_onnx
    model = load(path)
    inputs = np.asarray(inputs, dtype=np.float32)
    input_name, output_name = check_input_shape(model, path, inputs)
    return execute_onnx(model, {input_name: inputs})[output_name]


def execute(model, path, inputs: Dict[str, np.ndarray], full_context: bool = False
            ) -> Dict[str, np.ndarray]:
    """qonnx's execute_onnx on the loaded file `path` (every tensor with `full_context`);
    a failure to execute raises QONNXExportError."""
    from qonnx.core.onnx_exec import execute_onnx
    try:
        return execute_onnx(model, inputs, return_full_exec_context=full_context)
    except Exception as exc:
        raise QONNXExportError(f"qonnx cannot execute {path}: {first_line(exc)}") from exc


def torch_reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The model's output on `x` (no grad) as a float32 array."""
    with torch.no_grad():
        out = as_tensor(model(x), strict=True)
    if out is None:
        raise TypeError(f"{type(model).__name__} returned no tensor")
    return out.detach().cpu().float().numpy()


def tolerance(reference: np.ndarray, atol: float, rtol: float) -> float:
    """atol + rtol * max |reference|: the error a tensor may have and still match."""
    scale = float(np.max(np.abs(reference), initial=0.0)) if reference.size else 0.0
    return atol + rtol * scale


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in float64; NaN counts as infinite."""
    if a.size == 0:
        return 0.0
    err = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nan_to_num(err, nan=np.inf).max())
