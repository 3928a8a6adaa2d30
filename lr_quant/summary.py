"""Per-layer precision / memory / MAC table of a (converted or frozen) model, larq-style.

    s = model_summary(model, example_input)     # one eval() forward with hooks
    print(s.table())                            # or s.rows / s.totals as data

Columns, for every leaf module with parameters or a weight quantizer:
    layer       module name and type
    W bits      weight precision: LR layers their distribution's bit width (binary 1,
                ternary 2), Brevitas layers their quantizer's bit width, float layers 32
    A bits      input precision seen in the forward: the layer's own input quantizer, the
                bit width of a QuantTensor input, else the integer grid the values lie on
                (1 for +-1; {-1, 0, 1} and {0, 1, 2}: 2; a sum of two ternary tensors: 3),
                else 32 (float)
    params      deployed parameters: weight + bias + BN affine / statistics + learned
                scales (an LR layer's logits are training state, not counted)
    memory      weights at their precision, every other parameter at 32 bits
    MACs        multiply-accumulates per input sample (conv: out elements x in/groups x
                kernel; linear: out elements x in features)
    FINN        whether FINN can map the layer. With a FINN verdict (``finn=``, from
                ``lr_quant.finn.finn_hardware_check``: finn-plus' build steps on the export;
                ``lr-quant summary --finn``) that says the whole network is in one dataflow
                partition with equal outputs: "yes (FINN build)" for every row, and the
                verdict line under the table. Otherwise conservative rules (never "yes" for
                what FINN leaves in float): a conv / linear with quantized weights and
                quantized inputs yes, float weights or float inputs no; a BatchNorm yes only
                when a quantizer reads its output (FINN folds it into that quantizer's
                thresholds), else no (float Mul/Add)
Totals: parameters, memory, the FP32 size of the same parameters and the compression
ratio, MACs, and the share of MACs with 1-bit weights (binary MACs) and with 1-bit weights
and 1-bit inputs (XNOR-popcount MACs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ._tensor import as_tensor
from .nn.lr_layers import LRWeightMixin

__all__ = ["LayerRow", "Summary", "model_summary"]


@dataclass
class LayerRow:
    name: str
    kind: str
    weight_bits: Optional[int]
    input_bits: Optional[int]
    params: int
    memory_bits: int
    macs: int
    finn: str

    @property
    def binary(self) -> bool:
        return self.weight_bits == 1


@dataclass
class Summary:
    rows: List[LayerRow] = field(default_factory=list)
    finn_line: Optional[str] = None   # FINN's verdict, when the build steps were run

    @property
    def totals(self) -> Dict[str, float]:
        params = sum(r.params for r in self.rows)
        memory = sum(r.memory_bits for r in self.rows) / 8
        macs = sum(r.macs for r in self.rows)
        binary = sum(r.macs for r in self.rows if r.binary)
        xnor = sum(r.macs for r in self.rows if r.binary and r.input_bits == 1)
        return {"params": params, "memory_bytes": memory, "fp32_bytes": params * 4.0,
                "compression": params * 4.0 / memory if memory else float("nan"),
                "macs": macs, "binary_mac_share": binary / macs if macs else 0.0,
                "xnor_mac_share": xnor / macs if macs else 0.0}

    def table(self) -> str:
        head = ["layer", "type", "W bits", "A bits", "params", "memory", "MACs", "FINN"]
        body = [[r.name, r.kind, _bits(r.weight_bits), _bits(r.input_bits), f"{r.params:,}",
                 _bytes(r.memory_bits / 8), f"{r.macs:,}", r.finn] for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
                  for i, h in enumerate(head)]
        right = {2, 3, 4, 5, 6}

        def fmt(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths)))
        rule = "-" * len(fmt(head))
        t = self.totals
        lines = [fmt(head), rule, *map(fmt, body), rule,
                 f"total params {t['params']:,}   memory {_bytes(t['memory_bytes'])}   "
                 f"FP32 {_bytes(t['fp32_bytes'])}   compression x{t['compression']:.1f}",
                 f"MACs per sample {t['macs']:,}   binary-weight MACs "
                 f"{100 * t['binary_mac_share']:.1f}%   XNOR (W1A1) MACs "
                 f"{100 * t['xnor_mac_share']:.1f}%",
                 self.finn_line or "FINN column: conservative rules (`lr-quant summary "
                                   "--finn` runs finn-plus' build steps)"]
        return "\n".join(lines)


def _bits(b):
    return "-" if b is None else str(b)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _weight_bits(module: nn.Module) -> Optional[int]:
    if isinstance(module, LRWeightMixin):
        return module.lr_distribution.precision
    quant = getattr(module, "weight_quant", None)
    if quant is not None and getattr(quant, "is_quant_enabled", False):
        try:
            return int(round(float(module.quant_weight_bit_width())))
        except Exception:
            return None
    if isinstance(getattr(module, "weight", None), Tensor):
        return 32
    return None


def _input_bits(module: nn.Module, x) -> int:
    """Bits of what the layer computes with: its own enabled ``input_quant`` (a converted
    layer's sign / ternary / int8 input quantizer), else what it receives."""
    proxy = getattr(module, "input_quant", None)
    if proxy is not None and getattr(proxy, "is_quant_enabled", False):
        try:
            return int(round(float(proxy.bit_width())))
        except Exception:
            pass
    bit_width = getattr(x, "bit_width", None)
    if bit_width is not None:
        return int(round(float(bit_width)))
    x = as_tensor(x)
    if isinstance(x, Tensor) and x.is_floating_point() and x.numel():
        return _grid_bits(x)
    return 32


def _grid_bits(x: Tensor) -> int:
    """Bits of the integer grid `x` lies on (the quantized tensors of a FINN-form model are
    read directly, with no input quantizer): 1 for +-1, unsigned width for values >= 0,
    two's-complement width otherwise; 32 for non-integers or more than 16 bits."""
    if not bool((x == torch.round(x)).all()):
        return 32
    if bool(((x == 1) | (x == -1)).all()):
        return 1
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0:
        bits = max(1, math.ceil(math.log2(hi + 1)))
    else:
        bits = math.ceil(math.log2(max(-lo, hi + 1))) + 1
    return bits if bits <= 16 else 32


def _macs(module: nn.Module, out: Tensor) -> int:
    per_sample = out[0].numel() if out.dim() > 0 else out.numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        return per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


def _params_and_memory(module: nn.Module, weight_bits: Optional[int]):
    params, memory = 0, 0
    training_state = {id(p) for m in module.modules() if isinstance(m, LRWeightMixin)
                      for p in m.lr_parameters()}
    for name, p in module.named_parameters(recurse=True):
        if id(p) in training_state:
            continue
        n = p.numel()
        params += n
        memory += n * (weight_bits if name == "weight" and weight_bits else 32)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        n = module.running_mean.numel() + module.running_var.numel()
        params += n
        memory += 32 * n
    return params, memory


def _finn(module: nn.Module, weight_bits: Optional[int], input_bits: Optional[int],
          thresholded: bool) -> str:
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        if weight_bits is None or weight_bits >= 32:
            return "no: float weights"
        return "no: float input" if input_bits is None or input_bits >= 32 else "yes"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "yes: thresholds" if thresholded else "no: float Mul/Add"
    return "yes"


def _reads_through_quantizer(module: nn.Module) -> bool:
    """A module whose input goes through an activation quantizer first (a layer's enabled
    ``input_quant``, or a QuantIdentity-style activation layer)."""
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    if isinstance(module, QuantNonLinearActLayer):
        return True
    proxy = getattr(module, "input_quant", None)
    return proxy is not None and bool(getattr(proxy, "is_quant_enabled", False))


def _is_row(module: nn.Module) -> bool:
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
                           QuantNonLinearActLayer)):
        return True   # an activation quantizer is one row (its thresholds inside)
    if any(True for _ in module.children()):
        return False
    return any(True for _ in module.parameters(recurse=False))


@torch.no_grad()
def model_summary(model: nn.Module, example_input: Tensor, finn=None) -> Summary:
    """Run one eval() forward on `example_input` (batch of any size) and tabulate.
    `finn`: a lr_quant.finn.FinnVerdict of this model (the FINN column, see above)."""
    records: Dict[str, dict] = {}
    hooks = []
    rows_modules = []
    for n, m in model.named_modules():
        if n and _is_row(m) and not any(n.startswith(r + ".") for r, _ in rows_modules):
            rows_modules.append((n, m))

    norm_outputs: Dict[int, str] = {}   # id(BN output) -> BN name
    thresholded = set()                 # BNs whose output a quantizer reads

    def hook(name):
        def fn(module, inputs, output):
            out = as_tensor(output)
            if name not in records and isinstance(out, Tensor):
                records[name] = {"input_bits": _input_bits(module, inputs[0]) if inputs else None,
                                 "macs": _macs(module, out)}
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(out, Tensor):
                norm_outputs[id(out)] = name
                keep_alive.append(out)
        return fn

    def reader(module, inputs):
        x = as_tensor(inputs[0]) if inputs else None
        if isinstance(x, Tensor) and id(x) in norm_outputs and _reads_through_quantizer(module):
            thresholded.add(norm_outputs[id(x)])

    keep_alive = []
    for name, module in rows_modules:
        hooks.append(module.register_forward_hook(hook(name)))
    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(reader))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    summary = Summary(finn_line=finn.line if finn is not None else None)
    mapped = finn is not None and finn.mapped
    for name, module in rows_modules:
        rec = records.get(name, {"input_bits": None, "macs": 0})
        bits = _weight_bits(module)
        params, memory = _params_and_memory(module, bits)
        summary.rows.append(LayerRow(name, type(module).__name__, bits, rec["input_bits"],
                                     params, memory, rec["macs"],
                                     "yes (FINN build)" if mapped else
                                     _finn(module, bits, rec["input_bits"],
                                           name in thresholded)))
    return summary
