"""Packed deployment layers and ``pack_model``: frozen discrete layers -> 1 or 2 bits per weight.

``PackedLinear`` / ``PackedConv2d`` hold int32 buffers ``weight_packed`` (binary
``[N, ceil(K/32)]``, ternary ``[N, 2, ceil(K/32)]``), ``weight_scale [N]`` and an optional
``bias [N]`` (float32) and compute

    y = (q(x) @ v^T) * weight_scale + bias        (v in {-1,+1} or {-1,0,+1})

through :func:`triton_kernels.dispatch.packed_matmul` (Triton on CUDA, the torch reference
elsewhere), so a packed model runs on any device.

Input precision (``act_bits``), decided once by :func:`input_mode` when packing:
  1   the layer's ``input_quant`` maps x to ``+1 if x >= 0 else -1`` exactly (bipolar sign,
      scale 1; checked on a probe batch): the packed layer applies that sign itself and
      runs W1A1 (binary weights) or exact ±1 x ternary. A 1-bit ``input_quant`` whose
      outputs are +-1 but not ``sign(x)`` (a learned threshold before the sign) is kept and
      applied first, and the layer still runs the 1-bit kernels on its +-1 output;
  16  anything else: an enabled ``input_quant`` is kept as a submodule and applied first,
      then W1A16 / W2A16 on the float result.
Layers with an enabled ``output_quant`` or ``bias_quant``, ``groups != 1``, non-zero
padding modes or string padding are left unpacked (the report says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .conv import conv_pair, packed_conv2d
from .discrete import NotDiscreteError, discretize_weight, layer_weight
from .dispatch import packed_matmul
from .packing import num_words, pack_binary, pack_ternary, unpack_binary, unpack_ternary

__all__ = ["PackedLinear", "PackedConv2d", "PackEntry", "PackReport", "input_mode", "pack_model"]


def _as_tensor(x):
    """Plain tensor from a tensor or a duck-typed QuantTensor (``.value``)."""
    if isinstance(x, torch.Tensor):
        return x
    value = getattr(x, "value", None)
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"expected a tensor (or QuantTensor), got {type(x).__name__}")


def _quant_enabled(proxy) -> bool:
    return proxy is not None and bool(getattr(proxy, "is_quant_enabled", True))


def input_mode(module: nn.Module, probe: torch.Tensor) -> tuple[int, nn.Module | None]:
    """``(act_bits, input_quant to keep)`` for ``module`` given an input-shaped ``probe``.

    ``(1, None)`` when ``module.input_quant(probe)`` equals ``where(probe >= 0, 1, -1)``;
    ``(1, input_quant)`` when it is a 1-bit quantizer (``bit_width() == 1``) whose outputs
    are all +-1 (e.g. ``sign(x - t)``); ``(16, input_quant)`` for any other enabled input
    quantizer; ``(16, None)`` without one.
    """
    iq = getattr(module, "input_quant", None)
    if not isinstance(iq, nn.Module) or not _quant_enabled(iq):
        return 16, None
    was_training = iq.training
    iq.eval()
    try:
        with torch.no_grad():
            out = _as_tensor(iq(probe))
    finally:
        iq.train(was_training)
    sign = torch.where(probe >= 0, 1.0, -1.0).to(out.dtype)
    if out.shape == probe.shape and torch.equal(out, sign):
        return 1, None
    bit_width = getattr(iq, "bit_width", None)
    one_bit = callable(bit_width) and float(bit_width()) == 1.0
    if one_bit and out.shape == probe.shape and bool((out.abs() == 1).all()):
        return 1, iq
    return 16, iq


def _probe(shape: tuple[int, ...], device) -> torch.Tensor:
    """Deterministic probe with negatives, exact zeros and positives."""
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    x[::5] = 0.0
    return x.reshape(shape).to(device)


class _PackedBase(nn.Module):
    """Buffers and the input path shared by the packed layers."""

    def _init_buffers(self, n: int, k: int, weight_bits: int, act_bits: int, bias: bool, device) -> None:
        if weight_bits not in (1, 2):
            raise ValueError(f"weight_bits must be 1 or 2, got {weight_bits}")
        if act_bits not in (1, 16):
            raise ValueError(f"act_bits must be 1 or 16, got {act_bits}")
        self.k, self.weight_bits, self.act_bits = k, weight_bits, act_bits
        shape = (n, num_words(k)) if weight_bits == 1 else (n, 2, num_words(k))
        self.register_buffer("weight_packed", torch.zeros(shape, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32, device=device) if bias else None)
        self.input_quant: nn.Module | None = None
        self.backend = "auto"

    def _load_discrete(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        flat = values.reshape(values.shape[0], -1)
        packed = pack_binary(flat) if self.weight_bits == 1 else pack_ternary(flat)
        dev = self.weight_packed.device
        self.weight_packed.copy_(packed.to(dev))
        self.weight_scale.copy_(scale.to(dev, torch.float32))
        if self.bias is not None:
            self.bias.copy_(bias.detach().to(dev, torch.float32))

    def discrete_values(self) -> torch.Tensor:
        """Unpacked {-1,0,+1} weight as float32 ``[N, K]``."""
        unpack = unpack_binary if self.weight_bits == 1 else unpack_ternary
        return unpack(self.weight_packed, self.k)

    def _input(self, x) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return _as_tensor(x)

    def extra_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, act_bits={self.act_bits}, bias={self.bias is not None}"


class PackedLinear(_PackedBase):
    """``y = (q(x) @ v^T) * weight_scale + bias`` with v packed 1 / 2 bits per weight."""

    def __init__(self, in_features: int, out_features: int, *, weight_bits: int = 1, act_bits: int = 16,
                 bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, in_features, weight_bits, act_bits, bias, device)

    @classmethod
    def from_linear(cls, module: nn.Module, act: str = "auto") -> "PackedLinear":
        """Pack a frozen discrete ``nn.Linear`` (or duck-typed Brevitas QuantLinear)."""
        _check_packable(module)
        d = discretize_weight(layer_weight(module))
        act_bits, iq = (16, _kept_input_quant(module)) if act == "fp" else input_mode(
            module, _probe((2, module.in_features), d.scale.device))
        bias = getattr(module, "bias", None)
        new = cls(module.in_features, module.out_features, weight_bits=d.bits, act_bits=act_bits,
                  bias=bias is not None, device=d.values.device)
        new._load_discrete(d.values, d.scale, bias)
        new.input_quant = iq
        return new

    def forward(self, x) -> torch.Tensor:
        x = self._input(x)
        return packed_matmul(x, self.weight_packed, self.k, self.weight_scale, self.bias,
                             weight_bits=self.weight_bits, act_bits=self.act_bits, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class PackedConv2d(_PackedBase):
    """``conv2d(q(x), weight_scale * v, bias)`` with v packed along ``C*kh*kw`` (groups = 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0, dilation=1,
                 weight_bits: int = 1, act_bits: int = 16, bias: bool = True, device=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = conv_pair("kernel_size", kernel_size, 1)
        self.stride, self.dilation = conv_pair("stride", stride, 1), conv_pair("dilation", dilation, 1)
        self.padding = conv_pair("padding", padding, 0)
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(out_channels, k, weight_bits, act_bits, bias, device)

    @classmethod
    def from_conv2d(cls, module: nn.Module, act: str = "auto") -> "PackedConv2d":
        """Pack a frozen discrete ``nn.Conv2d`` (or duck-typed Brevitas QuantConv2d)."""
        _check_packable(module)
        if module.groups != 1:
            raise NotDiscreteError(f"groups={module.groups} is not supported (only groups=1)")
        if isinstance(module.padding, str) and module.padding != "valid":
            raise NotDiscreteError(f"padding={module.padding!r} is not supported (use explicit ints)")
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise NotDiscreteError(f"padding_mode={module.padding_mode!r} is not supported")
        d = discretize_weight(layer_weight(module))
        probe = _probe((2, module.in_channels, 3, 3), d.scale.device)
        act_bits, iq = (16, _kept_input_quant(module)) if act == "fp" else input_mode(module, probe)
        bias = getattr(module, "bias", None)
        padding = 0 if isinstance(module.padding, str) else module.padding
        new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                  padding=padding, dilation=module.dilation, weight_bits=d.bits, act_bits=act_bits,
                  bias=bias is not None, device=d.values.device)
        new._load_discrete(d.values, d.scale, bias)
        new.input_quant = iq
        return new

    def forward(self, x) -> torch.Tensor:
        x = self._input(x)
        return packed_conv2d(x, self.weight_packed, self.kernel_size, self.weight_scale, self.bias,
                             stride=self.stride, padding=self.padding, dilation=self.dilation,
                             in_channels=self.in_channels, weight_bits=self.weight_bits, act_bits=self.act_bits, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, " + super().extra_repr())


def _kept_input_quant(module: nn.Module) -> nn.Module | None:
    iq = getattr(module, "input_quant", None)
    return iq if isinstance(iq, nn.Module) and _quant_enabled(iq) else None


def _check_packable(module: nn.Module) -> None:
    for attr in ("output_quant", "bias_quant"):
        proxy = getattr(module, attr, None)
        if isinstance(proxy, nn.Module) and _quant_enabled(proxy):
            raise NotDiscreteError(f"{attr} is enabled (packed layers produce plain float outputs)")


# ----------------------------------------------------------------------------- pack_model


@dataclass
class PackEntry:
    """One candidate layer: packed or why not, and its parameter bytes before / after."""

    name: str
    layer: str
    packed: bool
    reason: str = ""
    weight_bits: int | None = None
    act_bits: int | None = None
    fp32_bytes: int = 0
    packed_bytes: int = 0


@dataclass
class PackReport:
    """What :func:`pack_model` did, layer by layer."""

    entries: list[PackEntry] = field(default_factory=list)

    @property
    def packed(self) -> list[PackEntry]:
        return [e for e in self.entries if e.packed]

    @property
    def skipped(self) -> list[PackEntry]:
        return [e for e in self.entries if not e.packed]

    @property
    def compression(self) -> float:
        """FP32 bytes / packed bytes over the packed layers (weights, scales, biases)."""
        after = sum(e.packed_bytes for e in self.packed)
        return sum(e.fp32_bytes for e in self.packed) / after if after else 1.0

    def __str__(self) -> str:
        rows = [f"{'layer':<28} {'type':<12} {'W':>2} {'A':>3} {'fp32 B':>10} {'packed B':>10}  note"]
        for e in self.entries:
            w = str(e.weight_bits or "-")
            a = str(e.act_bits or "-")
            rows.append(f"{e.name:<28} {e.layer:<12} {w:>2} {a:>3} {e.fp32_bytes:>10} "
                        f"{e.packed_bytes if e.packed else '-':>10}  {'packed' if e.packed else e.reason}")
        rows.append(f"packed {len(self.packed)} / {len(self.entries)} layers, compression {self.compression:.1f}x")
        return "\n".join(rows)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def pack_model(model: nn.Module, *, act: str = "auto",
               filter_fn: Callable[[str, nn.Module], bool] | None = None) -> PackReport:
    """Swap every eligible Linear / Conv2d of ``model`` (in place) for its packed twin.

    Eligible: an ``nn.Linear`` / ``nn.Conv2d`` (Brevitas quant layers included) whose
    weight (``quant_weight().value`` when available) is per-channel scale x {-1,+1} or
    x {-1,0,+1}, and ``filter_fn(name, module)`` is true. ``act="auto"`` detects bipolar
    inputs (W1A1); ``act="fp"`` always keeps float activations.
    """
    if act not in ("auto", "fp"):
        raise ValueError(f"act must be 'auto' or 'fp', got {act!r}")
    report = PackReport()
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and name]
    for name, module in targets:
        layer = type(module).__name__
        fp32 = 4 * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
        if filter_fn is not None and not filter_fn(name, module):
            report.entries.append(PackEntry(name, layer, False, "filtered out", fp32_bytes=fp32))
            continue
        try:
            with torch.no_grad():
                build = PackedLinear.from_linear if isinstance(module, nn.Linear) else PackedConv2d.from_conv2d
                packed = build(module, act=act)
        except NotDiscreteError as e:
            report.entries.append(PackEntry(name, layer, False, str(e), fp32_bytes=fp32))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, packed)
        size = _nbytes([packed.weight_packed, packed.weight_scale, packed.bias])
        report.entries.append(PackEntry(name, layer, True, "", packed.weight_bits, packed.act_bits, fp32, size))
    return report
