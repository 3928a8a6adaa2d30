"""What a conversion did: one :class:`LayerReport` per Conv/Linear of the original model,
collected with the dropped activation modules and notes in a :class:`ConversionReport`
(``str(report)`` is a table)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

__all__ = ["LayerReport", "ConversionReport"]

CONVERTED = "converted"
KEPT_FP = "kept_fp"
FP_BITS = 32


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
