"""FINN's verdict on a PyTorch model: export it to QONNX, run finn-plus' build steps up to
the estimate reports (``check_with_finn(..., dataflow=True)``) and say in one line what FINN
did with it. ``lr-quant export --finn`` and ``lr-quant summary --finn`` use it; the summary's
FINN column then comes from this real check instead of the conservative rules.

    verdict = finn_hardware_check(model, example, work_dir)
    verdict.mapped     # one StreamingDataflowPartition, only layout ops outside, outputs equal
    verdict.line       # "FINN (finn-plus build steps): one dataflow partition, ..."
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .check import FinnCheckError, check_with_finn

__all__ = ["FinnVerdict", "finn_hardware_check", "verdict_of"]


@dataclass
class FinnVerdict:
    """mapped: FINN put the whole network into one dataflow partition with equal outputs;
    line: one sentence for people; result: check_with_finn's JSON result (None if FINN
    never wrote one)."""
    mapped: bool
    line: str
    result: Optional[dict] = None


def _totals(estimates: Dict[str, dict]) -> Dict[str, float]:
    totals: Dict[str, float] = {}
    for name, layer in estimates.items():
        if name == "total" or not isinstance(layer, dict):
            continue
        for key, value in layer.items():
            if isinstance(value, (int, float)):
                totals[key] = totals.get(key, 0) + value
    return totals


def verdict_of(result: Optional[dict], error: str = "") -> FinnVerdict:
    """The verdict of a check_with_finn result (`error`: the FinnCheckError message, if it
    raised)."""
    flow = (result or {}).get("dataflow") or {}
    if result and result.get("ok") and flow.get("partitions") == 1:
        ops = flow.get("partition_op_types", {})
        layers = ", ".join(f"{n} {k}" for k, n in sorted(ops.items()))
        err = max(s.get("max_abs_err", 0.0) for s in flow.get("stages", {}).values()) \
            if flow.get("stages") else 0.0
        totals = _totals(flow.get("estimates", {}))
        cost = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(totals.items()) if v)
        return FinnVerdict(True, f"FINN (finn-plus build steps): one dataflow partition, "
                                 f"outputs equal (max abs error {err:.1e}); {layers}"
                                 + (f"; estimated {cost}" if cost else ""), result)
    problems = list((result or {}).get("problems") or [])   # dataflow's come prefixed
    if result and result.get("error"):
        first = result["error"].strip().splitlines()[0][:300]
        problems.insert(0, f"FINN raised in {result.get('failed_stage', '?')}: {first}")
    reasons = list(dict.fromkeys(problems))
    reason = "; ".join(reasons) if reasons else (error.splitlines()[0] if error else "no result")
    return FinnVerdict(False, f"FINN (finn-plus build steps): not mapped: {reason}", result)


def finn_hardware_check(model: nn.Module, example: torch.Tensor, work_dir, *,
                        onnx_path=None, num_inputs: int = 8, atol: float = 1e-3,
                        python=None) -> FinnVerdict:
    """Export `model` (a frozen network; `example`: an input batch of its shape) to
    `work_dir`/model.onnx (or check the existing `onnx_path`), run finn-plus' build steps on
    it and compare their python execution with PyTorch on `num_inputs` seeded random inputs
    (normal, with the example's mean and std). FINN failing is a verdict, not an exception."""
    from .._tensor import as_tensor
    from ..export import export_qonnx

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if onnx_path is None:
        onnx_path = work / "model.onnx"
        export_qonnx(model, example[:1], onnx_path, require_frozen=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((num_inputs, *example.shape[1:]), generator=g) * example.std() \
        + example.mean()
    model.eval()
    with torch.no_grad():
        expected = as_tensor(model(x)).float().numpy()
    try:
        result = check_with_finn(onnx_path, x.numpy(), expected, atol=atol, dataflow=True,
                                 python=python, work_dir=work / "finn")
    except FinnCheckError as e:
        return verdict_of(e.result, str(e))
    return verdict_of(result)
