"""convert(model, recipe): any timm / torch backbone -> LR network, with a report.

    model, report = convert_with_report(timm.create_model("resnet18"), load_recipe("resnet_w1"))
    print(report)            # every Conv/Linear: what it became, or why it stayed float

What happens, top to bottom:

1. **Plan.** Every Conv/Linear of the model (``nn.modules.conv._ConvNd``, ``nn.Linear``,
   timm's ``CondConv2d``) gets one decision. A layer is converted only if its *exact* class
   has a handler (:data:`LAYER_HANDLERS`) whose LR layer computes what the float layer
   computes; any other class (a subclass with its own forward, weight standardization,
   per-sample expert kernels, ``nn.MultiheadAttention``'s ``out_proj`` whose weight is read
   directly) stays in full precision and the report says why: conversion never silently
   changes what a layer computes. Then the recipe's rules: per-layer ``overrides`` (an
   exact name beats every ``re:`` regex; among regexes the first in the file wins; an
   override's explicit ``weights`` beats the keep-FP lists), ``keep_fp`` (timm
   ``pretrained_cfg`` first_conv / classifier, explicit names), and the weight quantizer
   for the layer kind (conv, depthwise, linear). An override key or keep-FP name that
   matches no Conv/Linear raises a ``RecipeError`` (a typo must not silently do nothing).
2. **Trace** (only when the recipe quantizes activations): one eval forward of the float
   model on an example input, with module hooks and a ``TorchFunctionMode``, finds the
   layers that read the network input (they get ``activations.input_quantizer``) and, for
   each monotone activation module (ReLU, ReLU6, LeakyReLU, Hardtanh, ELU, Sigmoid, Tanh),
   every consumer of its output.
3. **Swap** with Brevitas' ``layerwise_quantize`` (exact class names; kwargs as per-module
   lambdas ``lambda module, name: ...``), one call per (source class, target class).
   Float weights load as the LR initialization (Shayer et al.); ``init.from_pretrained:
   false`` re-draws the logits from scratch.
4. **Activations.** Sign (and ternary) quantizers become the ``input_quant`` of converted
   layers with learned per-channel thresholds (:func:`lr_quant.quant.threshold.attach_threshold`:
   ``ThresholdShift`` / ``TernaryThreshold``). A monotone activation module whose every
   output feeds *only* such inputs is replaced by ``nn.Identity``: sign(ReLU(a) - t) =
   sign(a - t) for t > 0 (and for t <= 0 the sign of a ReLU output is constant, so nothing
   is lost); a ternary quantizer is a pair of such thresholds (exact where both are > 0,
   learned otherwise). With ``activations.moments`` the LR
   layers emit their Gaussian moments (``lr_output_moments``): on LR -> BN -> (ReLU
   dropped) -> sign, as inside timm ResNet blocks, the sign runs in moment mode,
   P(+1) = Phi((m' - t) / sqrt(v')). Elsewhere (a ReLU also feeding a residual add, a
   pooling in between, SiLU/GELU) the sign gets a plain tensor and runs in noise mode.

:func:`calibrate_thresholds` sets every threshold from a calibration batch.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from brevitas.graph.quantize import layerwise_quantize
from brevitas.nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from brevitas.nn.mixin.act import QuantInputMixin
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._tensor import as_tensor
from .moments import split_moments
from .nn.lr_layers import LRQuantConv1d, LRQuantConv2d, LRQuantConv3d, LRQuantLinear, LRWeightMixin
from .quant.threshold import ThresholdShift, attach_threshold
from .recipe import REGEX_PREFIX, LayerOverride, Recipe, RecipeError, load_recipe
from .registry import ActQuantizer, WeightQuantizer

__all__ = [
    "convert",
    "convert_with_report",
    "calibrate_thresholds",
    "ConversionReport",
    "LayerReport",
    "LayerHandler",
    "LAYER_HANDLERS",
    "register_layer_handler",
    "DROPPABLE_ACTIVATIONS",
    "conv_linear_modules",
]

CONVERTED = "converted"
KEPT_FP = "kept_fp"
FP_BITS = 32

#: activation modules that are monotone non-decreasing: sign(f(a) - t) = sign(a - t') with
#: a learned threshold, so a converter may drop them in front of a sign (ReLU: t' = t, t > 0)
DROPPABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.Sigmoid,
                         nn.Tanh)


# -- layer handlers: exact source class -> LR / Brevitas class --------------------------


@dataclass(frozen=True)
class LayerHandler:
    """How a float layer class converts: target classes and constructor overrides, or the
    reason it stays in full precision (``lr_class is None``)."""
    lr_class: Optional[type] = None
    brevitas_class: Optional[type] = None
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    reason: str = ""

    def target(self, quantizer: WeightQuantizer) -> Optional[type]:
        return self.lr_class if quantizer.is_lr else self.brevitas_class


#: exact class -> handler (subclasses are *not* covered: their forward may differ)
LAYER_HANDLERS: Dict[type, LayerHandler] = {}


def register_layer_handler(cls: type, handler: LayerHandler) -> None:
    """Teach the converter a layer class (exact type match)."""
    LAYER_HANDLERS[cls] = handler


register_layer_handler(nn.Linear, LayerHandler(LRQuantLinear, QuantLinear))
register_layer_handler(nn.Conv1d, LayerHandler(LRQuantConv1d, QuantConv1d))
register_layer_handler(nn.Conv2d, LayerHandler(LRQuantConv2d, QuantConv2d))
register_layer_handler(nn.Conv3d, LayerHandler(LRQuantConv3d, QuantConv3d))
register_layer_handler(nn.modules.linear.NonDynamicallyQuantizableLinear, LayerHandler(
    reason="out_proj of nn.MultiheadAttention: its weight is read directly by "
           "F.multi_head_attention_forward, the module is never called"))

_CondConv2d = None
try:  # timm layer variants
    from timm.layers import Linear as _TimmLinear
    from timm.layers.cond_conv2d import CondConv2d as _CondConv2d
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.layers.std_conv import (ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d,
                                      StdConv2dSame)

    # forward is F.linear(x, weight, bias) (a dtype cast under torchscript only)
    register_layer_handler(_TimmLinear, LayerHandler(LRQuantLinear, QuantLinear))
    # TF 'SAME' padding computed from the input size: Brevitas' QuantConv2d does the same
    # (torch padding='same' for stride 1, its own pad for stride > 1; same split of the pad;
    # LR layers compute that pad as constants, so the QONNX export has a static Pad)
    _same = (("padding", "same"),)
    register_layer_handler(Conv2dSame, LayerHandler(LRQuantConv2d, QuantConv2d, _same))
    register_layer_handler(Conv2dSameExport, LayerHandler(LRQuantConv2d, QuantConv2d, _same))
    _std = ("weight standardization: the forward re-normalizes the weight per output "
            "channel, discrete weights would not stay discrete")
    for _cls in (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame):
        register_layer_handler(_cls, LayerHandler(reason=_std))
    register_layer_handler(_CondConv2d, LayerHandler(
        reason="CondConv2d: per-sample mixture of expert kernels (routing weights), "
               "no LR layer for it"))
except ImportError:  # pragma: no cover - timm is a dependency
    pass


def _is_conv_linear(module: nn.Module) -> bool:
    types = (nn.modules.conv._ConvNd, nn.Linear) + ((_CondConv2d,) if _CondConv2d else ())
    return isinstance(module, types)


def conv_linear_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every Conv / Linear layer the converter accounts for."""
    return [(n, m) for n, m in model.named_modules() if _is_conv_linear(m)]


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    groups = getattr(module, "groups", 1)
    if groups > 1 and groups == getattr(module, "in_channels", -1):
        return "depthwise"
    return "conv"


# -- report ---------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One Conv/Linear of the original model and what it became."""
    name: str
    source: str                     # original class name
    kind: str                       # conv | depthwise | linear
    status: str                     # "converted" or "kept_fp"
    target: str = ""                # new class name
    weight_quant: str = ""          # registry name of the weight quantizer
    weight_bits: int = FP_BITS
    input_quant: str = ""           # registry name of the input quantizer ("" = float)
    input_bits: int = FP_BITS
    reason: str = ""                # why kept in full precision / which rule applied

    @property
    def converted(self) -> bool:
        return self.status == CONVERTED


@dataclass
class ConversionReport:
    """What `convert` did to every Conv/Linear layer, and to activations."""
    layers: List[LayerReport] = field(default_factory=list)
    dropped_activations: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return any(row.name == name for row in self.layers)

    @property
    def converted(self) -> List[LayerReport]:
        return [r for r in self.layers if r.converted]

    @property
    def kept(self) -> List[LayerReport]:
        return [r for r in self.layers if not r.converted]

    def table(self) -> str:
        header = ("layer", "type", "kind", "became", "weights", "w bits", "input", "in bits",
                  "note")
        rows = [(r.name, r.source, r.kind, r.target or "float (kept)",
                 r.weight_quant or "-", str(r.weight_bits), r.input_quant or "float",
                 str(r.input_bits), r.reason) for r in self.layers]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
                  for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in rows]
        lines.append(f"{len(self.converted)} converted, {len(self.kept)} kept in full precision"
                     f", {len(self.dropped_activations)} activation modules dropped")
        lines += [f"dropped {name}: {why}" for name, why in self.dropped_activations]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- plan -----------------------------------------------------------------------------


@dataclass
class _Plan:
    name: str
    module: nn.Module
    row: LayerReport
    quantizer: Optional[WeightQuantizer] = None
    target: Optional[type] = None
    handler: Optional[LayerHandler] = None
    override: Optional[LayerOverride] = None
    act: Optional[ActQuantizer] = None


class _Rules:
    """Exact names beat regexes; among regexes the first (file order) wins."""

    def __init__(self, patterns: Iterable[str]):
        self.exact: Dict[str, str] = {}
        self.regex: List[Tuple[str, "re.Pattern"]] = []
        for p in patterns:
            if p.startswith(REGEX_PREFIX):
                self.regex.append((p, re.compile(p[len(REGEX_PREFIX):])))
            else:
                self.exact[p] = p
        self.used = set()
        self.shadowed_by: Dict[str, str] = {}

    def match(self, name: str) -> Optional[str]:
        hits = [p for p, rx in self.regex if rx.fullmatch(name)]
        key = self.exact.get(name)
        if key is None and hits:
            key = hits[0]
        for p in hits:
            if p != key:
                self.shadowed_by.setdefault(p, key)
        if key is not None:
            self.used.add(key)
        return key

    def unused(self) -> List[Tuple[str, Optional[str]]]:
        """(pattern, the rule that shadows it or None if it matches nothing)."""
        patterns = list(self.exact) + [p for p, _ in self.regex]
        return [(p, self.shadowed_by.get(p)) for p in patterns if p not in self.used]


def _timm_cfg_names(model: nn.Module, key: str) -> List[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    if not value:
        return []
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def _under(name: str, roots: Sequence[str]) -> Optional[str]:
    return next((r for r in roots if name == r or name.startswith(r + ".")), None)


def _unmatched_error(path: str, pattern: str, names: List[str], what: str) -> RecipeError:
    hint = difflib.get_close_matches(pattern, names, n=3)
    sample = hint or names[:6]
    return RecipeError(path, f"{pattern!r} matches no Conv/Linear layer of the model ({what}); "
                             f"layer names look like {sample}")


def _plan(model: nn.Module, recipe: Recipe) -> Tuple[List[_Plan], List[str]]:
    layers = conv_linear_modules(model)
    names = [n for n, _ in layers]
    notes = []
    first = _timm_cfg_names(model, "first_conv") if recipe.keep_fp.first_conv else []
    head = _timm_cfg_names(model, "classifier") if recipe.keep_fp.classifier else []
    all_names = {n for n, _ in model.named_modules()}
    for key, found in (("first_conv", first), ("classifier", head)):
        for n in found:
            if n not in all_names:
                notes.append(f"pretrained_cfg {key} {n!r} is not a module of this model")
    overrides = _Rules(recipe.overrides)
    keep_names = _Rules(recipe.keep_fp.names)
    counts = defaultdict(int)
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] += 1

    plans = []
    for name, module in layers:
        kind = _layer_kind(module)
        row = LayerReport(name, type(module).__name__, kind, KEPT_FP)
        plan = _Plan(name, module, row)
        plans.append(plan)
        key = overrides.match(name)
        override = recipe.overrides[key] if key is not None else None
        plan.override = override
        handler = LAYER_HANDLERS.get(type(module))
        plan.handler = handler
        if isinstance(module, (QuantWeightBiasInputOutputLayer, LRWeightMixin)):
            row.reason = "already a quantized Brevitas layer"
            continue
        if handler is None:
            base = next(b.__name__ for b in type(module).__mro__[1:] if b in LAYER_HANDLERS) \
                if any(b in LAYER_HANDLERS for b in type(module).__mro__[1:]) else "nn.Module"
            row.reason = (f"unsupported class {type(module).__module__}."
                          f"{type(module).__name__} (subclass of {base} with its own forward)")
            continue
        if handler.lr_class is None:
            row.reason = handler.reason
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.numel() > 1:
            if not torch.isfinite(weight).all():
                raise ValueError(f"layer {name} has non-finite weights (NaN/inf): fix the model "
                                 f"or its checkpoint before converting")
            if not weight.detach().double().std() > 0:
                row.reason = ("constant float weight (std = 0, e.g. a zero-initialized head): "
                              "no distribution to initialize from; train it first or keep it")
                continue
        if counts[id(module)] > 1:
            row.reason = "shared module (registered under several names): kept to keep the sharing"
            continue
        explicit = override is not None and override.weights is not None
        if override is not None and override.keep_fp:
            row.reason = f"override {key!r}: keep_fp"
            continue
        if not explicit:
            rule = keep_names.match(name)
            if _under(name, first):
                row.reason = "first conv (timm pretrained_cfg); keep_fp.first_conv"
                continue
            if _under(name, head):
                row.reason = "classifier (timm pretrained_cfg); keep_fp.classifier"
                continue
            if rule is not None:
                row.reason = f"keep_fp.names {rule!r}"
                continue
        spec = override.weights if explicit else getattr(recipe.weights, kind)
        if spec is None:
            row.reason = f"weights.{kind} is null"
            continue
        quantizer = spec.resolve()
        target = handler.target(quantizer)
        if target is None:
            row.reason = f"no {quantizer.family} layer for {type(module).__name__}"
            continue
        plan.quantizer, plan.target = quantizer, target
        row.status, row.target = CONVERTED, target.__name__
        row.weight_quant, row.weight_bits = str(spec), quantizer.precision
        row.reason = f"override {key!r}" if explicit else ""
    # every keep_fp name is checked even for layers decided earlier
    for plan in plans:
        keep_names.match(plan.name)
    for pattern, winner in overrides.unused():
        if winner is not None:
            raise RecipeError(f"overrides.{pattern}", (
                f"{pattern!r} never applies: every layer it matches is taken by {winner!r} "
                f"(an exact name beats every regex; the first matching regex wins)"))
        raise _unmatched_error(f"overrides.{pattern}", pattern, names, "overrides")
    for pattern, winner in keep_names.unused():
        if winner is None:
            raise _unmatched_error("keep_fp.names", pattern, names, "keep_fp.names")
    return plans, notes


# -- trace: who reads the network input, who consumes each activation -------------------

_METADATA_FUNCS = {
    "__get__", "size", "dim", "numel", "__len__", "is_contiguous", "is_floating_point",
    "element_size", "stride", "ndimension", "nelement", "data_ptr", "is_complex",
    "storage_offset", "__format__", "__repr__", "get_device", "__hash__", "__eq__"}


class _ConsumerMode(TorchFunctionMode):
    """Records every torch function (outside the watched layers) that reads a watched
    tensor: such a reader is not a sign input, so the activation must stay."""

    def __init__(self):
        super().__init__()
        self.watched: Dict[int, Tuple[str, str]] = {}    # id(tensor) -> (kind, name)
        self.depth = 0
        self.other: Dict[Tuple[str, str], set] = defaultdict(set)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and self.watched:
            fname = getattr(func, "__name__", repr(func))
            if fname not in _METADATA_FUNCS:
                for t in tree_flatten((args, kwargs))[0]:
                    if isinstance(t, Tensor) and id(t) in self.watched:
                        self.other[self.watched[id(t)]].add(fname)
        return func(*args, **kwargs)


@dataclass
class _Trace:
    reads_input: set
    act_consumers: Dict[str, set]       # activation module name -> layer names reading it
    act_other: Dict[str, set]           # activation module name -> other readers
    act_calls: Dict[str, int]
    norm_after: Dict[str, set]          # layer name -> BatchNorm names reading its output
    layer_out_other: Dict[str, set]     # layer name -> other readers of its output


_NORMS = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def _trace(model: nn.Module, example_input: Tensor, layer_names: Dict[int, str]) -> _Trace:
    """One eval forward recording who reads what: the network input, the outputs of
    monotone activation modules and the outputs of the layers (for bias folding)."""
    names = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    mode = _ConsumerMode()
    keep_alive = []
    reads_input, consumers, calls = set(), defaultdict(set), defaultdict(int)
    norm_after = defaultdict(set)
    handles = []

    def watch(t, key):
        if isinstance(t, Tensor):
            keep_alive.append(t)
            mode.watched[id(t)] = key

    def reader_pre(module, args):
        name = names[id(module)]
        x = args[0] if args else None
        key = mode.watched.get(id(x)) if isinstance(x, Tensor) else None
        if id(module) in layer_names:
            if x is example_input:
                reads_input.add(layer_names[id(module)])
            if key is not None and key[0] == "act":
                consumers[key[1]].add(layer_names[id(module)])
            elif key is not None:
                mode.other[key].add(name)
        elif key is not None and key[0] == "layer":
            norm_after[key[1]].add(name)
        elif key is not None:
            mode.other[key].add(name)
        mode.depth += 1

    def reader_post(module, args, out):
        mode.depth -= 1
        if id(module) in layer_names:
            watch(out, ("layer", layer_names[id(module)]))

    def act_post(module, args, out):
        name = names[id(module)]
        calls[name] += 1
        watch(out, ("act", name))

    for module in model.modules():
        if id(module) in layer_names or isinstance(module, _NORMS):
            handles.append(module.register_forward_pre_hook(reader_pre))
            handles.append(module.register_forward_hook(reader_post))
        elif isinstance(module, DROPPABLE_ACTIVATIONS):
            handles.append(module.register_forward_hook(act_post))
    training = model.training
    model.eval()
    try:
        with mode:
            out = model(example_input)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and id(t) in mode.watched:
                mode.other[mode.watched[id(t)]].add("model output")
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    act_other = {k[1]: v for k, v in mode.other.items() if k[0] == "act"}
    layer_other = {k[1]: v for k, v in mode.other.items() if k[0] == "layer"}
    return _Trace(reads_input, dict(consumers), act_other, dict(calls), dict(norm_after),
                  layer_other)


def _default_example_input(model: nn.Module, recipe: Recipe) -> Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = recipe.model.in_chans or (cfg.get("input_size") or (3,))[0]
    size = recipe.data.image_size
    patch = getattr(model, "patch_embed", None)
    img_size = getattr(patch, "img_size", None)
    if img_size is not None and getattr(patch, "strict_img_size", True):
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    else:
        h = w = size
    return torch.randn(2, chans, h, w)


# -- convert --------------------------------------------------------------------------


def convert(model: nn.Module, recipe: Union[Recipe, dict, str], example_input=None) -> nn.Module:
    """Convert `model` in place by `recipe` (a Recipe, a dict, a YAML path or a packaged
    recipe name); returns the model. See :func:`convert_with_report`."""
    return convert_with_report(model, recipe, example_input)[0]


def convert_with_report(model: nn.Module, recipe: Union[Recipe, dict, str],
                        example_input: Optional[Tensor] = None
                        ) -> Tuple[nn.Module, ConversionReport]:
    """Convert `model` in place; returns (model, ConversionReport).

    `example_input` (a batch the model accepts) is only needed when the recipe quantizes
    activations (it locates the layers that read the network input and the activation
    modules feeding sign inputs); by default a random batch of the model's input size
    (timm ViT img_size, else ``data.image_size``) is used.
    """
    recipe = load_recipe(recipe)
    plans, notes = _plan(model, recipe)
    report = ConversionReport([p.row for p in plans], notes=notes)
    converted = [p for p in plans if p.target is not None]
    acts = recipe.activations
    wants_acts = (acts.quantizer is not None or acts.input_quantizer is not None or any(
        p.override is not None and p.override.activation is not None for p in converted))

    # 1. activation quantizer of every converted layer
    fold = recipe.weights.bias_before_norm == "fold"
    trace = None
    if wants_acts or fold:
        if example_input is None:
            example_input = _default_example_input(model, recipe)
        layer_ids = {id(p.module): p.name for p in plans}
        trace = _trace(model, example_input, layer_ids)
    if fold:
        _fold_biases(model, converted, trace, report)
    if wants_acts:
        for p in converted:
            ov = p.override
            if ov is not None and ov.float_input:
                continue
            if ov is not None and ov.activation is not None:
                spec = ov.activation
            elif p.name in trace.reads_input:
                spec = acts.input_quantizer
            else:
                spec = acts.quantizer
            if spec is not None:
                p.act = spec.resolve()
                p.row.input_quant, p.row.input_bits = str(spec), p.act.precision

    sign_layers = {p.name for p in converted if p.act is not None and p.act.is_sign}
    moments = acts.moments and bool(sign_layers)

    # 2. swap, one layerwise_quantize call per (source class, target class)
    groups: Dict[Tuple[type, type], List[_Plan]] = defaultdict(list)
    for p in converted:
        groups[(type(p.module), p.target)].append(p)
    for (source, target), members in groups.items():
        by_name = {p.name: p for p in members}
        kwargs = _constructor_kwargs(target, by_name, recipe, moments)
        others = [p.name for p in plans if p.name not in by_name]
        layerwise_quantize(model, compute_layer_map={source: (target, kwargs)},
                           name_blacklist=others)
    for p in converted:
        new = model.get_submodule(p.name)
        if type(new) is not p.target:
            raise RuntimeError(f"layerwise_quantize did not convert {p.name} "
                               f"({type(new).__name__}, expected {p.target.__name__})")
        p.module = new
        if p.act is not None:
            _set_input_quant(new, p.act.injector)
        if p.act is not None and p.act.is_sign and p.act.threshold is not None:
            is_linear = isinstance(new, nn.Linear)
            channels = new.in_features if is_linear else new.in_channels
            attach_threshold(new.input_quant, channels, -1 if is_linear else 1,
                             acts.threshold_init, threshold_class=p.act.threshold)
        if isinstance(new, LRWeightMixin) and not recipe.init.from_pretrained:
            _init_from_scratch(new, recipe, p.name)

    # 3. drop monotone activations that feed only sign inputs
    if trace is not None and acts.drop_relu and sign_layers:
        _drop_activations(model, trace, sign_layers, report)
    if moments:
        report.notes.append(
            "LR layers emit Gaussian moments (lr_output_moments); a sign reached through "
            "moment-preserving ops (BatchNorm, residual add, avg pool) uses moment mode")
    if sign_layers:
        report.notes.append(
            "thresholds initialize from the first training batch (per-channel median; "
            "ternary: the 1/3 and 2/3 quantiles); "
            "call calibrate_thresholds(model, batch) to set them explicitly")
    return model, report


def _constructor_kwargs(target: type, by_name: Dict[str, _Plan], recipe: Recipe,
                        moments: bool) -> Dict[str, Any]:
    """Per-module kwargs for Brevitas' rewriter: lambdas (module, name) -> value."""
    def per_layer(fn):
        return lambda module, name: fn(by_name[name])

    kwargs = {
        "weight_quant": per_layer(lambda p: p.quantizer.injector),
        "bias_quant": None,
        "return_quant_tensor": False,
    }
    handler_kwargs = {k for p in by_name.values() for k, _ in p.handler.kwargs}
    for key in handler_kwargs:
        kwargs[key] = per_layer(lambda p, key=key: dict(p.handler.kwargs)[key])
    if issubclass(target, LRWeightMixin):
        kwargs.update(lr_p_min=recipe.init.p_min, lr_p_max=recipe.init.p_max,
                      lr_eps=recipe.init.eps, lr_output_moments=moments)
    return kwargs


@torch.no_grad()
def _fold_biases(model: nn.Module, converted: List[_Plan], trace: _Trace,
                 report: ConversionReport) -> None:
    """Remove the bias of a converted layer whose output only a BatchNorm reads:
    BN(Wx + b) with running mean rm == BN(Wx) with running mean rm - b (in training the
    batch mean absorbs b), so the computation is unchanged (FINN: no bias before BN)."""
    for p in converted:
        bias = getattr(p.module, "bias", None)
        if bias is None:
            continue
        norms = trace.norm_after.get(p.name, set())
        if len(norms) != 1 or trace.layer_out_other.get(p.name):
            report.notes.append(f"{p.name}: bias kept (its output is not read by exactly one "
                                f"BatchNorm)")
            continue
        norm = model.get_submodule(next(iter(norms)))
        if norm.running_mean is None or norm.num_features != bias.numel():
            report.notes.append(f"{p.name}: bias kept ({next(iter(norms))} has no running "
                                f"statistics of matching size)")
            continue
        norm.running_mean.sub_(bias.detach().to(norm.running_mean))
        p.module.register_parameter("bias", None)
        p.row.reason = "; ".join(filter(None, [p.row.reason,
                                               f"bias folded into {next(iter(norms))}"]))


def _set_input_quant(layer: nn.Module, injector) -> None:
    """Give a converted layer its input quantizer, as its constructor would (Brevitas'
    QuantInputMixin). Done after the swap: the float state dict loaded by the rewriter has
    no entries for the quantizer's buffers (a strict load would fail on them)."""
    QuantInputMixin.__init__(layer, input_quant=injector)
    layer.input_quant.to(layer.weight.device)


@torch.no_grad()
def _init_from_scratch(layer: LRWeightMixin, recipe: Recipe, name: str) -> None:
    generator = torch.Generator().manual_seed(recipe.init.seed + _stable_hash(name))
    logits = layer.lr_distribution.init_logits_from_scratch(
        layer.weight.shape, generator, recipe.init.p_min, recipe.init.p_max)
    layer.weight_logits.copy_(logits.to(layer.weight_logits))
    layer.materialize_weight()


def _stable_hash(text: str) -> int:
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 1_000_003
    return h


def _drop_activations(model: nn.Module, trace: _Trace, sign_layers: set,
                      report: ConversionReport) -> None:
    by_id = defaultdict(list)
    modules = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, DROPPABLE_ACTIVATIONS):
            by_id[id(m)].append(n)
            modules[id(m)] = m
    for ident, registered in by_id.items():
        name = next((n for n in registered if n in trace.act_calls), None)
        if name is None:
            continue
        readers = trace.act_consumers.get(name, set())
        other = trace.act_other.get(name, set())
        if other or not readers or not readers <= sign_layers:
            continue
        for n in registered:
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.Identity())
        kind = type(modules[ident]).__name__
        report.dropped_activations.append(
            (name, f"{kind} feeds only the sign inputs of {sorted(readers)}"))


# -- thresholds -----------------------------------------------------------------------


def _plain(x):
    mean, _ = split_moments(as_tensor(x))
    return mean.as_subclass(Tensor) if type(mean) is not Tensor else mean


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batch: Tensor, train_mode: bool = True) -> int:
    """Initialize every sign threshold (ThresholdShift) of `model` from `batch`.

    Thresholds are set in network order in one forward pass (each from the inputs it sees
    given the thresholds before it), by their init method ("median" by default: P(+1) = 1/2
    per channel), and a channel where that gives a constant sign (e.g. a median of 0 after
    a ReLU) gets the most balanced non-constant split instead. `train_mode=True` runs the
    pass in training mode (BatchNorm batch statistics, as the first training step sees;
    BatchNorm running statistics and the RNG state are restored afterwards). Returns the
    number of thresholds set.
    """
    shifts = [m for m in model.modules() if isinstance(m, ThresholdShift)]
    if not shifts:
        return 0
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    handles = []

    def pre(module, args):
        x = args[0]
        if not isinstance(x, Tensor) or x.dim() == 0:
            return
        x = _plain(x)
        module.init_from_data(x)
        if module.init_method != "zero":
            module.balance_degenerate(x)

    for s in shifts:
        handles.append(s.register_forward_pre_hook(pre))
    training = model.training
    try:
        model.train(train_mode)
        with torch.random.fork_rng(devices=[]):
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
        for m, state in zip(norms, saved):
            for k, v in state.items():
                getattr(m, k).copy_(v)
    return len(shifts)
