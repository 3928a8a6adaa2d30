"""The conversion pass: plan, trace, swap, activations.

1. **Plan** (:mod:`.plan`): which Conv/Linear becomes which class with which weight
   quantizer, and why every other one stays in full precision.
2. **Trace** (:mod:`.trace`): one eval forward on an example input, for every recipe. A
   layer whose weight the model reads outside the layer's forward (``F.linear(x,
   self.qkv.weight, ...)`` in BEiT) stays in full precision: its logits would never be
   read. The trace also feeds the activation rules and bias folding.
3. **Swap** with Brevitas' ``layerwise_quantize`` (exact class names; kwargs as per-module
   lambdas ``lambda module, name: ...``), one call per (source class, target class).
   Float weights load as the LR initialization (Shayer et al.); ``init.from_pretrained:
   false`` re-draws the logits from scratch. With ``weights.bias_before_norm: fold`` the
   bias of a layer read only by a BatchNorm moves into that BatchNorm's running mean.
4. **Activations.** Sign (and ternary) quantizers become the ``input_quant`` of converted
   layers with learned per-channel thresholds (:func:`lr_quant.quant.threshold.attach_threshold`:
   ``ThresholdShift`` / ``TernaryThreshold``). A monotone activation module whose every
   output feeds *only* such inputs is replaced by ``nn.Identity``: sign(ReLU(a) - t) =
   sign(a - t) for t > 0 (and for t <= 0 the sign of a ReLU output is constant, so nothing
   is lost); a ternary quantizer is a pair of such thresholds (exact where both are > 0,
   learned otherwise). With ``activations.moments`` the LR layers emit their Gaussian
   moments (``lr_output_moments``): on LR -> BN -> (ReLU dropped) -> sign, as inside timm
   ResNet blocks, the sign runs in moment mode, P(+1) = Phi((m' - t) / sqrt(v')).
   Elsewhere (a ReLU also feeding a residual add, a pooling in between, SiLU/GELU) the sign
   gets a plain tensor and runs in noise mode.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from brevitas.graph.quantize import layerwise_quantize
from brevitas.nn.mixin.act import QuantInputMixin
from torch import Tensor, nn

from ..nn.lr_layers import LRWeightMixin
from ..quant.threshold import attach_threshold
from ..recipe import Recipe, load_recipe
from .finn_form import FinnFormError, plan_finn_form
from .handlers import DROPPABLE_ACTIVATIONS, replace_module
from .plan import _Plan, _plan
from .report import ConversionReport
from .trace import _Trace, _trace, default_example_input

__all__ = ["convert", "convert_with_report"]


def convert(model: nn.Module, recipe: Union[Recipe, dict, str], example_input=None) -> nn.Module:
    """Convert `model` in place by `recipe` (a Recipe, a dict, a YAML path or a packaged
    recipe name); returns the model. See :func:`convert_with_report`."""
    return convert_with_report(model, recipe, example_input)[0]


def convert_with_report(model: nn.Module, recipe: Union[Recipe, dict, str],
                        example_input: Optional[Tensor] = None
                        ) -> Tuple[nn.Module, ConversionReport]:
    """Convert `model` in place; returns (model, ConversionReport).

    `example_input` (a batch the model accepts; default
    :func:`.trace.default_example_input`) runs one eval forward that finds the layers whose
    weight is read outside their forward and, when the recipe quantizes activations or
    folds biases, the layers that read the network input, the activation modules feeding
    sign inputs and the readers of each layer's output.
    """
    recipe = load_recipe(recipe)
    plans, notes = _plan(model, recipe)
    report = ConversionReport([p.row for p in plans], notes=notes)
    acts = recipe.activations
    wants_acts = (acts.quantizer is not None or acts.input_quantizer is not None or any(
        p.override is not None and p.override.activation is not None
        for p in plans if p.target is not None))
    fold = recipe.weights.bias_before_norm == "fold"
    if recipe.finn and example_input is None:
        example_input = _default_input(model, recipe)

    # 1. trace; a layer whose weight is read outside its forward stays float
    trace = _trace_model(model, recipe, plans, example_input, wants_acts or fold, report)
    for p in plans:
        uses = trace.direct_reads.get(p.name) if trace is not None else None
        if p.target is not None and uses:
            p.keep(f"weight read outside its forward ({', '.join(sorted(uses))}): the LR "
                   f"logits would never be used")
    converted = [p for p in plans if p.target is not None]
    if not (wants_acts or fold):
        trace = None    # the activation rules below use the trace only when asked to

    # 2. activation quantizer of every converted layer
    if fold:
        _fold_biases(model, converted, trace, report)
    form = _plan_finn_form(model, recipe, plans, converted, example_input) if recipe.finn \
        else None
    if form is not None:
        for p in converted:
            spec = acts.input_quantizer if p.name in form.input_readers else None
            if spec is not None:
                p.act = spec.resolve()
                p.row.input_quant, p.row.input_bits = str(spec), p.act.precision
            else:   # reads a quantized tensor (the quantizer sits at its producer)
                p.row.input_quant, p.row.input_bits = str(acts.quantizer), form.act.precision
    elif wants_acts:
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
    moments = acts.moments and (bool(sign_layers) or form is not None)
    moves = _signs_before_pools(converted, trace) \
        if acts.sign_before_pool and trace and form is None else {}
    moved = {p.name for _, readers in moves.values() for p in readers}

    # 3. swap, one layerwise_quantize call per (source class, target class)
    groups: Dict[Tuple[type, type], List[_Plan]] = defaultdict(list)
    for p in converted:
        groups[(type(p.module), p.target)].append(p)
    for (source, target), members in groups.items():
        by_name = {p.name: p for p in members}
        kwargs = _constructor_kwargs(target, by_name, recipe, moments)
        # every name of a module that stays (a shared module is reached under each)
        others = [a for p in plans if p.name not in by_name for a in p.aliases]
        layerwise_quantize(model, compute_layer_map={source: (target, kwargs)},
                           name_blacklist=others)
    for p in converted:
        new = model.get_submodule(p.name)
        if type(new) is not p.target:
            raise RuntimeError(f"layerwise_quantize did not convert {p.name} "
                               f"({type(new).__name__}, expected {p.target.__name__})")
        p.module = new
        # a layer read through a moved sign gets +-1 inputs: no input quantizer of its own
        act = None if p.name in moved else p.act
        if act is not None:
            _set_input_quant(new, act.injector)
        if act is not None and act.is_sign and act.threshold is not None:
            is_linear = isinstance(new, nn.Linear)
            channels = new.in_features if is_linear else new.in_channels
            attach_threshold(new.input_quant, channels, -1 if is_linear else 1,
                             acts.threshold_init, threshold_class=p.act.threshold)
        if isinstance(new, LRWeightMixin) and not recipe.init.from_pretrained:
            _init_from_scratch(new, recipe, p.name)

    # 4. FINN form: quantizers at their producers; otherwise signs in front of max-pools,
    # then drop monotone activations feeding only signs
    if form is not None:
        form.apply(report)
    for act_name, (pool, readers) in moves.items():
        _sign_before_pool(model, act_name, pool, readers, acts.threshold_init, report)
    if trace is not None and acts.drop_relu and sign_layers:
        _drop_activations(model, trace, sign_layers, report)
    if moments:
        report.notes.append(
            "LR layers emit Gaussian moments (lr_output_moments); a sign reached through "
            "moment-preserving ops (BatchNorm, residual add, avg pool) uses moment mode")
    if sign_layers or form is not None:
        report.notes.append(
            "thresholds initialize from the first training batch (per-channel median; "
            "ternary: the 1/3 and 2/3 quantiles); "
            "call calibrate_thresholds(model, batch) to set them explicitly")
    return model, report


def _default_input(model: nn.Module, recipe: Recipe) -> Tensor:
    """:func:`.trace.default_example_input` on the model's device and dtype."""
    like = next((t for t in model.parameters() if t.is_floating_point()), None)
    x = default_example_input(model, recipe)
    return x if like is None else x.to(like.device, like.dtype)


def _plan_finn_form(model: nn.Module, recipe: Recipe, plans: List[_Plan],
                    converted: List[_Plan], example_input: Tensor):
    """The FINN form's plan (``recipe.finn``), from the float model."""
    if any(p.override is not None and p.override.activation is not None for p in plans):
        raise FinnFormError("finn: true places one activation quantizer per tensor: "
                            "per-layer activation overrides are not supported")
    spec = recipe.activations.quantizer
    kept = {p.name: p.row.reason for p in plans if p.target is None}
    return plan_finn_form(model, example_input, spec.resolve() if spec else None,
                          {p.name: p.module for p in converted}, kept,
                          recipe.activations.threshold_init)


def _trace_model(model: nn.Module, recipe: Recipe, plans: List[_Plan],
                 example_input: Optional[Tensor], needed: bool,
                 report: ConversionReport) -> Optional[_Trace]:
    """The trace, on `example_input` or a default batch on the model's device and dtype.

    A default batch the model rejects is an error when the activation rules or bias
    folding `needed` the trace; when only the weight-read check does, the check is skipped
    with a warning and a report note. That check draws its batch under ``fork_rng``: a
    seeded run's random stream stays what it was before the check existed.
    """
    layer_ids = {id(p.module): p.name for p in plans}
    if example_input is not None:
        return _trace(model, example_input, layer_ids)
    if needed:
        return _trace(model, _default_input(model, recipe), layer_ids)
    with torch.random.fork_rng(devices=[]):
        x = _default_input(model, recipe)
        try:
            return _trace(model, x, layer_ids)
        except Exception as e:   # any forward error: the model does not take this batch
            msg = (f"the check for weights read outside their layer's forward was skipped: "
                   f"the default example input {tuple(x.shape)} failed in the forward "
                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass "
                   f"example_input to convert_with_report")
            warnings.warn(msg, stacklevel=3)
            report.notes.append(msg)
            return None


def _signs_before_pools(converted: List[_Plan], trace: _Trace
                        ) -> Dict[str, Tuple[str, List[_Plan]]]:
    """{activation module: (max-pool, sign layers reading the pool)} where the sign can
    replace the activation: it feeds only that pool, and only layers with one and the same
    sign quantizer read the pool (``activations.sign_before_pool``)."""
    by_name = {p.name: p for p in converted}
    moves = {}
    for act, pools in trace.pools_after_act.items():
        if len(pools) != 1 or trace.act_consumers.get(act) or \
                trace.act_other.get(act, set()) != pools:
            continue
        pool = next(iter(pools))
        readers = [by_name.get(n) for n in sorted(trace.pool_consumers.get(pool, ()))]
        if not readers or trace.pool_other.get(pool) or any(
                r is None or r.act is None or not r.act.is_sign for r in readers):
            continue
        if len({(r.act.name, r.act.injector, r.act.threshold) for r in readers}) != 1:
            continue
        if len({_in_channels(r.module) for r in readers}) != 1:
            continue
        moves[act] = (pool, readers)
    return moves


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _sign_before_pool(model: nn.Module, act_name: str, pool: str, readers: List[_Plan],
                      threshold_init: str, report: ConversionReport) -> None:
    """Replace the activation `act_name` (under all its names) by the readers' sign
    quantizer, as a ``QuantIdentity`` with the same threshold module a layer's
    ``input_quant`` gets; it hands on plain +-1 samples in training (a max-pool cannot
    take Gaussian moments)."""
    from brevitas.nn import QuantIdentity

    act = readers[0].act
    sign = QuantIdentity(act_quant=act.injector.let(sign_propagate_moments=False),
                         return_quant_tensor=False)
    if act.threshold is not None:
        attach_threshold(sign.act_quant, _in_channels(readers[0].module), 1, threshold_init,
                         threshold_class=act.threshold)
    old = model.get_submodule(act_name)
    replace_module(model, act_name, sign)
    for r in readers:
        r.row.input_quant = f"{r.row.input_quant} (before {pool}, replacing {act_name})"
    report.notes.append(f"{act_name} ({type(old).__name__}) became the {act.name} of "
                        f"{[r.name for r in readers]}, in front of {pool}")


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
    """Re-draw the weight logits from scratch (seeded by init.seed and the layer name)."""
    generator = torch.Generator().manual_seed(recipe.init.seed + _stable_hash(name))
    logits = layer.lr_distribution.init_logits_from_scratch(
        layer.weight.shape, generator, recipe.init.p_min, recipe.init.p_max)
    layer.weight_logits.copy_(logits.to(layer.weight_logits))
    layer.materialize_weight()


def _stable_hash(text: str) -> int:
    """A hash of `text` that is the same in every process (unlike ``hash``)."""
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 1_000_003
    return h


def _drop_activations(model: nn.Module, trace: _Trace, sign_layers: set,
                      report: ConversionReport) -> None:
    """Replace by ``nn.Identity`` every monotone activation module whose output only sign
    inputs read (under all the names it is registered with)."""
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
        replace_module(model, registered[0], nn.Identity())
        kind = type(modules[ident]).__name__
        report.dropped_activations.append(
            (name, f"{kind} feeds only the sign inputs of {sorted(readers)}"))
