"""Export size and time (QONNX, verified) and packed size vs FP32 of frozen LR models."""

from __future__ import annotations

import copy
import io
import os
import tempfile
import time

import torch
from torch import nn

from .common import convert_method


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _saved_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def export_and_pack(name: str, fp_model: nn.Module, method: str, example: torch.Tensor,
                    export: bool = True, **convert_kw) -> dict:
    """Convert (no training: the weights' values do not change sizes or times), freeze,
    export to QONNX with verification, pack; sizes against the FP32 model."""
    from lr_quant.deploy import pack
    from lr_quant.export import export_qonnx
    from lr_quant.freeze import freeze

    model = convert_method(fp_model, method, example, **convert_kw)
    freeze(model)
    model.eval()
    row = dict(model=name, method=method, fp32_state_bytes=_state_bytes(fp_model),
               fp32_saved_bytes=_saved_bytes(fp_model))
    if export:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            t0 = time.perf_counter()
            result = export_qonnx(model, example[:1], path, num_checks=2)
            row["export_s"] = time.perf_counter() - t0
            row["onnx_bytes"] = os.path.getsize(path)
            row["export_verified"] = bool(result.verified)
            qc = result.quant_counts
            row["quant_nodes"] = dict(qc() if callable(qc) else qc)
    packed = copy.deepcopy(model)
    t0 = time.perf_counter()
    report = pack(packed)
    row["pack_s"] = time.perf_counter() - t0
    row["packed_layers"] = len(report.packed)
    row["skipped_layers"] = len(report.skipped)
    row["packed_layer_compression"] = float(report.compression)
    row["packed_state_bytes"] = _state_bytes(packed)
    row["packed_saved_bytes"] = _saved_bytes(packed)
    row["whole_model_compression"] = row["fp32_state_bytes"] / row["packed_state_bytes"]
    with torch.no_grad():
        ref, out = model(example), packed(example)
        ref = ref.value if hasattr(ref, "value") else ref
        out = out.value if hasattr(out, "value") else out
    row["packed_max_rel_err"] = float((out - ref).abs().max() / ref.abs().max())
    row["packed_same_argmax"] = bool(torch.equal(out.argmax(1), ref.argmax(1)))
    return row


def run(quick: bool, log=print) -> list:
    import timm

    from .accuracy import cnn, mlp

    rows = []
    torch.manual_seed(0)
    jobs = [("digits MLP (middle quantized)", mlp(), torch.randn(16, 64), dict(
                keep_first_last=False, fp_names=["0", "6"]), ["lr_w1", "lr_w1a1"]),
            ("gratings CNN", cnn(), torch.randn(16, 1, 16, 16), dict(
                keep_first_last=False, fp_names=["0", "12"]), ["lr_w1", "lr_w2"])]
    if not quick:
        jobs.append(("resnet18 32x32", timm.create_model("resnet18", num_classes=10),
                     torch.randn(8, 3, 32, 32), {}, ["lr_w1", "lr_w2"]))
    for name, model, x, kw, methods in jobs:
        model.eval()
        for method in methods:
            try:
                rows.append(export_and_pack(name, model, method, x, **kw))
            except Exception as e:
                rows.append(dict(model=name, method=method, error=f"{type(e).__name__}: {e}"))
            log(f"  export/pack {name} {method}: {rows[-1]}")
    return rows
