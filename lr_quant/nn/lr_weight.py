"""LRWeightMixin: what makes a Brevitas QuantLinear / QuantConv an LR layer (its weights are
distributions); the concrete classes are in :mod:`.lr_layers`.

Parameters of an LR layer:
    weight_logits   logits of the per-weight discrete distribution (trained)
    weight          the *materialized discrete network*: mode(logits) * s, kept in sync
                    (not trained; what Brevitas quantizes, exports and what a stock
                    Brevitas layer with the same quantizer would load)
    weight_quant.…  the quantizer's learned per-channel scale, if any
s = quantizer scale / grid unit is the per-channel scale alpha (1 for const quantizers).

Forward (Shayer et al. 2018, local reparameterization):
    train(), not frozen:  z = m + sqrt(v + eps) * e,   m = op(x; E[w] s) + b,
                          v = op(x^2; Var[w] s^2)      (see lr_quant.functional)
                          a MomentTensor input (m_x, v_x) adds op(v_x; E[w]^2 s^2 + Var[w] s^2)
                          to v; with lr_output_moments=True the output is a MomentTensor
                          carrying (m, v) with data z (see lr_quant.moments)
    eval() or frozen:     the parent Brevitas layer with the deterministic weight, so
                          Brevitas' QONNX export emits BipolarQuant / Quant for it.

Only `inner_forward_impl` is overridden (Brevitas runs input_quant -> quant_weight ->
bias_quant -> inner_forward_impl -> output_quant): padding modes, same-padding, groups
and dilation all come from the parent's operator, called twice. (Strided padding='same'
pads by constants computed from the input size, so that it exports as a static Pad.)

A float state dict (no `weight_logits` key) loads as a pretrained initialization: the
logits, the scale and the materialized weight are derived from the float weight. That
makes `LRQuantConv2d.from_float(conv)` and Brevitas' `layerwise_quantize` (strict, or
`assign=True` on the meta device) work unchanged.

`device="meta"` gives a layer whose tensors are all on meta; `to_empty(device=...)` then
`reset_parameters()` initializes it as a normal construction does (same seed, same state),
and so does a state-dict load with `assign=True`.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..compile_regions import compiled
from .._tensor import as_tensor
from ..distributions import WeightDistribution
from ..functional import lr_moments, lr_sample
from ..moments import MomentTensor, has_moments, split_moments
from ..quant.activation import moments_only
from ..quant.weight import (LRBinaryWeightPerTensorConst, distribution_from_quantizer,
                            integer_grid, threshold_factor)

__all__ = ["LRWeightMixin"]

_FROZEN_KEY = "lr_frozen"


class LRWeightMixin:
    """Local-reparameterization forward on top of a Brevitas weight layer.

    Place before the Brevitas class: ``class LRQuantLinear(LRWeightMixin, QuantLinear)``.
    """

    #: run the training math as a torch.compile region (see lr_quant.compile_regions)
    lr_compile: bool = False

    def _init_lr(self, p_min: float, p_max: float, eps: float, output_moments: bool) -> None:
        if not self.weight_quant.is_quant_enabled:
            raise ValueError(
                f"{type(self).__name__} needs an LR weight quantizer (weight_quant=None "
                f"disables weight quantization); use e.g. LRBinaryWeightPerTensorConst")
        if self.bias_quant.is_quant_enabled:
            raise ValueError(
                f"{type(self).__name__} needs bias_quant=None: a quantized bias takes its scale "
                f"from the quantized weight, which LR training does not compute")
        self.lr_distribution: WeightDistribution = distribution_from_quantizer(self.weight_quant)
        self.lr_unit, _, bit_width = integer_grid(self.lr_distribution.values)
        # a learned scale parameter stores unit * alpha * factor (Brevitas' threshold)
        self.lr_parameter_factor = self.lr_unit * threshold_factor(bit_width)
        if eps < 0:
            raise ValueError(f"lr_eps must be >= 0, got {eps}")
        self.lr_p_min, self.lr_p_max, self.lr_eps = float(p_min), float(p_max), float(eps)
        # In training, also hand the Gaussian moments (m, v) downstream as a MomentTensor
        # (its data is the sample), for a stochastic sign activation in moment mode.
        self.lr_output_moments = bool(output_moments)
        # g: training computes with the tempered distribution p^g / sum p^g (same mode); a
        # schedule raising g makes the trained distribution collapse onto the deployed mode.
        self.lr_sharpness = 1.0
        # validates the bounds too (raises on bad p_min / p_max)
        logits = self.lr_distribution.init_logits(self.weight.detach(), p_min, p_max)
        self.weight_logits = nn.Parameter(logits)
        self.weight.requires_grad_(False)
        self.register_buffer(_FROZEN_KEY, torch.zeros((), dtype=torch.bool, device=self.weight.device))
        self._synced_versions = None
        self.register_load_state_dict_post_hook(LRWeightMixin._materialize_after_load)
        with torch.no_grad():
            self._init_scale_from_float(self.weight.detach())
        self.materialize_weight()

    def _finish_init(self, device) -> None:
        """Keep the initial quantizer state, then empty the layer onto meta if asked.

        Brevitas' quantizers cannot be built on meta (ParameterScaling calls ``.item()``),
        so a meta layer is built on the CPU first. ``to_empty()`` leaves the quantizers'
        buffers (most are not in the state dict: constant scales, bit widths) as garbage
        and ``reset_parameters()`` cannot re-derive them, so their initial values are kept
        (a few scalars and per-channel scales) and restored by it.
        """
        derived = {"weight", "bias", "weight_logits"}
        self._lr_init_state = {
            n: t.detach().clone()
            for n, t in itertools.chain(self.named_parameters(), self.named_buffers())
            if n not in derived}
        if device is not None and torch.device(device).type == "meta":
            self.to_empty(device="meta")

    @torch.no_grad()
    def _restore_init_state(self, only_meta: bool = False) -> None:
        """Put the initial quantizer state back (on the weight's device and in each
        tensor's dtype); with `only_meta`, only into tensors still on meta."""
        device = self.weight.device
        for name, value in getattr(self, "_lr_init_state", {}).items():
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            current = table.get(leaf)
            if current is None or (only_meta and not current.is_meta):
                continue
            if current.is_meta or current.device != device:
                new = value.to(device=device, dtype=current.dtype).clone()
                table[leaf] = (nn.Parameter(new, current.requires_grad)
                               if isinstance(current, nn.Parameter) else new)
            else:
                current.copy_(value)

    def reset_parameters(self) -> None:
        """Re-initialize as a construction does: the torch layer's draw of weight and bias,
        the logits, scale and materialized weight derived from it, the quantizers' initial
        state, unfrozen. Makes a meta layer usable after ``to_empty()``."""
        super().reset_parameters()
        if not self._lr_ready or self.weight.is_meta:
            return      # called by the torch constructor before _init_lr; or nothing to fill
        self._restore_init_state()
        self._sync_frozen_flag()
        with torch.no_grad():
            weight = self.weight.detach()
            logits = self.lr_distribution.init_logits(weight, self.lr_p_min, self.lr_p_max)
            self.weight_logits.copy_(logits.to(self.weight_logits))
            self._init_scale_from_float(weight)
        self.materialize_weight()

    # -- helpers -------------------------------------------------------------------------
    @property
    def is_lr_frozen(self) -> bool:
        # a Python mirror of the `lr_frozen` buffer (the persisted state): reading the
        # buffer would sync the device and break torch.compile graphs (Tensor.item())
        return self.__dict__.get("_lr_frozen_flag", False)

    def _set_frozen(self, frozen: bool) -> None:
        getattr(self, _FROZEN_KEY).fill_(frozen)
        self._lr_frozen_flag = bool(frozen)

    def _sync_frozen_flag(self) -> None:
        flag = getattr(self, _FROZEN_KEY)
        self._lr_frozen_flag = False if flag.is_meta else bool(flag)

    @property
    def _lr_ready(self) -> bool:
        return "weight_logits" in self._parameters

    def lr_parameters(self) -> List[nn.Parameter]:
        """The distribution's trained parameters (the weight logits): training state that a
        deployed network does not hold (own optimizer group, not counted as a parameter)."""
        return [self.weight_logits] if self._lr_ready else []

    def _scale_parameter_name(self) -> Optional[str]:
        if "_lr_scale_name" in self.__dict__:
            return self._lr_scale_name
        names = [n for n, _ in self.named_parameters() if n.startswith("weight_quant.")]
        if len(names) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: weight quantizer has several parameters {names}; "
                f"LR layers support one learned scale")
        self._lr_scale_name = names[0] if names else None
        return self._lr_scale_name

    def _float_scale(self, float_weight: Tensor, shape) -> Tensor:
        """Scale parameter for alpha = mean |W| per output channel (XNOR-net), as `shape`."""
        dims = [d for d in range(float_weight.dim()) if d != self.output_channel_dim]
        alpha = float_weight.abs().mean(dim=dims) if dims else float_weight.abs()
        alpha = alpha.clamp_min(torch.finfo(torch.float32).tiny)
        return (self.lr_parameter_factor * alpha).reshape(shape)

    def _init_scale_from_float(self, float_weight: Tensor) -> None:
        name = self._scale_parameter_name()
        if name is not None:
            param = self.get_parameter(name)
            param.copy_(self._float_scale(float_weight, param.shape).to(param))

    def lr_scale(self) -> Optional[Tensor]:
        """Per-channel multiplier s (broadcastable to the weight), with gradient; None when
        the quantizer has no learned scale (LR quantizers' constant scale is one grid unit,
        so s = 1)."""
        if self._scale_parameter_name() is None:
            return None
        # The quantizer's scaling module returns the threshold unit * alpha * factor
        # (== quant_weight().scale * factor / unit) without quantizing the whole weight.
        return self.weight_quant.tensor_quant.scaling_impl(self.weight) / self.lr_parameter_factor

    def _param_versions(self) -> Tuple[int, ...]:
        name = self._scale_parameter_name()
        tensors = [self.weight_logits, self.weight] + ([self.get_parameter(name)] if name else [])
        return tuple(t._version for t in tensors)

    # -- distribution views --------------------------------------------------------------
    def weight_moments(self) -> Tuple[Tensor, Tensor]:
        """(E[w] s, Var[w] s^2): the moments of the scaled weight."""
        return self._scaled_moments()[:2]

    def _scaled_moments(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        scale = self.lr_scale()
        logits = self.weight_logits
        if self.lr_sharpness != 1.0:
            logits = self.lr_distribution.sharpen(logits, self.lr_sharpness)
        mean, var = self.lr_distribution.scaled_moments(logits, scale)
        return mean, var, scale

    def _weight_sq_per_output(self, scale: Optional[Tensor]) -> Optional[Tensor]:
        """E[w^2] per output unit when all values have one magnitude (binary: s^2)."""
        value_sq = self.lr_distribution.constant_square
        if value_sq is None:
            return None
        if scale is None:
            return self.weight_logits.new_tensor(value_sq)
        return (scale * scale).reshape(-1) * value_sq

    def preactivation_moments(self, x: Tensor, logits: Optional[Tensor] = None
                              ) -> Tuple[Tensor, Tensor]:
        """(m, v) of the pre-activation (bias left out) for a deterministic input x, with
        this layer's logits or `logits` (e.g. a sharpened copy)."""
        logits = self.weight_logits if logits is None else logits
        weight_mean, weight_var = self.lr_distribution.scaled_moments(logits, self.lr_scale())
        return lr_moments(super().inner_forward_impl, x, weight_mean, weight_var)

    @torch.no_grad()
    def sharpen_(self, gain: float) -> None:
        """Temper the weight distributions in place (p_k^gain, same mode; see
        WeightDistribution.sharpen)."""
        self.weight_logits.copy_(self.lr_distribution.sharpen(self.weight_logits, gain))
        self.materialize_weight()

    def lr_regularizer(self) -> Tensor:
        """The distribution's regularizer on this layer's logits (beta / probability decay)."""
        return self.lr_distribution.regularizer(self.weight_logits)

    @torch.no_grad()
    def clamp_logits_(self, bound: float) -> None:
        """Clamp the logits to [-bound, bound] in place (e.g. 4.6 ~ p in [0.01, 0.99])."""
        self.weight_logits.clamp_(-bound, bound)

    @torch.no_grad()
    def materialize_weight(self, discrete: Optional[Tensor] = None) -> None:
        """weight <- discrete * s, with `discrete` the mode of the logits by default."""
        if self.weight.is_meta:
            return      # nothing to compute until to_empty() + reset_parameters() or a load
        if discrete is None:
            discrete = self.lr_distribution.mode(self.weight_logits)
        scale = self.lr_scale()
        self.weight.copy_((discrete if scale is None else discrete * scale).to(self.weight.dtype))
        self._synced_versions = self._param_versions()

    @torch.no_grad()
    def freeze(self, how: str = "mode", generator: Optional[torch.Generator] = None) -> None:
        """Fix the discrete weights: the mode, or one sample ("sample", with `generator`).

        A frozen layer computes with its discrete weights in train() too (as needed to
        re-estimate BatchNorm statistics); `unfreeze()` returns to LR training.
        """
        if how == "mode":
            discrete = None
        elif how == "sample":
            discrete = self.lr_distribution.sample(self.weight_logits, generator=generator)
        else:
            raise ValueError(f"freeze how={how!r}: choose 'mode' or 'sample'")
        self.materialize_weight(discrete)
        self._set_frozen(True)

    @torch.no_grad()
    def unfreeze(self) -> None:
        self._set_frozen(False)
        self.materialize_weight()

    # -- nn.Module hooks -----------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and self._lr_ready and not self.is_lr_frozen:
            self.materialize_weight()
        return self

    def _weight_is_stale(self) -> bool:
        return (not self.is_lr_frozen and self._synced_versions != self._param_versions())

    def forward(self, input):
        if (not self.training and not self.export_mode and not torch.jit.is_tracing() and
                self._weight_is_stale()):
            self.materialize_weight()
        return super().forward(input)

    def _lr_training_forward(self) -> bool:
        return self.training and not self.is_lr_frozen and self.weight_quant.is_quant_enabled

    def forward_impl(self, inp):
        """Brevitas' forward_impl, minus the weight quantization in LR training.

        The LR forward needs only the quantizer's scale, so it skips quantizing the weight
        (a weight-sized sign and multiply, forward and backward): input_quant -> LR
        pre-activation -> output_quant. eval(), frozen and export use Brevitas' path.
        """
        if not self._lr_training_forward():
            return super().forward_impl(inp)
        # a stochastic input quantizer is read for its moments only: it draws no sample
        with moments_only(self.input_quant) as reads_moments:
            quant_input = as_tensor(self.input_quant(self.unpack_input(inp)))
        if reads_moments and not has_moments(quant_input):
            raise RuntimeError(f"{type(self).__name__}: the input quantizer's output lost its "
                               "moments (an in-place op after it?); its data is not a sample")
        output = self.lr_preactivation(quant_input, self.bias)
        return self.pack_output(self.output_quant(output))

    def lr_preactivation(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """z = m + sqrt(v + eps) * e for an input x (a MomentTensor adds its variance).

        With ``lr_output_moments`` the output is a *deferred* MomentTensor (m, v): the
        sample is drawn only where an op reads it (MomentTensor.deferred); a following
        BatchNorm, threshold and stochastic sign read only the moments."""
        x_mean, x_var = split_moments(x)  # x_var is None for a deterministic input
        core = LRWeightMixin._lr_sample_core
        if self.lr_compile:
            core = compiled(core, x_mean.device.type)
        draw = not self.lr_output_moments
        outputs = core(self, x_mean, x_var, bias, draw)
        if draw:
            return outputs[0]
        return MomentTensor.deferred(*outputs, eps=self.lr_eps)

    def _lr_sample_core(self, x_mean: Tensor, x_var: Optional[Tensor], bias: Optional[Tensor],
                        draw: bool = True) -> Tuple[Tensor, ...]:
        """(z,) on plain tensors, or the moments (m, v) without drawing: the region
        ``lr_compile`` compiles (returning fewer tensors lets it keep fewer)."""
        weight_mean, weight_var, scale = self._scaled_moments()
        # the layer's own conv / linear operator (explicit class: also called unbound)
        parent_op = super(LRWeightMixin, self).inner_forward_impl
        sq = self._weight_sq_per_output(scale) if x_var is not None else None
        mean, var = lr_moments(parent_op, x_mean, weight_mean, weight_var, bias, x_var=x_var,
                               weight_sq_per_output=sq)
        return (lr_sample(mean, var, self.lr_eps),) if draw else (mean, var)

    def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs):
        logits_key, weight_key = prefix + "weight_logits", prefix + "weight"
        is_float_checkpoint = logits_key not in state_dict and weight_key in state_dict
        if is_float_checkpoint:
            self._float_state_to_lr(state_dict, prefix)
        if weight_key in state_dict:
            state_dict.setdefault(
                prefix + _FROZEN_KEY,
                torch.zeros((), dtype=torch.bool, device=state_dict[weight_key].device))
        # An LR checkpoint restores its logits; its materialized weight is re-derived below.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @staticmethod
    def _materialize_after_load(module, incompatible_keys) -> None:
        """Post-load hook: runs once the quantizer's scale (a child module) is loaded too.
        A load with ``assign=True`` into a meta layer (Brevitas' layerwise_quantize) leaves
        the tensors missing from the state dict on meta: they get their initial values."""
        if module.weight.is_meta:
            return
        module._restore_init_state(only_meta=True)
        module._sync_frozen_flag()
        if not module.is_lr_frozen:
            module.materialize_weight()

    @torch.no_grad()
    def _float_state_to_lr(self, state_dict, prefix) -> None:
        """Rewrite a float layer's state (weight [, bias]) into this layer's LR state."""
        float_weight = state_dict[prefix + "weight"]
        if tuple(float_weight.shape) != tuple(self.weight.shape):
            return  # let the default loader report the size mismatch
        dtype = self.weight.dtype
        logits = self.lr_distribution.init_logits(float_weight, self.lr_p_min, self.lr_p_max)
        state_dict[prefix + "weight_logits"] = logits.to(dtype)
        scale = torch.ones((), dtype=torch.float64)
        name = self._scale_parameter_name()
        if name is not None:
            scale = self._float_scale(float_weight.double(), self.get_parameter(name).shape)
            state_dict.setdefault(prefix + name, scale.to(dtype))
            scale = state_dict[prefix + name].double() / self.lr_parameter_factor
            scale = scale.reshape(
                [-1 if d == self.output_channel_dim else 1 for d in range(float_weight.dim())]) \
                if scale.numel() > 1 else scale.reshape(())
        discrete = self.lr_distribution.mode(logits.double())
        state_dict[prefix + "weight"] = (discrete * scale).to(dtype)

    @classmethod
    def from_float(cls, module: nn.Module, weight_quant=LRBinaryWeightPerTensorConst, **kwargs):
        """An LR layer with the geometry of `module`, initialized from its weight and bias."""
        expected = cls._float_class()
        if not isinstance(module, expected):
            raise TypeError(f"{cls.__name__}.from_float expects a {expected.__name__}, "
                            f"got {type(module).__name__}")
        layer = cls(
            **cls._geometry_kwargs(module),
            bias=module.bias is not None,
            weight_quant=weight_quant,
            device=module.weight.device,
            dtype=module.weight.dtype,
            **kwargs)
        float_state = {k: v for k, v in module.state_dict().items() if k in ("weight", "bias")}
        layer.load_state_dict(float_state, strict=False)
        layer.train(module.training)
        return layer
