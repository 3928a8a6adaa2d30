"""QONNX export of LR models through Brevitas, verified by executing the file with qonnx.

    result = export_qonnx(model, example_input, "model.onnx")   # freeze, export, verify
    result.max_abs_error, result.op_counts, result.quant_nodes  # what was written
    print(result.summary())

Steps of `export_qonnx` (see docs/export.md):

1. Check the example input (a float32 tensor the model accepts: a plain forward pass
   runs first, so a wrong shape or dtype is reported with the module it failed in).
2. Freeze policy: unfrozen LR layers are exported as the mode of their distribution
   (`freeze="mode"`, the default; the layers' frozen flags are restored afterwards) or
   refused (`freeze="require"`). The model is always exported in eval(): the stochastic
   training forward (LR sampling, stochastic sign) is never exported. Sampled networks
   are chosen explicitly with `lr_quant.freeze(model, "sample", seed=...)` beforehand.
3. Brevitas' QONNX manager with the TorchScript exporter (`dynamo=False`): the dynamo
   exporter emits a 2-input Gemm that qonnx's GemmToMatMul cannot handle and drops
   QuantTensor wrappers on residual models (Brevitas #1608). A failure is reported with
   the module that raised it (the innermost module being run, or the smallest submodule
   that fails to export on its own). Each node keeps its TorchScript scope
   (e.g. ``/layer1/layer1.0/conv1/Conv``) in its ``doc_string``, so nodes of the cleaned
   graph can still be traced back to modules.
4. `qonnx.util.cleanup.cleanup_model`; `IntQuant` nodes are refused (FINN only converts
   `Quant`).
5. Verification: `qonnx.core.onnx_exec.execute_onnx` on the example and on random inputs
   of its shape against the PyTorch model in eval(). On a mismatch `QONNXMismatchError`
   names the first diverging node: every intermediate tensor of the qonnx execution is
   compared with the output of the module it came from (PyTorch forward hooks).

LR layers export as the plain Brevitas layers they are in eval(): binary weights as
BipolarQuant, other value sets as a narrow-range signed `Quant`; the stochastic sign as
``Sub(x, t) -> BipolarQuant(scale 1)``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .nn.lr_layers import lr_layers

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
]

log = logging.getLogger(__name__)

#: What `export_qonnx` does with LR layers that are not frozen.
FREEZE_POLICIES = ("mode", "require")
QUANT_OPS = ("Quant", "BipolarQuant", "IntQuant", "Trunc")
#: Ops whose second input is a weight (a float layer when it is a plain initializer).
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5

PathLike = Union[str, os.PathLike]


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


# -- results ------------------------------------------------------------------------------

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


# -- small helpers --------------------------------------------------------------------------

def _value(x):
    """Plain tensor of a module output (QuantTensor -> value, tuple -> first tensor)."""
    if isinstance(x, torch.Tensor):
        return x
    value = getattr(x, "value", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(x, (tuple, list)) and x:
        return _value(x[0])
    return None


def _tolerance(reference: np.ndarray, atol: float, rtol: float) -> float:
    scale = float(np.max(np.abs(reference), initial=0.0)) if reference.size else 0.0
    return atol + rtol * scale


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    err = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nan_to_num(err, nan=np.inf).max())


def _scope_to_module(scope: str, modules: Dict[str, nn.Module]) -> Optional[str]:
    """Module name of a TorchScript ONNX scope, e.g. '/layer1/layer1.0/conv1/Conv' ->
    'layer1.0.conv1' ('/conv1/conv1.0/Conv' -> 'conv1.0'); the longest known prefix."""
    segments = [s for s in scope.split("/") if s][:-1]  # the last one is the op name
    parts: List[str] = []
    previous = None
    for seg in segments:
        if previous is not None and seg.startswith(previous + "."):
            parts.append(seg[len(previous) + 1:])  # 'layer1.0' after 'layer1': child '0'
        else:
            parts.append(seg)
        previous = seg
    name = ".".join(parts)
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name if name in modules else ("" if "" in modules else None)


def _module_type(modules: Dict[str, nn.Module], name: Optional[str]) -> Optional[str]:
    return None if name is None or name not in modules else type(modules[name]).__name__


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        model.training = was_training


@contextlib.contextmanager
def _frozen_for_export(model: nn.Module, policy: str):
    """Freeze unfrozen LR layers to their mode for the export; restore afterwards."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze={policy!r}: choose one of {FREEZE_POLICIES}")
    unfrozen = [(n, m) for n, m in lr_layers(model) if not m.is_lr_frozen]
    if unfrozen and policy == "require":
        raise ValueError(
            f"model has unfrozen LR layers {[n for n, _ in unfrozen]}: call "
            f"lr_quant.freeze(model) first (or export with freeze='mode')")
    if unfrozen:
        log.info("exporting %d unfrozen LR layers as the mode of their distribution",
                 len(unfrozen))
    for _, layer in unfrozen:
        layer.freeze("mode")
    try:
        yield [n for n, _ in unfrozen]
    finally:
        for _, layer in unfrozen:
            layer.unfreeze()


class _ModuleTracker:
    """Forward hooks that record the stack of modules being run and their outputs."""

    def __init__(self, model: nn.Module, record_outputs: bool = False,
                 record_inputs: bool = False):
        self.stack: List[str] = []
        self.failed_stack: Optional[List[str]] = None
        self.outputs: Dict[str, torch.Tensor] = {}
        self.inputs: Dict[str, tuple] = {}
        self.calls: Dict[str, int] = collections.Counter()
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))
        self.record_outputs = record_outputs
        self.record_inputs = record_inputs

    def _pre(self, name):
        def hook(module, args):
            self.stack.append(name)
            self.calls[name] += 1
            if self.record_inputs and name not in self.inputs:
                self.inputs[name] = args
        return hook

    def _post(self, name):
        def hook(module, args, output):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            if self.record_outputs:
                value = _value(output)
                if value is not None:
                    self.outputs[name] = value.detach().clone()
        return hook

    def innermost(self) -> Optional[str]:
        return self.stack[-1] if self.stack else None

    def culprit(self, modules: Dict[str, nn.Module]) -> Tuple[Optional[str], str]:
        """(innermost user-level module, ' inside <internal module>' or '') of the stack:
        Brevitas proxies / cores and lr_quant quantizer internals belong to their layer."""
        inner = self.innermost()
        layer = next((n for n in reversed(self.stack) if not _is_internal(modules[n])), inner)
        detail = f", inside '{inner}' ({_module_type(modules, inner)})" \
            if inner is not None and inner != layer else ""
        return layer, detail

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


_INTERNAL_PACKAGES = ("brevitas.proxy", "brevitas.core", "brevitas.export", "brevitas.inject",
                      "brevitas.function", "lr_quant.quant")


def _is_internal(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_INTERNAL_PACKAGES)


def _restore_brevitas_state(model: nn.Module) -> None:
    """Undo what a failed Brevitas export left behind (it has no try/finally)."""
    from brevitas.export import manager as bm
    from brevitas.export.onnx.qonnx.manager import QONNXManager
    for fn in ("_restore_act_caching_mode", "_restore_bias_caching_mode",
               "_restore_quant_metadata_caching_mode"):
        restore = getattr(bm, fn, None)
        if restore is not None:
            model.apply(restore)
    try:
        QONNXManager.set_export_mode(model, enabled=False)
    except Exception:  # best effort: the model may be half-prepared
        log.debug("could not reset Brevitas export mode", exc_info=True)


def _brevitas_export(model: nn.Module, example: torch.Tensor, target, opset_version) -> None:
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    try:
        with torch.no_grad():
            brevitas_export_qonnx(model, args=example, export_path=target, dynamo=False, **kwargs)
    except BaseException:
        _restore_brevitas_state(model)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _locate_export_failure(model: nn.Module, example: torch.Tensor, opset_version
                           ) -> Tuple[Optional[str], str]:
    """(module name, how it was found) of an export failure.

    First the innermost module running when the export raised (a failure while tracing);
    if the export got past tracing (e.g. an op without an ONNX symbolic), the smallest
    submodule that fails to export on its own, with the inputs it got in a forward pass.
    """
    import io
    modules = dict(model.named_modules())
    tracker = _ModuleTracker(model)
    try:
        _brevitas_export(model, example, io.BytesIO(), opset_version)
    except Exception:
        if tracker.stack:
            name, detail = tracker.culprit(modules)
            return name, "running when the exporter raised" + detail
    finally:
        tracker.remove()
    recorder = _ModuleTracker(model, record_inputs=True)
    try:
        with torch.no_grad():
            model(example)
    finally:
        recorder.remove()

    def fails(name: str) -> bool:
        args = recorder.inputs.get(name)
        if args is None or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return False
        try:
            _brevitas_export(modules[name], args[0], io.BytesIO(), opset_version)
            return False
        except Exception:
            return True

    found, current = None, ""
    while True:
        children = [f"{current}.{c}" if current else c
                    for c, child in modules[current].named_children()
                    if not _is_internal(child)]   # proxies do not export on their own
        failing = next((c for c in children if fails(c)), None)
        if failing is None:
            break
        found = current = failing
    return found, "the smallest submodule that fails to export on its own"


# -- inspecting a QONNX file ------------------------------------------------------------------

def describe_qonnx(path_or_model) -> Tuple[List[QuantNodeInfo], List[str]]:
    """(quantizer nodes, float layers) of a QONNX file or ModelWrapper (see QuantNodeInfo).

    A float layer is a Conv/Gemm/MatMul node whose weight is a plain initializer; it is
    named by its module when the node carries its TorchScript scope.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    model = path_or_model if isinstance(path_or_model, ModelWrapper) else \
        ModelWrapper(str(path_or_model))
    graph_inputs = {i.name for i in model.graph.input}
    quant_nodes: List[QuantNodeInfo] = []
    floats: List[str] = []
    for node in model.graph.node:
        scope = node.doc_string
        module = _scope_module_name(scope)
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


def _scope_module_name(scope: str) -> Optional[str]:
    """Dotted module path of a scope without a model at hand (best effort)."""
    if not scope or "/" not in scope:
        return None
    segments = [s for s in scope.split("/") if s][:-1]
    parts, previous = [], None
    for seg in segments:
        parts.append(seg[len(previous) + 1:] if previous and seg.startswith(previous + ".")
                     else seg)
        previous = seg
    # Brevitas internals (weight_quant/export_handler, act_quant/...) belong to the layer
    for i, part in enumerate(parts):
        if part in ("weight_quant", "input_quant", "output_quant", "act_quant",
                    "bias_quant"):
            parts = parts[:i + (1 if part in ("input_quant", "output_quant") else 0)]
            break
    return ".".join(parts)


# -- running and verifying ----------------------------------------------------------------------

def _load(path) -> "ModelWrapper":  # noqa: F821
    from qonnx.core.modelwrapper import ModelWrapper
    return ModelWrapper(str(path))


def _check_input_shape(model, path, inputs: np.ndarray) -> Tuple[str, str]:
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
    model = _load(path)
    inputs = np.asarray(inputs, dtype=np.float32)
    input_name, output_name = _check_input_shape(model, path, inputs)
    return execute_onnx(model, {input_name: inputs})[output_name]


def _torch_reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = _value(model(x))
    if out is None:
        raise TypeError(f"{type(model).__name__} returned no tensor")
    return out.detach().cpu().float().numpy()


def _on_boundary(node, context: Dict[str, np.ndarray], differing: np.ndarray) -> bool:
    """True when every element a quantizer node got wrong has its input on a decision
    boundary (0 for BipolarQuant, a rounding tie k + 1/2 for Quant), within float
    rounding: the two runtimes computed the input a few ulps apart and rounded it to the
    two sides. A wrong threshold, scale or bit width flips values far from the boundary."""
    if node.op_type not in ("BipolarQuant", "Quant") or not differing.any():
        return False
    x = context.get(node.input[0])
    scale = context.get(node.input[1])
    if x is None or scale is None or x.shape != differing.shape:
        return False
    x = x.astype(np.float64)
    eps = 1e-4 * (float(np.max(np.abs(x), initial=0.0)) + 1.0)
    if node.op_type == "BipolarQuant":
        distance = np.abs(x)
    else:
        scale = np.broadcast_to(np.abs(scale.astype(np.float64)), x.shape)
        zero_point = context.get(node.input[2])
        z = 0.0 if zero_point is None else zero_point.astype(np.float64)
        v = x / np.where(scale > 0, scale, 1.0) + z
        distance = np.abs(v - np.floor(v) - 0.5) * scale
    return bool(np.all(distance[differing] <= eps)) and \
        int(differing.sum()) <= max(1, differing.size // 100)


def _matches_another_module(got: np.ndarray, outputs: Dict[str, torch.Tensor], name: str,
                            atol: float, rtol: float) -> bool:
    """A node whose output is another module's: the exporter fused modules (e.g. the
    TorchScript exporter folds an eval BatchNorm into the float Conv before it, so the Conv
    node computes the BatchNorm module's output)."""
    for other, tensor in outputs.items():
        if other == name or tuple(tensor.shape) != tuple(got.shape):
            continue
        reference = tensor.cpu().float().numpy()
        if _max_abs(got, reference) <= _tolerance(reference, atol, rtol):
            return True
    return False


def diagnose_qonnx(path: PathLike, model: nn.Module, x: torch.Tensor,
                   atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL
                   ) -> Optional[Divergence]:
    """Find the first node of the QONNX file at `path` whose output departs from PyTorch.

    Runs qonnx's `execute_onnx` with the full execution context and the PyTorch model
    (eval) with forward hooks on every module; the output tensor of the last node of each
    module's scope (kept in the nodes' doc_string) is compared with the module's output; a
    different number of elements is a divergence too (``Divergence.shapes``; a mere layout
    change, such as a weight transposed by the cleanup, is skipped). Returns None when every
    compared tensor agrees and no non-finite value appears; else the earliest (in graph
    order) disagreement.
    """
    from qonnx.core.onnx_exec import execute_onnx
    wrapper = _load(path)
    xs = x.detach().cpu().float().numpy()
    input_name, _ = _check_input_shape(wrapper, path, xs)
    modules = dict(model.named_modules())
    with _eval_mode(model):
        tracker = _ModuleTracker(model, record_outputs=True)
        try:
            with torch.no_grad():
                model(x)
        finally:
            tracker.remove()
    try:
        context = execute_onnx(wrapper, {input_name: xs}, return_full_exec_context=True)
    except Exception as exc:
        raise QONNXExportError(f"qonnx cannot execute {path}: {_first_line(exc)}") from exc
    nodes = list(wrapper.graph.node)
    node_module = [_scope_to_module(n.doc_string, modules) if n.doc_string.startswith("/")
                   else None for n in nodes]
    # the last node of each module's scope (incl. sub-scopes) gives the module's output
    last_node: Dict[str, int] = {}
    for i, name in enumerate(node_module):
        if name is None:
            continue
        parts = name.split(".") if name else []
        for k in range(len(parts) + 1):
            last_node[".".join(parts[:k])] = i
    compare_at: Dict[int, str] = {}
    for name, i in last_node.items():
        if name in tracker.outputs and tracker.calls.get(name, 0) == 1:
            # the deepest module whose output this node is
            if i not in compare_at or len(name) > len(compare_at[i]):
                compare_at[i] = name
    last_match, compared = None, 0
    for i, node in enumerate(nodes):
        outputs = [context.get(o) for o in node.output if o]
        ins_finite = all(np.all(np.isfinite(context[n])) for n in node.input
                         if n and n in context and isinstance(context[n], np.ndarray)
                         and context[n].dtype.kind == "f")
        outs_finite = all(o is None or not isinstance(o, np.ndarray) or o.dtype.kind != "f"
                          or np.all(np.isfinite(o)) for o in outputs)
        if ins_finite and not outs_finite:
            name = node_module[i]
            return Divergence(node.name, node.op_type, name, _module_type(modules, name),
                              float("inf"), float("nan"), scope=node.doc_string,
                              last_match=last_match, non_finite=True, compared=compared)
        if i not in compare_at:
            continue
        name = compare_at[i]
        reference = tracker.outputs[name].cpu().float().numpy()
        got = outputs[0]
        if not isinstance(got, np.ndarray):
            continue
        if got.size != reference.size and got.dtype.kind == "f":
            # a wrong size, not a layout change (cleanup transposes Gemm weights, for one)
            return Divergence(node.name, node.op_type, name, _module_type(modules, name),
                              float("inf"), float("nan"), scope=node.doc_string,
                              last_match=last_match, compared=compared,
                              shapes=(tuple(got.shape), tuple(reference.shape)))
        if tuple(got.shape) != tuple(reference.shape):
            continue
        compared += 1
        tol = _tolerance(reference, atol, rtol)
        err = _max_abs(got, reference)
        if err <= tol or _matches_another_module(got, tracker.outputs, name, atol, rtol):
            last_match = (node.name, name, min(err, tol))
            continue
        differing = np.abs(got.astype(np.float64) - reference) > tol
        boundary = last_match is not None and _on_boundary(node, context, differing)
        return Divergence(node.name, node.op_type, name, _module_type(modules, name), err, tol,
                          scope=node.doc_string, last_match=last_match, boundary=boundary,
                          compared=compared)
    return None


def _try_diagnose(path, model, x, atol, rtol) -> Optional[Divergence]:
    try:
        return diagnose_qonnx(path, model, x, atol, rtol)
    except Exception as exc:  # diagnosis is a bonus, never the failure
        log.warning("could not diagnose %s: %s", path, exc)
        return None


def verify_qonnx(
        path: PathLike,
        model: nn.Module,
        inputs: Sequence[torch.Tensor],
        atol: float = DEFAULT_ATOL,
        rtol: float = DEFAULT_RTOL,
        diagnose: bool = True) -> float:
    """Check that the QONNX file reproduces `model` (eval mode) on every input.

    An output matches when max |qonnx - PyTorch| <= atol + rtol * max |PyTorch|. Returns
    the max absolute error; raises QONNXMismatchError (with the first diverging node,
    see `diagnose_qonnx`, when `diagnose`) otherwise.
    """
    return _verify(path, model, inputs, atol, rtol, diagnose, max_boundary_flips=0)[0]


def _verify(path, model, inputs, atol, rtol, diagnose, max_boundary_flips
            ) -> Tuple[float, List[int]]:
    """verify_qonnx, skipping up to `max_boundary_flips` inputs whose only mismatch is a
    quantizer input on a decision boundary (see `_on_boundary`); returns (max error over
    the other inputs, indices of the skipped ones)."""
    worst, flipped = 0.0, []
    wrapper = _load(path)
    from qonnx.core.onnx_exec import execute_onnx
    with _eval_mode(model):
        for i, x in enumerate(inputs):
            reference = _torch_reference(model, x)
            xs = x.detach().cpu().float().numpy()
            input_name, output_name = _check_input_shape(wrapper, path, xs)
            try:
                got = execute_onnx(wrapper, {input_name: xs})[output_name]
            except Exception as exc:
                raise QONNXExportError(
                    f"qonnx cannot execute {path}: {_first_line(exc)}") from exc
            if got.shape != reference.shape:
                divergence = _try_diagnose(path, model, x, atol, rtol) if diagnose else None
                where = f"; {divergence.describe()}" if divergence is not None else ""
                raise QONNXMismatchError(
                    f"input {i}: QONNX output shape {got.shape} != PyTorch {reference.shape}"
                    f"{where}", divergence=divergence, path=Path(path))
            err = _max_abs(got, reference)
            tol = _tolerance(reference, atol, rtol)
            if not err <= tol:
                divergence = None
                if diagnose or max_boundary_flips:
                    divergence = _try_diagnose(path, model, x, atol, rtol)
                if divergence is not None and divergence.boundary and \
                        len(flipped) < max_boundary_flips:
                    log.warning("%s: input %d skipped: %s", path, i, divergence.describe())
                    flipped.append(i)
                    continue
                where = divergence.describe() if divergence is not None else \
                    "no intermediate tensor differs beyond tolerance"
                raise QONNXMismatchError(
                    f"input {i} of {len(inputs)}: QONNX output differs from PyTorch by up to "
                    f"{err:.3g} (tolerance {tol:.3g} = atol {atol:g} + rtol {rtol:g} * "
                    f"max |output|) in {path}; {where}",
                    max_abs_error=err, divergence=divergence, path=Path(path))
            worst = max(worst, err)
    return worst, flipped


def _check_inputs(example: torch.Tensor, num_checks: int, seed: int) -> List[torch.Tensor]:
    """The example and num_checks - 1 random inputs with its shape, mean and spread."""
    g = torch.Generator().manual_seed(seed)
    x = example.detach()
    mean = float(x.float().mean()) if x.numel() else 0.0
    std = float(x.float().std()) if x.numel() > 1 else 0.0
    std = std if np.isfinite(std) and std > 0 else 1.0
    out = [x]
    for _ in range(max(num_checks, 1) - 1):
        r = torch.randn(x.shape, generator=g, dtype=torch.float32) * std + mean
        out.append(r.to(device=x.device, dtype=x.dtype))
    return out[:num_checks] if num_checks > 0 else []


def _check_example(model: nn.Module, example) -> None:
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example).__name__}")
    if example.dtype != torch.float32:
        raise TypeError(
            f"example_input has dtype {example.dtype}: QONNX export (and qonnx/FINN "
            f"execution) is float32; pass x.float() (and a float32 model)")
    wrong = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
             if p.is_floating_point() and p.dtype != torch.float32]
    if wrong:
        raise TypeError(f"model tensors {wrong[:5]} are not float32: call model.float() "
                        f"before exporting")
    if example.dim() == 0 or example.shape[0] < 1:
        raise ValueError(f"example_input of shape {tuple(example.shape)} has no batch axis")


def _forward_or_raise(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """A plain eval forward; a failure names the innermost module it happened in."""
    modules = dict(model.named_modules())
    tracker = _ModuleTracker(model)
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        name, detail = tracker.culprit(modules)
        where = (f" in module '{name}' ({_module_type(modules, name)}{detail})" if name
                 else "")
        raise QONNXExportError(
            f"the model fails on example_input of shape {tuple(example.shape)} "
            f"({example.dtype}){where}: {_first_line(exc)}",
            module=name, module_type=_module_type(modules, name)) from exc
    finally:
        tracker.remove()
    if _value(out) is None:
        raise QONNXExportError(
            f"{type(model).__name__} returns {type(out).__name__}, not a tensor: QONNX export "
            f"needs a single tensor output")
    return out


def _annotate_scopes(path: Path) -> None:
    """Keep each raw node name (its TorchScript scope) in the node's doc_string."""
    import onnx
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        if node.name.startswith("/") and not node.doc_string:
            node.doc_string = node.name
    onnx.save(proto, str(path))


def export_qonnx(
        model: nn.Module,
        example_input: torch.Tensor,
        path: PathLike,
        *,
        freeze: str = "mode",
        require_frozen: bool = False,
        verify: bool = True,
        num_checks: int = 4,
        check_inputs: Optional[Sequence[torch.Tensor]] = None,
        atol: float = DEFAULT_ATOL,
        rtol: float = DEFAULT_RTOL,
        seed: int = 0,
        cleanup: bool = True,
        opset_version: Optional[int] = None) -> ExportResult:
    """Export `model` to QONNX at `path` and verify the file against the model.

    Args:
        model: an LR / Brevitas / torch model (float32). Exported in eval(); its training
            mode (per module) and LR layers' frozen state are restored afterwards.
        example_input: a float32 tensor; its shape (batch included) is the exported shape.
        freeze: what to do with unfrozen LR layers: "mode" (default) exports each as the
            mode of its distribution (what eval() computes; the layers are unfrozen again
            afterwards and listed in `result.frozen_for_export`); "require" raises.
            Choose a sampled network with `lr_quant.freeze(model, "sample", seed=...)`
            before exporting. BatchNorm statistics are exported as they are: re-estimate
            them on the frozen network first.
        require_frozen: shorthand for freeze="require" (kept for existing callers).
        verify: execute the file with qonnx and compare with PyTorch (recommended).
        num_checks: verification inputs: example_input plus num_checks - 1 random inputs
            of its shape (normal, with its mean and std; seeded by `seed`).
        check_inputs: explicit verification inputs instead (each of the example's shape).
        atol, rtol: an output matches when max |qonnx - PyTorch| <= atol + rtol * max |out|.
        cleanup: run qonnx's cleanup_model on the file (verification needs it).
        opset_version: passed to torch.onnx.export (default: Brevitas' choice).

    Returns an `ExportResult` (path-like). Raises `QONNXExportError` (naming the module)
    when the model cannot run on the example or cannot be exported, `QONNXMismatchError`
    (naming the first diverging node; the file is kept) when verification fails,
    TypeError / ValueError for bad arguments.
    """
    from qonnx.util.cleanup import cleanup_model

    _check_example(model, example_input)
    if verify and not cleanup:
        raise ValueError("verify=True needs cleanup=True (qonnx executes cleaned graphs)")
    policy = "require" if require_frozen else freeze
    if check_inputs is not None:
        check_inputs = list(check_inputs)
        for i, x in enumerate(check_inputs):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(example_input.shape):
                raise ValueError(
                    f"check_inputs[{i}] must be a tensor of the example's shape "
                    f"{tuple(example_input.shape)}, got "
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    with _eval_mode(model), _frozen_for_export(model, policy) as frozen_names:
        output = _value(_forward_or_raise(model, example_input))
        try:
            _brevitas_export(model, example_input, str(path), opset_version)
        except Exception as exc:
            name, how = _locate_export_failure(model, example_input, opset_version)
            where = f" in module '{name}' ({_module_type(modules, name)}; {how})" \
                if name else ""
            raise QONNXExportError(
                f"QONNX export failed{where}: {_first_line(exc)}",
                module=name, module_type=_module_type(modules, name)) from exc
        _annotate_scopes(path)
        wrapper = _load(path)
        # before cleanup: it folds IntQuant weights into plain float initializers
        int_quant = [n for n in wrapper.graph.node if n.op_type == "IntQuant"]
        if int_quant:
            names = [f"{n.name} ({_scope_module_name(n.doc_string)})" for n in int_quant]
            raise QONNXExportError(
                f"the exported graph has IntQuant nodes {names}: FINN converts only Quant, "
                f"and qonnx cleanup folds IntQuant weights into float weights (export with "
                f"Brevitas' QONNX manager, which emits Quant)")
        if cleanup:
            wrapper = cleanup_model(wrapper)
            wrapper.save(str(path))
        worst, checks, flipped = float("nan"), 0, []
        if verify:
            inputs = check_inputs if check_inputs is not None else \
                _check_inputs(example_input, num_checks, seed)
            # a sign / rounding decision on a threshold may go either way in two float
            # runtimes: skip such inputs, but never more than half of them
            worst, flipped = _verify(path, model, inputs, atol, rtol, diagnose=True,
                                     max_boundary_flips=(len(inputs) - 1) // 2)
            checks = len(inputs) - len(flipped)
    quant_nodes, float_layers = describe_qonnx(wrapper)
    op_counts = dict(sorted(collections.Counter(n.op_type for n in wrapper.graph.node).items()))
    return ExportResult(
        path=path,
        input_shape=tuple(example_input.shape),
        output_shape=tuple(output.shape),
        max_abs_error=worst,
        num_checks=checks,
        op_counts=op_counts,
        quant_nodes=quant_nodes,
        float_layers=float_layers,
        frozen_for_export=frozen_names,
        boundary_flips=len(flipped))
