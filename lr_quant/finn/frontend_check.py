"""Run FINN's frontend on an exported QONNX model and check that its outputs survive.

This is a standalone script for the *FINN* virtual environment (finn-plus, which pins
onnx / brevitas / protobuf versions that differ from lr_quant's). It imports only
finn, qonnx, onnx and numpy, never lr_quant; ``lr_quant.finn.check_with_finn`` builds
that environment and runs this file in it::

    <finn-venv>/bin/python frontend_check.py model.onnx data.npz result.json

``data.npz`` holds ``inputs`` (N samples stacked on the batch axis of the exported
model) and ``expected`` (the reference outputs, e.g. from PyTorch). The stages are
those of FINN's end-to-end BNN test (finn-plus ``tests/end2end/test_end2end_bnn_pynq.py``:
``test_export``, ``test_import_and_tidy``, ``test_streamline``):

1. ``qonnx``: ``qonnx.util.cleanup.cleanup_model`` of the exported file.
2. ``converted``: ``ConvertQONNXtoFINN`` (Quant/BipolarQuant weights folded into
   initializers, activation quantizers turned into ``MultiThreshold``), then the tidy-up
   InferShapes, FoldConstants, GiveUniqueNodeNames, GiveReadableTensorNames,
   InferDataTypes, RemoveStaticGraphInputs.
3. ``streamlined``: AbsorbScalarBiasIntoMultiThreshold (the test's
   AbsorbSignBiasIntoMultiThreshold, renamed), MoveScalarLinearPastInvariants,
   Streamline, LowerConvsToMatMul, MakeMaxPoolNHWC, AbsorbTransposeIntoMultiThreshold,
   ConvertBipolarMatMulToXnorPopcount, Streamline, InferDataLayouts,
   RemoveUnusedTensors.

4. ``dataflow`` (with ``--dataflow``): finn-plus' build steps up to the estimate reports,
   from the exported file (``hardware_steps.py``): one dataflow partition, nothing but
   layout ops outside it, outputs unchanged after streamlining and partitioning.

Every stage is executed with ``finn.core.onnx_exec.execute_onnx`` on all samples and
compared with ``expected``. The JSON result has, per stage, the max abs error, the op
types left in the graph and the saved model path. Exit status: 0 when every stage
matches within ``--atol`` (and, unless ``--allow-quant-nodes``, no QONNX quantizer
node is left after conversion); 1 when outputs changed or nodes were left; 2 when a
transformation or the execution raised (the result then carries ``error``,
``traceback`` and ``failed_stage``).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np

# onnx first: FINN's own tests import it before anything that may pull torch.
import onnx  # noqa: F401  # isort: split
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
from qonnx.transformation.fold_constants import FoldConstants
from qonnx.transformation.general import (
    GiveReadableTensorNames,
    GiveUniqueNodeNames,
    RemoveStaticGraphInputs,
    RemoveUnusedTensors,
)
from qonnx.transformation.infer_data_layouts import InferDataLayouts
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul
from qonnx.util.cleanup import cleanup_model

import finn.transformation.streamline.absorb as absorb
from finn.core.onnx_exec import execute_onnx
from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
from finn.transformation.streamline import Streamline
from finn.transformation.streamline.reorder import (
    MakeMaxPoolNHWC,
    MoveScalarLinearPastInvariants,
)

#: Op types of the QONNX dialect that FINN's hardware mapping cannot take: after
#: ConvertQONNXtoFINN none of them may be left.
QONNX_QUANT_OPS = ("Quant", "IntQuant", "BipolarQuant", "Trunc", "QuantizeLinear",
                   "DequantizeLinear")


def tidy_up(model: ModelWrapper) -> ModelWrapper:
    """FINN's standard tidy-up after import (``test_import_and_tidy``)."""
    for t in (InferShapes(), FoldConstants(), GiveUniqueNodeNames(),
              GiveReadableTensorNames(), InferDataTypes(), RemoveStaticGraphInputs()):
        model = model.transform(t)
    return model


def convert(model: ModelWrapper) -> ModelWrapper:
    """QONNX dialect -> FINN dialect (``test_export`` + ``test_import_and_tidy``)."""
    return tidy_up(model.transform(ConvertQONNXtoFINN()))


def streamline(model: ModelWrapper) -> ModelWrapper:
    """FINN's streamlining step for BNNs (``test_streamline`` of the BNN end2end test)."""
    for t in (absorb.AbsorbScalarBiasIntoMultiThreshold(), MoveScalarLinearPastInvariants(),
              Streamline(), LowerConvsToMatMul(), MakeMaxPoolNHWC(),
              absorb.AbsorbTransposeIntoMultiThreshold(),
              ConvertBipolarMatMulToXnorPopcount(), Streamline(), InferDataLayouts(),
              RemoveUnusedTensors()):
        model = model.transform(t)
    return model


def run(model: ModelWrapper, inputs: np.ndarray) -> np.ndarray:
    """Execute ``model`` with FINN's ``execute_onnx`` on ``inputs``, batch by batch."""
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise ValueError(
            f"expected one graph input and one output, got {len(model.graph.input)} "
            f"and {len(model.graph.output)}")
    iname = model.graph.input[0].name
    oname = model.graph.output[0].name
    ishape = model.get_tensor_shape(iname)
    batch = int(ishape[0]) if ishape and int(ishape[0]) > 0 else 1
    if tuple(ishape[1:]) != tuple(inputs.shape[1:]):
        raise ValueError(f"inputs have shape {inputs.shape}, the model expects {ishape}")
    if inputs.shape[0] % batch:
        raise ValueError(f"{inputs.shape[0]} samples do not split into batches of {batch}")
    outs = []
    for i in range(0, inputs.shape[0], batch):
        x = np.ascontiguousarray(inputs[i:i + batch], dtype=np.float32)
        outs.append(np.asarray(execute_onnx(model, {iname: x})[oname], dtype=np.float32))
    return np.concatenate(outs, axis=0)


def op_types(model: ModelWrapper) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def check(onnx_path: Path, data_path: Path, out_dir: Path, atol: float,
          allow_quant_nodes: bool, result: dict, dataflow: bool = False) -> dict:
    """Run the three stages, filling ``result`` as they go (so that a stage that raises
    leaves the earlier ones and ``failed_stage`` behind); ``ok`` says whether it passed."""
    result.update({
        "model": str(onnx_path),
        "finn_version": metadata.version("finn-plus"),
        "qonnx_version": metadata.version("qonnx"),
        "onnx_version": metadata.version("onnx"),
        "atol": atol,
        "stages": {},
        "problems": [],
        "ok": False,
    })
    data = np.load(data_path)
    inputs = data["inputs"].astype(np.float32)
    expected = data["expected"].astype(np.float32)
    result["num_samples"] = int(inputs.shape[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = onnx_path.stem
    stages = (("qonnx", cleanup_model),
              ("converted", convert),
              ("streamlined", streamline))
    model = ModelWrapper(str(onnx_path))
    for name, transform in stages:
        result["failed_stage"] = name
        model = transform(model)
        path = out_dir / f"{stem}_{name}.onnx"
        model.save(str(path))
        produced = run(model, inputs)
        if produced.size != expected.size:
            raise ValueError(f"the model produced outputs of shape {produced.shape}, "
                             f"expected {expected.shape}")
        produced = produced.reshape(expected.shape)
        err = float(np.max(np.abs(produced - expected))) if expected.size else 0.0
        result["stages"][name] = {
            "max_abs_err": err,
            "op_types": op_types(model),
            "model_path": str(path),
        }
        if not err <= atol:  # also catches NaN
            result["problems"].append(
                f"stage '{name}': outputs changed, max abs error {err:.3g} > atol {atol:g}")
    del result["failed_stage"]
    left = {k: v for k, v in result["stages"]["streamlined"]["op_types"].items()
            if k in QONNX_QUANT_OPS}
    if left and not allow_quant_nodes:
        result["problems"].append(
            f"QONNX quantizer nodes left after ConvertQONNXtoFINN + Streamline: {left} "
            "(FINN turns only Quant / BipolarQuant activation quantizers of <= 8 bits "
            "into MultiThreshold; IntQuant and wider Quant nodes stay and cannot be "
            "mapped to hardware)")
    result["streamlined_model"] = result["stages"]["streamlined"]["model_path"]
    if dataflow:
        from hardware_steps import run_hardware_steps  # beside this file (sys.path[0])

        result["failed_stage"] = "dataflow"
        result["dataflow"] = run_hardware_steps(onnx_path, inputs, expected,
                                                out_dir / f"{stem}_dataflow", atol, run,
                                                op_types)
        del result["failed_stage"]
        result["problems"] += [f"dataflow: {p}" for p in result["dataflow"]["problems"]]
    result["ok"] = not result["problems"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", type=Path, help="exported QONNX model")
    p.add_argument("data", type=Path, help=".npz with 'inputs' and 'expected'")
    p.add_argument("result", type=Path, help="JSON file to write")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the transformed models go (default: beside the result)")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--dataflow", action="store_true",
                   help="then run finn-plus' build steps up to the estimate reports "
                        "(hardware_steps.py)")
    p.add_argument("--allow-quant-nodes", action="store_true",
                   help="do not fail when Quant/BipolarQuant nodes are left unconverted")
    args = p.parse_args(argv)
    out_dir = args.out_dir or args.result.parent
    result: dict = {"model": str(args.onnx), "ok": False}
    try:
        check(args.onnx, args.data, out_dir, args.atol, args.allow_quant_nodes, result,
              args.dataflow)
        code = 0 if result["ok"] else 1
    except Exception as exc:  # report every FINN failure as data, then exit 2
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}".strip()
        result["traceback"] = traceback.format_exc()
        code = 2
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    if code == 2:
        print(result["traceback"], file=sys.stderr)
        stage = result.get("failed_stage", "setup")
        print(f"FINN frontend check FAILED on {args.onnx} (stage '{stage}'): "
              f"{result['error']}", file=sys.stderr)
    elif code == 1:
        for problem in result["problems"]:
            print(f"FINN frontend check FAILED on {args.onnx}: {problem}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
