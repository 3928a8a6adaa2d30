"""FINN form (recipe ``finn: true``): every quantizer sits on the tensor it quantizes.

FINN maps a network into one dataflow partition with an integer datapath only if every
tensor between two hardware layers is quantized *once*, where it is produced, and every
reader (the next conv, the residual shortcut, a pool) reads that quantized tensor
(docs/finn.md, "timm ResNets on FINN"). The default placement (a quantizer as each
converted layer's ``input_quant``) leaves a float identity path and float adds. Rules, read
from a trace of the float model (one eval forward):

1. Every monotone activation module (ReLU ...) that runs becomes the recipe's activation
   quantizer (a ``QuantIdentity`` with learned per-channel thresholds): ``act1`` and ``act2``
   of a timm BasicBlock; the block output is quantized once and read by the next conv1,
   downsample conv and identity shortcut.
2. Every tensor read by a converted layer or by a residual add is a quantizer's output,
   looking through max-pools, flattens, identities and the global average pool; where it is
   not, the quantizer follows the module that produced it (``bn2`` ->
   ``Sequential(bn2, quantizer)``, ``downsample`` likewise), so an add sums two ternary
   streams. The layers reading the network input get ``activations.input_quantizer``.
3. A padded max-pool pads with the input type's minimum in FINN, whose padding layer takes
   0 only: the quantizer it reads is unsigned ({0, 1, 2}: the ternary + 1) and a fixed
   :class:`~lr_quant.nn.GridRequant` (x - 1) follows the pool, which gives exactly the
   values of the signed ternary pooled (max commutes with the shift). A forked unpadded
   pool gets ``GridRequant(0)`` (finn-plus' MakeMaxPoolNHWC rewires a forked pool wrongly).
4. Refused with the module's name (:class:`FinnFormError`): a Conv/Linear kept in float; a
   tensor computed by a function rather than a module (it cannot be quantized); a sum read
   without an activation after it; average pooling other than the global pool; a binary
   sign with residual adds or in front of a padded conv or pool (FINN pads with -1 there,
   and cannot map a bipolar threshold after an add: use ternary activations);
   per-layer activation overrides.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..nn.requant import GridRequant
from ..quant.activation import unsigned_ternary_injector
from ..quant.threshold import UnsignedTernaryThreshold, attach_threshold
from ..registry import ActQuantizer
from .handlers import DROPPABLE_ACTIVATIONS, replace_module
from .report import ConversionReport

__all__ = ["FinnFormError"]

#: modules a quantized tensor passes through unchanged in kind (values stay on the grid,
#: or the global average FINN maps as GlobalAccPool + a scalar)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_TRANSPARENT = (nn.Identity, nn.Flatten, nn.Dropout) + _MAX_POOLS
_ADDS = {"add", "__add__", "__iadd__", "__radd__", "add_"}


class FinnFormError(ValueError):
    """The model cannot be put in the FINN form; the message names the module."""


INPUT = "<input>"


@dataclass
class _Flow:
    """Who produced and who read which tensor in one eval forward. Tensors are named by
    their producer *at the time they are read* (an in-place ReLU or ``x += shortcut``
    returns the object it was given: the reads before and after it are told apart)."""
    modules: Dict[str, nn.Module]
    input_of: Dict[str, Optional[str]] = field(default_factory=dict)  # module -> producer
    readers: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    channels: Dict[str, int] = field(default_factory=dict)   # producer -> size of dim 1
    adds: List[Tuple[str, List[Optional[str]]]] = field(default_factory=list)
    activations: List[str] = field(default_factory=list)     # in call order
    calls: Dict[str, int] = field(default_factory=lambda: defaultdict(int))


class _FlowMode(TorchFunctionMode):
    """Names each tensor by its producer and records the additions between tensors."""

    def __init__(self, flow: _Flow, running: List[str]):
        super().__init__()
        self.flow, self.running = flow, running
        self.producer: Dict[int, str] = {}
        self.keep: list = []      # every named tensor stays alive: ids stay unique

    def name(self, tensor: Tensor, producer: str, force: bool = False) -> None:
        self.keep.append(tensor)
        if force:
            self.producer[id(tensor)] = producer
        else:
            self.producer.setdefault(id(tensor), producer)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        operands = [a for a in args if isinstance(a, Tensor)]
        before = [self.producer.get(id(t)) for t in operands]
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _ADDS and len(operands) == 2 \
                and isinstance(out, Tensor):
            where = self.running[-1] if self.running else ""
            label = f"<add in {where or 'the model'}>"
            self.flow.adds.append((where, before))
            for producer in before:
                if producer is not None:
                    self.flow.readers[producer].append(label)
            self.name(out, label, force=True)
        return out


@torch.no_grad()
def _trace_flow(model: nn.Module, example_input: Tensor) -> _Flow:
    names = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    flow = _Flow(dict(model.named_modules()))
    running: List[str] = []
    mode = _FlowMode(flow, running)
    mode.name(example_input, INPUT)
    handles = []

    def pre(module, args):
        name = names[id(module)]
        running.append(name)
        flow.calls[name] += 1
        x = args[0] if args else None
        if isinstance(x, Tensor) and name not in flow.input_of:
            producer = mode.producer.get(id(x))
            flow.input_of[name] = producer
            if producer is not None and next(module.children(), None) is None:
                flow.readers[producer].append(name)     # leaf modules: the real readers

    def post(module, args, out):
        name = running.pop()
        if not isinstance(out, Tensor):
            return
        is_act = isinstance(module, DROPPABLE_ACTIVATIONS)
        mode.name(out, name, force=is_act)     # in place: the same object as its input
        if is_act:
            flow.activations.append(name)
        if mode.producer[id(out)] == name and out.dim() >= 2:
            flow.channels.setdefault(name, out.shape[1])

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    training = model.training
    model.eval()
    try:
        with mode:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return flow


def _unsigned(act: ActQuantizer) -> ActQuantizer:
    """The ternary quantizer shifted to {0, 1, 2} (same thresholds, scale 1)."""
    return ActQuantizer(f"{act.name} (unsigned)", unsigned_ternary_injector(act.injector),
                        act.precision, act.is_sign, UnsignedTernaryThreshold)


class _FinnForm:
    def __init__(self, model: nn.Module, flow: _Flow, act: ActQuantizer,
                 converted: Dict[str, nn.Module], threshold_init: str):
        self.model, self.flow, self.act = model, flow, act
        self.converted, self.threshold_init = converted, threshold_init
        self.wrap: Dict[str, str] = {}          # module -> why its output is quantized
        self.input_readers: List[str] = []
        self.unsigned: Set[str] = set()         # producers whose quantizer is {0, 1, 2}
        self.requant: Dict[str, float] = {}     # max-pool -> offset of its GridRequant

    def error(self, where: str, what: str) -> FinnFormError:
        return FinnFormError(f"finn: true: {where}: {what}")

    def source(self, producer: Optional[str], reader: str) -> Tuple[str, str]:
        """Follow a tensor (named by its producer) back through transparent modules:
        ("input", ""), ("act", name), ("add", label) or ("module", name) of the first
        producer that is none of these."""
        flow, seen = self.flow, set()
        while True:
            if producer is None:
                raise self.error(reader, "reads a tensor computed outside any module (a "
                                         "function of the forward): it cannot be quantized")
            if producer == INPUT:
                return "input", ""
            if producer.startswith("<add"):
                return "add", producer
            if producer in flow.activations:
                return "act", producer
            module = flow.modules[producer]
            global_avg = isinstance(module, nn.AdaptiveAvgPool2d) and \
                module.output_size in (1, (1, 1))
            if not (isinstance(module, _TRANSPARENT) or global_avg) or producer in seen:
                return "module", producer
            seen.add(producer)
            producer = flow.input_of.get(producer)

    def plan(self) -> None:
        flow = self.flow
        for name in flow.activations:
            if flow.calls[name] > 1:
                raise self.error(name, f"one activation module called {flow.calls[name]} "
                                       f"times: each use needs its own quantizer (its own "
                                       f"thresholds); give each call its own module")
        for name in self.converted:
            if name not in flow.input_of:
                raise self.error(name, "was not called in the traced forward")
            kind, producer = self.source(flow.input_of[name], name)
            if kind == "input":
                self.input_readers.append(name)
            elif kind == "add":
                raise self.error(name, f"reads a residual sum ({producer[1:-1]}) with no "
                                       f"activation after it: nothing quantizes the sum")
            elif kind == "module":
                self.quantize_output_of(producer, name)
        for where, operands in flow.adds:
            where = where or "the model"
            if self.act.precision == 1:
                raise self.error(where, (
                    "a residual add with binary (sign) activations: FINN cannot map the "
                    "sign after the add (a standalone bipolar threshold) and pads the convs "
                    "with -1; use a ternary activation quantizer (recipes/finn_resnet_w1a2)"))
            for operand in operands:
                kind, producer = self.source(operand, f"the add in {where}")
                if kind == "input":
                    raise self.error(where, "adds the network input itself")
                if kind == "add":
                    raise self.error(where, f"adds a sum ({producer[1:-1]}) that no "
                                            f"activation quantizes")
                if kind == "module":
                    self.quantize_output_of(producer, f"the add in {where}")
        self.plan_pools_and_padding()

    def quantize_output_of(self, name: str, reader: str) -> None:
        module = self.flow.modules[name]
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            raise self.error(reader, (
                f"reads {name} ({type(module).__name__}): FINN maps average pooling only "
                f"as the global pool before the classifier (timm ResNets: avg_down=False)"))
        self.wrap.setdefault(name, reader)

    def plan_pools_and_padding(self) -> None:
        """Padded max-pools read an unsigned quantizer and get a re-quantizer (rule 3);
        binary signs in front of padded pools or convs are refused."""
        flow = self.flow
        for name, pool in flow.modules.items():
            if not isinstance(pool, _MAX_POOLS) or name not in flow.input_of:
                continue
            kind, producer = self.source(flow.input_of[name], name)
            quantized = kind == "act" or producer in self.wrap
            padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
            if any(p > 0 for p in padding) and quantized:
                if self.act.precision == 1:
                    raise self.error(name, "a padded max-pool over binary activations: "
                                           "FINN pads it with -1 (use ternary activations)")
                if flow.input_of[name] != producer or len(flow.readers[producer]) > 1:
                    raise self.error(name, f"the quantized tensor it pools ({producer}) has "
                                           f"other readers too: a padded pool needs its own "
                                           f"unsigned quantizer")
                self.unsigned.add(producer)
                self.requant[name] = 1.0
            elif quantized and len(flow.readers.get(name, [])) > 1:
                self.requant[name] = 0.0
        for name, module in self.converted.items():
            padding = getattr(module, "padding", 0)
            padded = padding == "same" or any(
                p > 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
            if self.act.precision == 1 and padded and name not in self.input_readers:
                raise self.error(name, "a padded conv reading binary activations: FINN's "
                                       "XNOR lowering pads with -1, not 0 (use unpadded convs "
                                       "or ternary activations)")

    # -- rewrite --------------------------------------------------------------------------
    def quantizer(self, channels: int, act: ActQuantizer) -> nn.Module:
        from brevitas.nn import QuantIdentity

        q = QuantIdentity(act_quant=act.injector, return_quant_tensor=False)
        if act.threshold is not None:
            attach_threshold(q.act_quant, channels, 1, self.threshold_init,
                             threshold_class=act.threshold)
        return q

    def apply(self, report: ConversionReport) -> Dict[str, str]:
        """Rewrite the model; returns {module: the quantizer placed at its output}."""
        flow, model, unsigned = self.flow, self.model, self.unsigned
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        placed = {}
        for name in flow.activations:
            act = _unsigned(self.act) if name in unsigned else self.act
            replace_module(model, name, self.quantizer(flow.channels[name], act).to(device))
            placed[name] = act.name
        for name, reader in self.wrap.items():
            act = _unsigned(self.act) if name in unsigned else self.act
            q = self.quantizer(flow.channels[name], act).to(device)
            replace_module(model, name, nn.Sequential(model.get_submodule(name), q))
            placed[name] = act.name
            report.notes.append(f"finn: {act.name} after {name} (read by {reader})")
            inner = model.get_submodule(name)[0]
            if isinstance(inner, nn.modules.batchnorm._BatchNorm) and \
                    inner.weight is not None and not inner.weight.detach().any():
                report.notes.append(
                    f"finn: {name} has weight 0 (timm's zero_init_last on an untrained "
                    f"model): the quantizer after it outputs a constant and passes no "
                    f"gradient, so that residual branch stays off; start from trained weights")
        for name, offset in self.requant.items():
            replace_module(model, name, nn.Sequential(model.get_submodule(name),
                                                GridRequant(offset).to(device)))
            report.notes.append(f"finn: {name} is followed by a fixed re-quantizer "
                                f"(x - {offset:g})" + (" (unsigned input: FINN pads a max-pool "
                                                        "with 0)" if offset else ""))
        if placed:
            report.notes.append("finn: quantizers on the tensors they quantize (producer "
                                f"side): {', '.join(sorted(placed))}")
        return placed


def plan_finn_form(model: nn.Module, example_input: Tensor, act: Optional[ActQuantizer],
                   converted: Dict[str, nn.Module], kept: Dict[str, str],
                   threshold_init: str) -> _FinnForm:
    """Trace the float `model` and decide where each quantizer goes; raises
    :class:`FinnFormError` naming the module where the FINN form is impossible."""
    if act is None or not act.is_sign:
        raise FinnFormError("finn: true needs activations.quantizer (a ternary or binary "
                            "threshold quantizer, e.g. stochastic_ternary)")
    if act.precision not in (1, 2):
        raise FinnFormError(f"finn: true: activations.quantizer {act.name} has "
                            f"{act.precision} bits; the FINN form takes binary or ternary")
    for name, reason in kept.items():
        raise FinnFormError(f"finn: true: {name} stays in float ({reason}): FINN maps only "
                            f"quantized layers; set keep_fp.first_conv / classifier to false "
                            f"and drop it from keep_fp.names")
    form = _FinnForm(model, _trace_flow(model, example_input), act, converted, threshold_init)
    form.plan()
    return form
