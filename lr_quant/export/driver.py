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
import functools
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

from .._tensor import as_tensor
from ..nn.lr_layers import lr_layers
from .graph import describe_qonnx
from .locate import forward_or_raise, locate_export_failure
from .modules import eval_mode, module_type, scope_module
from .results import ExportResult, QONNXExportError, first_line
from .run import DEFAULT_ATOL, DEFAULT_RTOL, PathLike, load
from .verify import make_check_inputs, verify_with_boundary_flips

__all__ = ["export_qonnx", "brevitas_export", "FREEZE_POLICIES"]

log = logging.getLogger(__name__)

#: What `export_qonnx` does with LR layers that are not frozen.
FREEZE_POLICIES = ("mode", "require")


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


def _check_arguments(model: nn.Module, example, verify: bool, cleanup: bool,
                     check_inputs: Optional[Sequence[torch.Tensor]]
                     ) -> Optional[List[torch.Tensor]]:
    """TypeError / ValueError for arguments `export_qonnx` cannot use; returns
    `check_inputs` as a list (None when not given)."""
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
    if verify and not cleanup:
        raise ValueError("verify=True needs cleanup=True (qonnx executes cleaned graphs)")
    if check_inputs is None:
        return None
    check_inputs = list(check_inputs)
    for i, x in enumerate(check_inputs):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(example.shape):
            raise ValueError(
                f"check_inputs[{i}] must be a tensor of the example's shape "
                f"{tuple(example.shape)}, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return check_inputs


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


def brevitas_export(model: nn.Module, example: torch.Tensor, target, opset_version=None
                    ) -> None:
    """Brevitas' QONNX export of `model` to `target` (a path or a file object) with the
    TorchScript exporter; on a failure, Brevitas' caching and export modes are reset."""
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    try:
        with torch.no_grad():
            brevitas_export_qonnx(model, args=example, export_path=target, dynamo=False, **kwargs)
    except BaseException:
        _restore_brevitas_state(model)
        raise


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
        require_frozen: True is freeze="require".
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

    check_inputs = _check_arguments(model, example_input, verify, cleanup, check_inputs)
    policy = "require" if require_frozen else freeze
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    export = functools.partial(brevitas_export, opset_version=opset_version)
    with eval_mode(model), _frozen_for_export(model, policy) as frozen_names:
        output = as_tensor(forward_or_raise(model, example_input), strict=True)
        try:
            export(model, example_input, str(path))
        except Exception as exc:
            name, how = locate_export_failure(model, example_input, export)
            where = f" in module '{name}' ({module_type(modules, name)}; {how})" \
                if name else ""
            raise QONNXExportError(
                f"QONNX export failed{where}: {first_line(exc)}",
                module=name, module_type=module_type(modules, name)) from exc
        _annotate_scopes(path)
        wrapper = load(path)
        # before cleanup: it folds IntQuant weights into plain float initializers
        int_quant = [n for n in wrapper.graph.node if n.op_type == "IntQuant"]
        if int_quant:
            names = [f"{n.name} ({scope_module(n.doc_string)})" for n in int_quant]
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
                make_check_inputs(example_input, num_checks, seed)
            # a sign / rounding decision on a threshold may go either way in two float
            # runtimes: skip such inputs, but never more than half of them
            worst, flipped = verify_with_boundary_flips(
                path, model, inputs, atol, rtol, diagnose=True,
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
