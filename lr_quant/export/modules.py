"""The PyTorch side of an export: which module is running (`ModuleTracker`), which module
a graph node came from (`scope_module`), and the model in eval() for a while (`eval_mode`).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .._tensor import as_tensor

__all__ = ["ModuleTracker", "eval_mode", "is_internal", "module_type", "scope_module"]

#: Packages whose modules belong to the layer that holds them (quantizer proxies and cores).
_INTERNAL_PACKAGES = ("brevitas.proxy", "brevitas.core", "brevitas.export",
                      "brevitas.inject", "brevitas.function", "lr_quant.quant")
#: Brevitas quantizer submodules of a layer; an input / output quantizer is named itself.
_QUANT_SCOPES = ("weight_quant", "input_quant", "output_quant", "act_quant", "bias_quant")


def is_internal(module: nn.Module) -> bool:
    """A quantizer proxy / core: it belongs to its layer and does not export on its own."""
    return type(module).__module__.startswith(_INTERNAL_PACKAGES)


def module_type(modules: Dict[str, nn.Module], name: Optional[str]) -> Optional[str]:
    """Class name of the module called `name`, None when there is no such module."""
    return None if name is None or name not in modules else type(modules[name]).__name__


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval(); every module's training flag is restored afterwards."""
    was_training = model.training
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        model.training = was_training


def scope_module(scope: str, modules: Optional[Dict[str, nn.Module]] = None
                 ) -> Optional[str]:
    """Module name of a TorchScript ONNX scope, e.g. '/layer1/layer1.0/conv1/Conv' ->
    'layer1.0.conv1' ('/conv1/conv1.0/Conv' -> 'conv1.0'); None for a name with no '/'.

    With `modules` (a model's named_modules), the longest prefix that names one of them
    ('' for the model itself, None when the model is not in `modules`). Without, a best
    effort: Brevitas quantizer internals (weight_quant/export_handler, ...) are cut back to
    their layer; an input / output quantizer is named itself.
    """
    if not scope or "/" not in scope:
        return None
    segments = [s for s in scope.split("/") if s][:-1]  # the last one is the op name
    parts: List[str] = []
    previous = None
    for seg in segments:
        if previous is not None and seg.startswith(previous + "."):
            parts.append(seg[len(previous) + 1:])  # 'layer1.0' after 'layer1': child '0'
        else:
            parts.append(seg)
        previous = seg
    if modules is None:
        for i, part in enumerate(parts):
            if part in _QUANT_SCOPES:
                parts = parts[:i + (1 if part in ("input_quant", "output_quant") else 0)]
                break
        return ".".join(parts)
    name = ".".join(parts)
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name if name in modules else ("" if "" in modules else None)


class ModuleTracker:
    """Forward hooks that record the stack of modules being run, their calls and
    optionally their first inputs and last outputs.

    A context manager: the hooks are attached on entry and removed on exit.
    """

    def __init__(self, model: nn.Module, record_outputs: bool = False,
                 record_inputs: bool = False):
        self.model = model
        self.stack: List[str] = []
        self.outputs: Dict[str, torch.Tensor] = {}
        self.inputs: Dict[str, tuple] = {}
        self.calls: Dict[str, int] = collections.Counter()
        self.handles = []
        self.record_outputs = record_outputs
        self.record_inputs = record_inputs

    def __enter__(self) -> "ModuleTracker":
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

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
                value = as_tensor(output, strict=True)
                if value is not None:
                    self.outputs[name] = value.detach().clone()
        return hook

    def culprit(self, modules: Dict[str, nn.Module]) -> Tuple[Optional[str], str]:
        """(innermost user-level module, ' inside <internal module>' or '') of the stack:
        Brevitas proxies / cores and lr_quant quantizer internals belong to their layer."""
        inner = self.stack[-1] if self.stack else None
        layer = next((n for n in reversed(self.stack) if not is_internal(modules[n])), inner)
        detail = f", inside '{inner}' ({module_type(modules, inner)})" \
            if inner is not None and inner != layer else ""
        return layer, detail
