"""finn-plus' own build steps, up to the estimate reports, on an exported QONNX model.

Runs in the FINN virtual environment (imported by ``frontend_check.py --dataflow``; never
imports lr_quant). The step list is finn-plus' ``estimate_only_dataflow_steps``
(``finn.builder.build_dataflow_config``): qonnx_to_finn, tidy_up, streamline,
convert_to_hw, minimize_bit_width_initial, create_dataflow_partition,
specialize_layers, target_fps_parallelization, apply_folding_config,
minimize_bit_width, generate_estimate_reports. None of them needs Vivado.

Three steps are added after ``step_streamline`` (each a no-op on a graph without what it
handles):

- :func:`step_residual_transposes` (graphs with a residual add of two streams):
  streamlining leaves the adds and forks of a residual network in NCHW with Transposes around them, which would become full-frame ``Shuffle``
  layers inside the partition; three rounds of FINN's MoveTransposePastJoinAdd / Fork /
  Eltwise, AbsorbConsecutiveTransposes and AbsorbTransposeIntoMultiThreshold remove them
  exactly (the transpose part of FINN's ``custom_step_library/resnet.py``).
- :func:`step_global_acc_pool`: a GlobalAveragePool becomes FINN's ``GlobalAccPool`` (sums)
  plus a scalar Mul(1/HW), and the Mul moves past Flatten and the classifier's MatMul, so
  the classifier reads integers and maps to an MVAU (otherwise: "unmapped nodes Mul,
  Flatten, MatMul").
- :func:`step_clip_thresholds`, FINN's
``RoundAndClipThresholds``. A binary layer fed by ±1 activations becomes an
XNOR-popcount MVAU whose thresholds live on the popcount (0..K); a channel whose sign
is constant over the reachable range has a threshold below 0, and finn-plus 1.6.1's
``step_minimize_bit_width`` asserts thresholds >= 0 in XNOR mode (it clips only
afterwards). Clipping to the input type's range is exact: popcount >= 0 always.

What is checked (``run_hardware_steps``): the model after ``step_streamline`` and after
``step_create_dataflow_partition`` is executed by ``execute_onnx`` (python mode; later
steps need cppsim / rtlsim) and compared with the expected outputs; the parent graph
holds exactly one ``StreamingDataflowPartition`` and nothing else but layout ops
(Transpose / Reshape / Flatten / TopK); the partition computes on integers (``float_nodes``,
FINN's own test for its "nodes use floating point operations" warning: a hardware layer with
a FLOAT32 input or output), except the input quantizer (the layer that reads the graph
input) and the output scale (the Elementwise Mul / Add chain that writes the graph output):
finn-plus maps float Mul / Add / Max into FLOAT32 ``Elementwise*_hls`` layers, so a float
datapath would otherwise pass as "one partition, outputs equal"; the estimate report (LUT /
BRAM / DSP per layer) exists.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Callable

import numpy as np

#: Nodes allowed outside the dataflow partition (layout only, or the label select).
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "TopK")


def _prepare_finn() -> None:
    """Make ``finn.builder.build_dataflow_steps`` importable without torch and Vivado.

    finn-plus imports torch for its LayerNorm layer only (a stub class takes its place
    when torch is absent: CNN graphs never instantiate it), needs global settings
    (``initialize_dummy_settings``, as its docs say for use outside ``run_finn.py``),
    and ``finn.xsi`` raises on attribute access without XILINX_VIVADO (only RTL
    simulation uses it: its names become functions that raise when called).
    """
    if importlib.util.find_spec("torch") is None:
        stub = types.ModuleType("finn.custom_op.fpgadataflow.layernorm")

        class LayerNorm:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("finn-plus' LayerNorm layer needs torch in the FINN env")

        stub.LayerNorm = LayerNorm
        sys.modules.setdefault(stub.__name__, stub)
    from finn.util.settings import initialize_dummy_settings

    initialize_dummy_settings()
    import finn.xsi

    def unavailable(name: str) -> Callable:
        def fail(*args, **kwargs):
            raise RuntimeError(f"finn.xsi.{name}: RTL simulation needs Vivado")
        return fail

    for name in getattr(finn.xsi, "_LAZY_NAMES", ()):
        setattr(finn.xsi, name, unavailable(name))


def step_clip_thresholds(model, cfg):
    """``RoundAndClipThresholds`` on the streamlined graph (see the module docstring)."""
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    return model.transform(RoundAndClipThresholds())


def step_residual_transposes(model, cfg):
    """Move the Transposes around residual adds and forks out of the way (module docstring)."""
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.absorb import (AbsorbConsecutiveTransposes,
                                                       AbsorbTransposeIntoMultiThreshold)
    from finn.transformation.streamline.reorder import (MoveTransposePastEltwise,
                                                        MoveTransposePastFork,
                                                        MoveTransposePastJoinAdd)

    joins = [n for n in model.graph.node if n.op_type == "Add"
             and all(model.get_initializer(i) is None for i in n.input)]
    if not joins:   # no residual add: nothing to clean (and the output chain stays as is)
        return model
    for _ in range(3):
        for t in (MoveTransposePastJoinAdd(), MoveTransposePastFork(), MoveTransposePastEltwise(),
                  AbsorbConsecutiveTransposes(), AbsorbTransposeIntoMultiThreshold(),
                  Streamline(), InferDataTypes(), InferDataLayouts()):
            model = model.transform(t)
    return model


def step_global_acc_pool(model, cfg):
    """GlobalAveragePool -> GlobalAccPool + a scalar Mul moved past the classifier."""
    from qonnx.transformation.general import GiveUniqueNodeNames
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import (
        InferGlobalAccPoolLayer)
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.collapse_repeated import CollapseRepeatedMul
    from finn.transformation.streamline.reorder import (MoveScalarLinearPastInvariants,
                                                        MoveScalarMulPastMatMul)

    if not any(n.op_type == "GlobalAveragePool" for n in model.graph.node):
        return model
    model = model.transform(InferDataLayouts()).transform(InferGlobalAccPoolLayer())
    for t in (InferShapes(), InferDataTypes(), InferDataLayouts(),
              MoveScalarLinearPastInvariants(), MoveScalarMulPastMatMul(), CollapseRepeatedMul(),
              Streamline(), GiveUniqueNodeNames(), InferDataTypes(), InferDataLayouts()):
        model = model.transform(t)
    return model


def build_steps() -> list:
    """finn-plus' estimate-only step list with the steps of the module docstring inserted
    after ``step_streamline``."""
    from finn.builder import build_dataflow_config as config

    steps = list(config.estimate_only_dataflow_steps)
    at = steps.index("step_streamline") + 1
    steps[at:at] = [step_residual_transposes, step_global_acc_pool, step_clip_thresholds]
    return steps


def _in_layout(model, inputs: np.ndarray) -> np.ndarray:
    """`inputs` (NCHW) as the graph takes them: NHWC once the partition starts after the
    input Transpose."""
    shape = tuple(model.get_tensor_shape(model.graph.input[0].name)[1:])
    if inputs.ndim == 4 and shape != inputs.shape[1:] and \
            shape == inputs.transpose(0, 2, 3, 1).shape[1:]:
        return np.ascontiguousarray(inputs.transpose(0, 2, 3, 1))
    return inputs


def float_nodes(model) -> dict:
    """{"float": hardware layers with a FLOAT32 input or output (FINN's test), "allowed":
    those of them that are the input quantizer or the output scale chain (see module doc)}."""
    from qonnx.core.datatype import DataType

    from finn.util.basic import getHWCustomOp

    def is_float(node) -> bool:
        if not node.domain.startswith("finn.custom_op.fpgadataflow"):
            return False
        op = getHWCustomOp(node)
        for getter, count in ((op.get_input_datatype, len(node.input)),
                              (op.get_output_datatype, len(node.output))):
            for i in range(count):
                try:
                    if getter(i) == DataType["FLOAT32"]:
                        return True
                except Exception:   # inputs without a datatype (FINN skips them too)
                    break
        return False

    floats = [n.name for n in model.graph.node if is_float(n)]
    inputs = {i.name for i in model.graph.input}
    allowed = {n.name for n in model.graph.node if set(n.input) & inputs}
    for out in model.graph.output:   # the output scale: Elementwise ops back from the output
        node = model.find_producer(out.name)
        while node is not None and node.op_type.startswith("Elementwise"):
            allowed.add(node.name)
            node = next((model.find_producer(i) for i in node.input
                         if model.find_producer(i) is not None), None)
    return {"float": floats, "allowed": sorted(set(floats) & allowed)}


def run_hardware_steps(onnx_path: Path, inputs: np.ndarray, expected: np.ndarray,
                       out_dir: Path, atol: float, run: Callable, op_types: Callable,
                       fpga_part: str = "xc7z020clg400-1") -> dict:
    """Run the steps; return ``{"steps", "partitions", "outside", "partition_op_types",
    "stages": {name: {max_abs_err, op_types}}, "estimates", "problems"}``.

    ``run(model, inputs)`` executes a graph, ``op_types(model)`` counts its ops (both
    from ``frontend_check``). Raises whatever FINN raises (the caller reports it).
    """
    _prepare_finn()
    from qonnx.core.modelwrapper import ModelWrapper

    import finn.builder.build_dataflow_steps as finn_steps
    from finn.builder import build_dataflow_config as config

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.DataflowBuildConfig(
        output_dir=str(out_dir), synth_clk_period_ns=10.0, fpga_part=fpga_part,
        generate_outputs=[config.DataflowOutputType.ESTIMATE_REPORTS],
        steps=build_steps(), save_intermediate_models=True)
    report: dict = {"steps": [], "stages": {}, "problems": []}
    model = ModelWrapper(str(onnx_path))
    checked = ("step_streamline", "step_create_dataflow_partition")
    for step in cfg.steps:
        fn = getattr(finn_steps, step) if isinstance(step, str) else step
        report["steps"].append(fn.__name__)
        report["failed_step"] = fn.__name__
        model = fn(model, cfg)
        model.save(str(out_dir / f"{fn.__name__}.onnx"))
        if fn.__name__ in checked:
            produced = run(model, _in_layout(model, inputs)).reshape(expected.shape)
            err = float(np.max(np.abs(produced - expected))) if expected.size else 0.0
            report["stages"][fn.__name__] = {"max_abs_err": err, "op_types": op_types(model)}
            if not err <= atol:
                report["problems"].append(f"after {fn.__name__}: outputs changed, max abs "
                                          f"error {err:.3g} > atol {atol:g}")
    del report["failed_step"]
    parent = ModelWrapper(str(out_dir / "intermediate_models" / "dataflow_parent.onnx"))
    parent_ops = collections.Counter(n.op_type for n in parent.graph.node)
    report["partitions"] = parent_ops.pop("StreamingDataflowPartition", 0)
    report["outside"] = dict(parent_ops)
    report["partition_op_types"] = op_types(model)
    floats = float_nodes(model)
    report["float_nodes"] = floats
    inner = [n for n in floats["float"] if n not in floats["allowed"]]
    if inner:
        report["problems"].append(
            f"float datapath inside the partition (FLOAT32 layers, not the input quantizer or "
            f"the output scale): {', '.join(inner)}; quantize the tensors they compute on")
    if report["partitions"] != 1:
        report["problems"].append(f"{report['partitions']} dataflow partitions, expected 1")
    compute = {k: v for k, v in parent_ops.items() if k not in LAYOUT_OPS}
    if compute:
        report["problems"].append(f"nodes left outside the dataflow partition: {compute}")
    resources = out_dir / "report" / "estimate_layer_resources.json"
    if resources.is_file():
        report["estimates"] = json.loads(resources.read_text())
        report["estimate_report"] = str(resources)
    else:
        report["problems"].append(f"no estimate report at {resources}")
    return report
