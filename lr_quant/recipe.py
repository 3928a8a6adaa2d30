"""Recipes: how to turn a (timm) backbone into an LR network, as a versioned dataclass.

A recipe is YAML (or a dict) validated *strictly* into :class:`Recipe`: an unknown key, a
value of the wrong type or an unknown quantizer name raises :class:`RecipeError` naming
the key path (``weights.distribution``), the bad value and the valid choices. One
generic validator (:func:`lr_quant.schema.from_dict`) reads the dataclass type hints and
recurses through Optional / Union / List / Tuple / Dict / Literal / nested dataclasses; it
also validates the ``train:`` and ``data:`` sections (:class:`lr_quant.train_config.TrainConfig`,
:class:`~lr_quant.train_config.DataConfig`), whose ``__post_init__`` checks run too.

    recipe = load_recipe("resnet_w1")                 # packaged recipes/<name>.yaml
    recipe = Recipe.from_yaml("my.yaml")              # or a path
    recipe.to_yaml("args.yaml")                       # round trip: from_dict(to_dict()) == recipe

See docs/recipes.md for the schema, the quantizer names and override precedence.
"""

from __future__ import annotations

import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

import yaml

from .distributions import DEFAULT_P_MAX, DEFAULT_P_MIN, check_probability_bounds
from .functional import DEFAULT_EPS
from .quant.threshold import THRESHOLD_INITS
from .registry import (available_act_quantizers, available_weight_quantizers,
                       get_act_quantizer, get_weight_quantizer)
from .schema import RecipeError, did_you_mean, from_dict, join_path, to_dict
from .train_config import DataConfig, TrainConfig

__all__ = [
    "RECIPE_VERSION",
    "RecipeError",
    "WeightQuantSpec",
    "ActQuantSpec",
    "ModelConfig",
    "WeightsConfig",
    "ActivationsConfig",
    "KeepFPConfig",
    "LayerOverride",
    "InitConfig",
    "Recipe",
    "from_dict",
    "to_dict",
    "load_recipe",
    "recipe_dirs",
    "available_recipes",
]

RECIPE_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
#: keys renamed in recipe version 2 ("lr" now means LR-nets only; learning rates end in _lr)
RENAMED_IN_VERSION_2 = {"train.lr_logits": "train.logits_lr",
                        "train.lr_params": "train.params_lr"}
REGEX_PREFIX = "re:"


# -- quantizer specs: a registered name, or {name: ..., **options} -----------------------


@dataclass(frozen=True)
class _QuantSpec:
    """A registered quantizer name with options; YAML: ``name`` or ``{name: ..., opt: ...}``."""
    name: str
    options: Tuple[Tuple[str, Any], ...] = ()

    kind: typing.ClassVar[str] = ""

    @classmethod
    def _resolver(cls):
        raise NotImplementedError

    @classmethod
    def _choices(cls):
        raise NotImplementedError

    @classmethod
    def _from_recipe(cls, value, path: str) -> "_QuantSpec":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            name, options = value, {}
        elif isinstance(value, Mapping):
            options = dict(value)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise RecipeError(path, f"a {cls.kind} quantizer mapping needs a string 'name' "
                                        f"(one of {list(cls._choices())}), got {value!r}")
        else:
            raise RecipeError(path, f"expected a {cls.kind} quantizer name (one of "
                                    f"{list(cls._choices())}) or a mapping {{name: ..., "
                                    f"options}}, got {type(value).__name__} {value!r}")
        if name not in cls._choices():
            raise RecipeError(path, f"unknown {cls.kind} quantizer {name!r}; valid choices: "
                                    f"{list(cls._choices())}{did_you_mean(name, cls._choices())}")
        spec = cls(name, tuple(sorted((k, _freeze(v)) for k, v in options.items())))
        try:
            spec.resolve()
        except (TypeError, ValueError) as e:
            raise RecipeError(path, str(e)) from None
        return spec

    def _to_recipe(self):
        if not self.options:
            return self.name
        return {"name": self.name, **{k: _thaw(v) for k, v in self.options}}

    def as_spec(self):
        return self._to_recipe()

    def resolve(self):
        return self._resolver()(self._to_recipe())

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_thaw(v)}' for k, v in self.options)})"


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


class WeightQuantSpec(_QuantSpec):
    """A weight quantizer of lr_quant.registry (``lr_binary``, ``lr_ternary_per_channel`` ...)."""
    kind = "weight"

    @classmethod
    def _resolver(cls):
        return get_weight_quantizer

    @classmethod
    def _choices(cls):
        return available_weight_quantizers()


class ActQuantSpec(_QuantSpec):
    """An activation quantizer of lr_quant.registry (``stochastic_sign``,
    ``stochastic_ternary``, ``ste_sign``, ``ste_ternary``, ``int8``)."""
    kind = "activation"

    @classmethod
    def _resolver(cls):
        return get_act_quantizer

    @classmethod
    def _choices(cls):
        return available_act_quantizers()


def check_pattern(pattern: str, path: str) -> None:
    """A layer pattern is an exact module name or ``re:<regex>`` (full match)."""
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(path, f"a layer pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as e:
            raise RecipeError(path, f"bad regular expression {pattern!r}: {e}") from None


# -- sections -------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The backbone a recipe is meant for (used by the CLI; `convert` takes any model)."""
    name: Optional[str] = None                   # timm model name, e.g. "resnet10t"
    pretrained: bool = False                     # timm / hub weights (needs a network)
    checkpoint: Optional[str] = None             # local float weights (timm checkpoint_path)
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)   # more timm.create_model kwargs


@dataclass
class WeightsConfig:
    """Weight quantizer per layer kind; null keeps that kind in full precision.

    conv: dense and grouped (1 < groups < in_channels) convolutions, 1x1 shortcuts too;
    depthwise: groups == in_channels > 1; linear: nn.Linear and timm.layers.Linear.
    """
    conv: Optional[WeightQuantSpec] = WeightQuantSpec("lr_binary_per_channel")
    depthwise: Optional[WeightQuantSpec] = WeightQuantSpec("lr_binary_per_channel")
    linear: Optional[WeightQuantSpec] = WeightQuantSpec("lr_binary_per_channel")
    # "fold": a converted layer whose output only a BatchNorm reads loses its bias, folded
    # into the BN running mean (exact; FINN wants no bias before BN). "keep": unchanged.
    bias_before_norm: Literal["keep", "fold"] = "keep"


@dataclass
class ActivationsConfig:
    """Activation quantizers, placed as ``input_quant`` of the converted layers.

    quantizer: on the input of every converted layer (W1A1: ``stochastic_sign``; ternary
    activations: ``stochastic_ternary``), except the layers that read the network input,
    which get ``input_quantizer`` (e.g. ``int8``) or stay float. A monotone activation
    module (ReLU, ReLU6, ...) whose output feeds only sign / ternary inputs is dropped
    (sign(ReLU(a) - t) = sign(a - t) for t > 0) when ``drop_relu``. ``threshold_init``:
    "median" (binary: the median; ternary: the 1/3 and 2/3 quantiles), "mean" or "zero".
    ``moments``: converted LR layers hand their Gaussian moments downstream
    (``lr_output_moments``) so a sign reached through BatchNorm uses moment mode.
    ``sign_before_pool``: where an activation module feeds only a max-pool whose readers
    are all sign inputs (conv -> BN -> ReLU -> MaxPool -> conv), the sign replaces the
    activation in front of the pool instead (max(sign(x - t)) = sign(max(x) - t)): FINN
    maps a max-pool over bipolar values into hardware, not one over float values.
    """
    quantizer: Optional[ActQuantSpec] = None
    input_quantizer: Optional[ActQuantSpec] = None
    threshold_init: str = "median"
    drop_relu: bool = True
    moments: bool = True
    sign_before_pool: bool = False

    def __post_init__(self):
        if self.threshold_init not in THRESHOLD_INITS:
            raise ValueError(f"threshold_init={self.threshold_init!r} is not one of "
                             f"{THRESHOLD_INITS}")


@dataclass
class KeepFPConfig:
    """Layers kept in full precision."""
    first_conv: bool = True        # timm pretrained_cfg["first_conv"]
    classifier: bool = True        # timm pretrained_cfg["classifier"]
    names: List[str] = field(default_factory=list)   # exact module names or "re:<regex>"

    def __post_init__(self):
        for i, name in enumerate(self.names):
            check_pattern(name, f"names[{i}]")


@dataclass
class LayerOverride:
    """Per-layer settings, keyed by an exact module name or ``re:<regex>`` (full match).

    Precedence: an exact name beats every regex; among regexes the first one in the file
    wins. Unset fields fall back to the recipe's defaults.
    """
    keep_fp: bool = False
    weights: Optional[WeightQuantSpec] = None    # None: the recipe's quantizer for the kind
    activation: Optional[ActQuantSpec] = None    # None: the recipe's activation quantizer
    float_input: bool = False                    # no activation quantizer on this input


@dataclass
class InitConfig:
    """Initialization of the weight distributions (Shayer et al. 2018)."""
    from_pretrained: bool = True   # logits from the float weights; False: from scratch
    p_min: float = DEFAULT_P_MIN
    p_max: float = DEFAULT_P_MAX
    eps: float = DEFAULT_EPS       # sqrt(v + eps) of the LR sample
    seed: int = 0                  # scratch initialization draw
    # Noise-calibrated sharpening (lr_quant.sharpness): after conversion, temper each LR
    # layer's distributions until its median channel SNR Var(m) / E[v] on a training
    # batch reaches this value (None: Shayer's init as is).
    target_snr: Optional[float] = None

    def __post_init__(self):
        check_probability_bounds(self.p_min, self.p_max)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.target_snr is not None and not self.target_snr > 0:
            raise ValueError(f"target_snr must be > 0 (or null), got {self.target_snr}")


@dataclass
class Recipe:
    """A versioned conversion + training recipe (see docs/recipes.md).

    Regularizer weights (beta_regularizer, logit_decay, logit_clamp) live in ``train:``.
    """
    version: int = RECIPE_VERSION
    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    keep_fp: KeepFPConfig = field(default_factory=KeepFPConfig)
    overrides: Dict[str, LayerOverride] = field(default_factory=dict)
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # FINN form (lr_quant.convert.finn_form): quantizers on the tensors they quantize (the
    # activation modules and the operands of residual adds), so that FINN maps the export
    # into one dataflow partition; a model where that is impossible is refused by name
    finn: bool = False

    def __post_init__(self):
        if self.version not in SUPPORTED_VERSIONS:
            raise RecipeError("version", f"recipe version {self.version} is not supported "
                                         f"(this lr_quant reads {list(SUPPORTED_VERSIONS)})")
        for key in self.overrides:
            check_pattern(key, join_path("overrides", key))

    # -- I/O ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        return from_dict(cls, upgrade_recipe_dict(data))

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_yaml(cls, path) -> "Recipe":
        path = Path(path)
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise RecipeError("", f"{path} is not valid YAML: {e}") from None
        if data is None:
            data = {}
        try:
            return cls.from_dict(data)
        except RecipeError as e:
            raise RecipeError(e.path, f"{str(e).split(': ', 1)[1]} (in {path})") from None

    def to_yaml(self, path=None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def upgrade_recipe_dict(data):
    """A recipe mapping in the current version's layout.

    Version 1 recipes (and checkpoints that recorded one) load with their renamed keys
    moved (RENAMED_IN_VERSION_2) and a DeprecationWarning; in a version-2 recipe an old
    key is an error that names the new one."""
    if not isinstance(data, Mapping):
        return data
    version = data.get("version", RECIPE_VERSION)
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old, new in RENAMED_IN_VERSION_2.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        values = data.get(section)
        if not isinstance(values, dict) or old_key not in values:
            continue
        if version != 1:
            raise RecipeError(old, f"renamed to {new} in recipe version 2")
        if new_key in values:
            raise RecipeError(old, f"{old} (version 1) and {new} are both set")
        warnings.warn(f"recipe version 1 key {old} is now {new}; update the recipe (and "
                      f"set version: {RECIPE_VERSION})", DeprecationWarning, stacklevel=3)
        values[new_key] = values.pop(old_key)
    if version == 1:
        data["version"] = RECIPE_VERSION
    return data


# -- packaged recipes -------------------------------------------------------------------


def recipe_dirs() -> List[Path]:
    """Where bare recipe names are looked up: the repository's top-level ``recipes/``
    (next to the package: editable installs and source checkouts), then ``lr_quant/recipes``
    (if a wheel ships them as package data)."""
    package = Path(__file__).resolve().parent
    dirs = [package.parent / "recipes", package / "recipes"]
    return [d for d in dirs if d.is_dir()]


def available_recipes() -> List[str]:
    names = set()
    for d in recipe_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_recipe(path_or_name) -> Recipe:
    """A Recipe from a YAML path, or a packaged recipe by bare name (``"quickstart"``)."""
    if isinstance(path_or_name, Recipe):
        return path_or_name
    if isinstance(path_or_name, Mapping):
        return Recipe.from_dict(path_or_name)
    text = str(path_or_name)
    path = Path(text)
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if path.is_file():
        return Recipe.from_yaml(path)
    if looks_like_path:
        raise FileNotFoundError(f"recipe file {text!r} does not exist")
    for d in recipe_dirs():
        candidate = d / f"{text}.yaml"
        if candidate.is_file():
            return Recipe.from_yaml(candidate)
    names = available_recipes()
    raise FileNotFoundError(
        f"no recipe named {text!r}; packaged recipes: {names}{did_you_mean(text, names)} "
        f"(searched {[str(d) for d in recipe_dirs()]})")
