"""What an export produces: `ExportResult` (with its `QuantNodeInfo` rows), `Divergence`
(where a qonnx execution departs from PyTorch) and the two errors."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["ExportResult", "QuantNodeInfo", "Divergence", "QONNXExportError",
           "QONNXMismatchError", "first_line"]


class QONNXExportError(RuntimeError):
    """The model could not be exported; `module` / `module_type` name the culprit."""

    def __init__(self, message: str, module: Optional[str] = None,
                 module_type: Optional[str] = None):
        super().__init__(message)
        self.module = module
        self.module_type = module_type


class QONNXMismatchError(AssertionError):
    """The exported QONNX model does not reproduce the PyTorch model.

    `max_abs_error` is the output error, `divergence` (a `Divergence` or None) the first
    node whose output differs from its module's, `path` the file (kept for debugging).
    """

    def __init__(self, message: str, max_abs_error: float = float("nan"),
                 divergence: Optional["Divergence"] = None, path: Optional[Path] = None):
        super().__init__(message)
        self.max_abs_error = max_abs_error
        self.divergence = divergence
        self.path = path


@dataclass
class QuantNodeInfo:
    """One quantizer node of an exported graph.

    role: "weight" (quantizes an initializer), "input" (quantizes the graph input) or
    "activation". bit_width 1 is BipolarQuant. scale_shape () or (1,) is per tensor,
    (C, 1, 1, 1) / (C, 1) per output channel. `producer` / `consumers` are the op types
    around the node (an activation fed by "Sub" is a thresholded sign).
    """
    node: str
    op_type: str
    role: str
    bit_width: float
    signed: Optional[bool]
    narrow: Optional[bool]
    scale_shape: Tuple[int, ...]
    scale_is_one: bool
    producer: Optional[str]
    consumers: Tuple[str, ...]
    module: Optional[str]

    @property
    def per_channel(self) -> bool:
        return int(np.prod(self.scale_shape, dtype=np.int64)) > 1


@dataclass
class ExportResult:
    """What `export_qonnx` wrote. Path-like: `str(result)` and `open(result)` give the file.

    max_abs_error: worst |qonnx - PyTorch| over the verification inputs (NaN when not
    verified); op_counts: node op types of the cleaned graph; quant_nodes: every
    quantizer node; float_layers: Conv/Gemm/MatMul nodes with unquantized weights (the
    full-precision first/last layers); frozen_for_export: LR layers that were exported as
    their mode without being frozen (freeze="mode"); boundary_flips: verification inputs
    skipped because a quantizer input sat on a decision boundary (num_checks counts the
    others).
    """
    path: Path
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    max_abs_error: float
    num_checks: int
    op_counts: Dict[str, int]
    quant_nodes: List[QuantNodeInfo] = field(default_factory=list)
    float_layers: List[str] = field(default_factory=list)
    frozen_for_export: List[str] = field(default_factory=list)
    boundary_flips: int = 0

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def verified(self) -> bool:
        return self.num_checks > 0

    @property
    def input_quant(self) -> Optional[QuantNodeInfo]:
        """The quantizer of the graph input (FINN wants one), or None."""
        return next((q for q in self.quant_nodes if q.role == "input"), None)

    def quant_counts(self) -> Dict[str, int]:
        """{"weight BipolarQuant": n, "activation Quant 8b": m, ...}."""
        keys = [f"{q.role} {q.op_type}" + ("" if q.op_type == "BipolarQuant"
                                          else f" {q.bit_width:g}b") for q in self.quant_nodes]
        return dict(sorted(collections.Counter(keys).items()))

    def summary(self) -> str:
        lines = [f"{self.path}: input {self.input_shape} -> output {self.output_shape}"]
        if self.verified:
            lines.append(f"  verified on {self.num_checks} inputs with qonnx execute_onnx: "
                         f"max abs error {self.max_abs_error:.3g}")
        else:
            lines.append("  not verified")
        lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in self.op_counts.items()))
        lines.append("  quantizers: " + (", ".join(
            f"{k} x{v}" for k, v in self.quant_counts().items()) or "none"))
        if self.float_layers:
            lines.append("  float layers: " + ", ".join(self.float_layers))
        if self.boundary_flips:
            lines.append(f"  {self.boundary_flips} inputs skipped: a quantizer input on a "
                         f"decision boundary (float rounding)")
        if self.frozen_for_export:
            lines.append(f"  {len(self.frozen_for_export)} unfrozen LR layers exported "
                         f"as their mode")
        return "\n".join(lines)


@dataclass
class Divergence:
    """Where a qonnx execution first departs from the PyTorch model.

    node / op_type: the cleaned graph's node; module / module_type: the PyTorch module
    whose output it is compared with (None for a non-finite tensor with no module);
    error: max |qonnx - PyTorch| of that tensor; last_match: the last compared node that
    still agreed and its error; non_finite: the node produced NaN/inf from finite inputs;
    boundary: a quantizer whose input agrees but lands on the other side of a rounding /
    sign threshold (float rounding, not an export bug); compared: how many tensors were
    compared.
    """
    node: str
    op_type: str
    module: Optional[str]
    module_type: Optional[str]
    error: float
    tolerance: float
    scope: str = ""
    last_match: Optional[Tuple[str, str, float]] = None
    non_finite: bool = False
    boundary: bool = False
    compared: int = 0
    shapes: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None   # (qonnx, PyTorch)

    def describe(self) -> str:
        where = f"{self.node} ({self.op_type}"
        where += f", scope {self.scope})" if self.scope else ")"
        if self.module is not None:
            where += f" = output of module '{self.module}' ({self.module_type})"
        if self.non_finite:
            text = f"first non-finite tensor: output of {where}, from finite inputs"
        elif self.shapes is not None:
            text = (f"first diverging node: {where}: output shape {self.shapes[0]}, PyTorch "
                    f"{self.shapes[1]} (a shape computed wrongly in the export, e.g. a "
                    f"padding built from Shape nodes)")
        else:
            text = (f"first diverging node: {where}: max abs error {self.error:.3g} "
                    f"(tolerance {self.tolerance:.3g})")
        if self.last_match is not None:
            text += (f"; last matching node: {self.last_match[0]} (module "
                     f"'{self.last_match[1]}', error {self.last_match[2]:.3g})")
        elif not self.non_finite:
            text += "; no earlier node could be compared"
        if not self.non_finite and self.last_match is not None and \
                self.error < 100 * self.tolerance:
            text += ("; the error is small and grows gradually: float rounding amplified by "
                     "an ill-conditioned network (e.g. BatchNorm statistics that do not fit "
                     "the frozen network: re-estimate them), or a slightly wrong node")
        if self.boundary:
            text += ("; its input agrees with PyTorch, so the difference is a value on a "
                     "quantization threshold rounded differently (float rounding)")
        return text


def first_line(exc: BaseException) -> str:
    """'ExcType: first line of its message', for error messages that wrap `exc`."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
