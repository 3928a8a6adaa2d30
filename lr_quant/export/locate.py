"""Failure location: the module a failing forward pass or export happened in."""

from __future__ import annotations

import io
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .._tensor import as_tensor
from .modules import ModuleTracker, is_internal, module_type
from .results import QONNXExportError, first_line

__all__ = ["forward_or_raise", "locate_export_failure"]

#: export(module, example, target) -> None; raises when `module` does not export.
ExportFn = Callable[[nn.Module, torch.Tensor, object], None]


def forward_or_raise(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """A plain forward pass (no grad) returning a tensor output; a failure raises
    QONNXExportError naming the innermost module it happened in."""
    modules = dict(model.named_modules())
    with ModuleTracker(model) as tracker:
        try:
            with torch.no_grad():
                out = model(example)
        except Exception as exc:
            name, detail = tracker.culprit(modules)
            where = (f" in module '{name}' ({module_type(modules, name)}{detail})" if name
                     else "")
            raise QONNXExportError(
                f"the model fails on example_input of shape {tuple(example.shape)} "
                f"({example.dtype}){where}: {first_line(exc)}",
                module=name, module_type=module_type(modules, name)) from exc
    if as_tensor(out, strict=True) is None:
        raise QONNXExportError(
            f"{type(model).__name__} returns {type(out).__name__}, not a tensor: QONNX export "
            f"needs a single tensor output")
    return out


def locate_export_failure(model: nn.Module, example: torch.Tensor, export: ExportFn
                          ) -> Tuple[Optional[str], str]:
    """(module name, how it was found) of an export failure.

    First the innermost module running when `export` raised (a failure while tracing);
    if the export got past tracing (e.g. an op without an ONNX symbolic), the smallest
    submodule that fails to export on its own, with the inputs it got in a forward pass.
    """
    modules = dict(model.named_modules())
    with ModuleTracker(model) as tracker:
        try:
            export(model, example, io.BytesIO())
        except Exception:
            if tracker.stack:
                name, detail = tracker.culprit(modules)
                return name, "running when the exporter raised" + detail
    with ModuleTracker(model, record_inputs=True) as recorder, torch.no_grad():
        model(example)

    def fails(name: str) -> bool:
        args = recorder.inputs.get(name)
        if args is None or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return False
        try:
            export(modules[name], args[0], io.BytesIO())
            return False
        except Exception:
            return True

    found, current = None, ""
    while True:
        children = [f"{current}.{c}" if current else c
                    for c, child in modules[current].named_children()
                    if not is_internal(child)]   # proxies do not export on their own
        failing = next((c for c in children if fails(c)), None)
        if failing is None:
            break
        found = current = failing
    return found, "the smallest submodule that fails to export on its own"
