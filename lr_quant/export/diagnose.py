"""Divergence diagnosis: the first node of a QONNX file whose output departs from the
PyTorch module it came from."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .modules import ModuleTracker, eval_mode, module_type, scope_module
from .results import Divergence
from .run import (DEFAULT_ATOL, DEFAULT_RTOL, PathLike, check_input_shape, execute, load,
                  max_abs, tolerance)

__all__ = ["diagnose_qonnx", "try_diagnose"]

log = logging.getLogger(__name__)


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
        if max_abs(got, reference) <= tolerance(reference, atol, rtol):
            return True
    return False


def _compare_points(node_module: List[Optional[str]], tracker: ModuleTracker
                    ) -> Dict[int, str]:
    """{node index: module} where a node's output is a module's (called once) output: the
    last node of the module's scope, sub-scopes included; the deepest such module."""
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
            if i not in compare_at or len(name) > len(compare_at[i]):
                compare_at[i] = name
    return compare_at


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
    wrapper = load(path)
    xs = x.detach().cpu().float().numpy()
    input_name, _ = check_input_shape(wrapper, path, xs)
    modules = dict(model.named_modules())
    with eval_mode(model), ModuleTracker(model, record_outputs=True) as tracker, \
            torch.no_grad():
        model(x)
    context = execute(wrapper, path, {input_name: xs}, full_context=True)
    nodes = list(wrapper.graph.node)
    node_module = [scope_module(n.doc_string, modules) if n.doc_string.startswith("/")
                   else None for n in nodes]
    compare_at = _compare_points(node_module, tracker)
    last_match, compared = None, 0

    def divergence(node, name, error, tol, **kwargs) -> Divergence:
        return Divergence(node.name, node.op_type, name, module_type(modules, name), error,
                          tol, scope=node.doc_string, last_match=last_match,
                          compared=compared, **kwargs)

    for i, node in enumerate(nodes):
        outputs = [context.get(o) for o in node.output if o]
        ins_finite = all(np.all(np.isfinite(context[n])) for n in node.input
                         if n and n in context and isinstance(context[n], np.ndarray)
                         and context[n].dtype.kind == "f")
        outs_finite = all(o is None or not isinstance(o, np.ndarray) or o.dtype.kind != "f"
                          or np.all(np.isfinite(o)) for o in outputs)
        if ins_finite and not outs_finite:
            return divergence(node, node_module[i], float("inf"), float("nan"),
                              non_finite=True)
        if i not in compare_at:
            continue
        name = compare_at[i]
        reference = tracker.outputs[name].cpu().float().numpy()
        got = outputs[0]
        if not isinstance(got, np.ndarray):
            continue
        if got.size != reference.size and got.dtype.kind == "f":
            # a wrong size, not a layout change (cleanup transposes Gemm weights, for one)
            return divergence(node, name, float("inf"), float("nan"),
                              shapes=(tuple(got.shape), tuple(reference.shape)))
        if tuple(got.shape) != tuple(reference.shape):
            continue
        compared += 1
        tol = tolerance(reference, atol, rtol)
        err = max_abs(got, reference)
        if err <= tol or _matches_another_module(got, tracker.outputs, name, atol, rtol):
            last_match = (node.name, name, min(err, tol))
            continue
        differing = np.abs(got.astype(np.float64) - reference) > tol
        boundary = last_match is not None and _on_boundary(node, context, differing)
        return divergence(node, name, err, tol, boundary=boundary)
    return None


def try_diagnose(path, model, x, atol, rtol) -> Optional[Divergence]:
    """`diagnose_qonnx`, or None (logged) when the diagnosis itself fails."""
    try:
        return diagnose_qonnx(path, model, x, atol, rtol)
    except Exception as exc:  # diagnosis is a bonus, never the failure
        log.warning("could not diagnose %s: %s", path, exc)
        return None
