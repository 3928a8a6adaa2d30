"""The plan: one decision per Conv/Linear of the model, before anything changes.

A layer converts only if its exact class has a handler (:mod:`.handlers`) with a target
class; a subclass with its own forward, a weight-standardized conv, a shared or constant
layer stays in full precision with the reason in its report row. Then the recipe's rules:
per-layer ``overrides`` (an exact name beats every ``re:`` regex; among regexes the first in
the file wins; an override's explicit ``weights`` beats the keep-FP lists), ``keep_fp``
(timm ``pretrained_cfg`` first_conv / classifier, explicit names), and the weight quantizer
for the layer kind (conv, depthwise, linear). An override key or keep-FP name that matches
no Conv/Linear raises a ``RecipeError`` (a typo must not silently do nothing).
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from torch import Tensor, nn

from ..nn.lr_layers import LRWeightMixin
from ..recipe import REGEX_PREFIX, LayerOverride, Recipe, RecipeError
from ..registry import ActQuantizer, WeightQuantizer
from .handlers import LAYER_HANDLERS, LayerHandler, _layer_kind, conv_linear_modules
from .report import CONVERTED, KEPT_FP, LayerReport


@dataclass
class _Plan:
    """One layer's decision: its report row, weight quantizer and target class (None: kept
    in full precision); `act` (input quantizer) is filled in by the conversion."""
    name: str
    module: nn.Module
    row: LayerReport
    quantizer: Optional[WeightQuantizer] = None
    target: Optional[type] = None
    handler: Optional[LayerHandler] = None
    override: Optional[LayerOverride] = None
    act: Optional[ActQuantizer] = None
    aliases: Tuple[str, ...] = ()       # every name the module is registered under

    def keep(self, reason: str) -> None:
        """Undo a decision to convert: the layer stays in full precision for `reason`."""
        self.quantizer = self.target = None
        row = self.row      # updated in place: the report holds this object
        vars(row).update(vars(LayerReport(row.name, row.source, row.kind, KEPT_FP, reason=reason)))


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
    """A plan per Conv/Linear of `model` (in module order), and notes for the report."""
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
    aliases = defaultdict(list)
    for n, m in model.named_modules(remove_duplicate=False):
        aliases[id(m)].append(n)

    plans = []
    for name, module in layers:
        kind = _layer_kind(module)
        row = LayerReport(name, type(module).__name__, kind, KEPT_FP)
        plan = _Plan(name, module, row, aliases=tuple(aliases[id(module)]))
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
        if len(plan.aliases) > 1:
            # one object under several names (e.g. a block-shared positional conv): an LR
            # layer per name would break the sharing, one swap would need every name
            row.reason = (f"shared module, registered as {', '.join(map(repr, plan.aliases))}:"
                          f" kept to keep the sharing")
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
