"""FINN frontend integration: exported QONNX -> ConvertQONNXtoFINN -> Streamline.

The model is a small FINN-style CNV (8-bit input quantizer, binary weights without bias,
BatchNorm, scale-1 bipolar activations, max-pooling, a binary classifier) built from
stock Brevitas layers; the LR layers take their place once they export the same nodes.
The oracle is the PyTorch model's output. The FINN checks run in finn-plus' own venv
(built by ``lr_quant.finn.ensure_finn_env`` on first use, cached afterwards).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from brevitas.core.function_wrapper import TensorClamp
from brevitas.core.scaling import ScalingImplType
from brevitas.core.stats import StatsOp
from brevitas.export import export_qonnx
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
from brevitas.quant import (
    Int8ActPerTensorFloatMinMaxInit,
    Int8WeightPerTensorFloat,
    SignedBinaryActPerTensorConst,
    SignedBinaryWeightPerTensorConst,
)
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.cleanup import cleanup_model
from torch import nn

import lr_quant.finn.env as lrfinn
from lr_quant.finn import FinnCheckError, FinnEnvError, check_with_finn, ensure_finn_env

IN_SHAPE = (3, 16, 16)
NUM_SAMPLES = 8
ATOL = 1e-4


class SignedBinaryWeightPerChannelStats(SignedBinaryWeightPerTensorConst):
    """±alpha_c binary weights, alpha_c = mean |w| of output channel c (XNOR-Net style).

    Out-of-place clamp: the parent's in-place clamp would move the statistics.
    """
    scaling_impl_type = ScalingImplType.STATS
    scaling_stats_op = StatsOp.AVE
    scaling_per_output_channel = True
    tensor_clamp_impl = TensorClamp


class TernaryWeightPerTensorFloat(Int8WeightPerTensorFloat):
    """{-s, 0, +s} weights: a 2-bit narrow-range signed Quant (lr_quant's ternary export)."""
    bit_width = 2
    narrow_range = True


WEIGHT_QUANTS = {
    "binary_per_tensor_const": SignedBinaryWeightPerTensorConst,
    "binary_per_channel_stats": SignedBinaryWeightPerChannelStats,
    "ternary_per_tensor": TernaryWeightPerTensorFloat,
}
#: 5 weight layers, 4 sign activations, 1 input quantizer.
EXPORTED_QUANT_NODES = {"binary": {"BipolarQuant": 9, "Quant": 1},
                        "ternary": {"BipolarQuant": 4, "Quant": 6}}
#: Layers fed by ±1 activations become XNOR-popcount only with binary weights.
STREAMLINED_MATMULS = {"binary": {"XnorPopcountMatMul": 4, "MatMul": 1},
                       "ternary": {"MatMul": 5}}


def bipolar_act(scale: float = 1.0) -> QuantIdentity:
    """Sign activation exported as BipolarQuant with the given scale (FINN wants 1)."""
    return QuantIdentity(act_quant=SignedBinaryActPerTensorConst, min_val=-scale,
                         max_val=scale, return_quant_tensor=True)


class TinyCNV(nn.Module):
    """FINN's CNV topology, shrunk: 3 binary convs (2 pooled), 2 binary FC layers."""

    def __init__(self, weight_quant=SignedBinaryWeightPerTensorConst, act_scale: float = 1.0):
        super().__init__()
        # Q1.7 input: 8-bit signed, scale 2^-7 (as brevitas_examples' CNV).
        self.inp = QuantIdentity(act_quant=Int8ActPerTensorFloatMinMaxInit, min_val=-1.0,
                                 max_val=1.0 - 2.0**-7, return_quant_tensor=True)
        layers, cin = [], IN_SHAPE[0]
        for cout, pool in [(16, False), (16, True), (32, True)]:
            layers += [QuantConv2d(cin, cout, 3, bias=False, weight_quant=weight_quant),
                       nn.BatchNorm2d(cout), bipolar_act(act_scale)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc1 = QuantLinear(32 * 2 * 2, 32, bias=False, weight_quant=weight_quant)
        self.bn1 = nn.BatchNorm1d(32)
        self.act1 = bipolar_act(act_scale)
        self.fc2 = QuantLinear(32, 10, bias=False, weight_quant=weight_quant)

    def forward(self, x):
        x = self.features(self.inp(x))
        x = self.act1(self.bn1(self.fc1(x.flatten(1))))
        return self.fc2(x)


def grid_inputs(n: int, seed: int) -> torch.Tensor:
    """Inputs on the 8-bit grid k/128: no sample sits on a rounding threshold."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (n, *IN_SHAPE), generator=g).float() / 128


def make_model(weight_quant=SignedBinaryWeightPerTensorConst, act_scale: float = 1.0,
               seed: int = 0) -> TinyCNV:
    """Random binary weights; BN statistics from data, then perturbed, so that every
    sign activation sees both signs (random statistics alone saturate the network)."""
    torch.manual_seed(seed)
    model = TinyCNV(weight_quant, act_scale)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None  # cumulative average over the calibration batches
        bn.weight.data.uniform_(-1.5, 1.5)  # negative gammas flip thresholds: keep some
        bn.bias.data.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(grid_inputs(32, seed=1000 + i))
    for bn in bns:
        bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
    return model.eval()


def export(model: nn.Module, path) -> tuple[np.ndarray, np.ndarray]:
    """Export with batch 1; return (inputs, PyTorch outputs) for NUM_SAMPLES samples."""
    x = grid_inputs(NUM_SAMPLES, seed=7)
    with torch.no_grad():
        y = model(x)
        export_qonnx(model, input_t=x[:1], export_path=str(path), dynamo=False)
    return x.numpy(), y.detach().numpy()


def run_qonnx(path, inputs: np.ndarray) -> np.ndarray:
    """qonnx cleanup + qonnx's reference executor, sample by sample (main env)."""
    model = cleanup_model(ModelWrapper(str(path)))
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    return np.concatenate([execute_onnx(model, {iname: inputs[i:i + 1]})[oname]
                           for i in range(inputs.shape[0])])


@pytest.fixture(scope="module")
def finn_python():
    """The FINN env's python (built on the first run; see docs/finn.md)."""
    return ensure_finn_env()


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    """One exported model per weight quantizer: {name: (path, inputs, expected)}."""
    out = {}
    for name, weight_quant in WEIGHT_QUANTS.items():
        path = tmp_path_factory.mktemp(f"cnv_{name}") / "cnv.onnx"
        out[name] = (path, *export(make_model(weight_quant), path))
    return out


def node_summary(path) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]


@pytest.mark.slow
@pytest.mark.parametrize("weight_quant", sorted(WEIGHT_QUANTS))
def test_export_is_finn_style_and_qonnx_reproduces_pytorch(exported_models, weight_quant):
    path, inputs, expected = exported_models[weight_quant]
    # A non-degenerate oracle: the samples' outputs differ from each other.
    assert len({tuple(row) for row in np.round(expected, 4)}) == NUM_SAMPLES
    nodes = node_summary(path)
    quant_domain = "qonnx.custom_op.general"
    for op, count in EXPORTED_QUANT_NODES[weight_quant.split("_")[0]].items():
        assert nodes.count((quant_domain, op)) == count, op
    assert not any(op == "IntQuant" for _, op in nodes)  # Quant, not IntQuant
    model = ModelWrapper(str(path))
    act_scales = [model.get_initializer(n.input[1]) for n in model.graph.node
                  if n.op_type == "BipolarQuant" and model.get_initializer(n.input[0]) is None]
    assert len(act_scales) == 4 and all(np.all(s == 1.0) for s in act_scales)
    np.testing.assert_allclose(run_qonnx(path, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("weight_quant", sorted(WEIGHT_QUANTS))
def test_finn_frontend_keeps_outputs(exported_models, weight_quant, finn_python):
    path, inputs, expected = exported_models[weight_quant]
    result = check_with_finn(path, inputs, expected, atol=ATOL, python=finn_python)
    assert result["ok"] and result["num_samples"] == NUM_SAMPLES
    for stage in ("qonnx", "converted", "streamlined"):
        assert result["stages"][stage]["max_abs_err"] <= ATOL, stage
    converted = result["stages"]["converted"]["op_types"]
    # ConvertQONNXtoFINN: input quantizer + 4 sign activations -> MultiThreshold.
    assert converted["MultiThreshold"] == 5
    assert not {"Quant", "BipolarQuant"} & set(converted)
    ops = result["stages"]["streamlined"]["op_types"]
    # Streamlining absorbs every BatchNorm into the thresholds and lowers the convs.
    assert ops["MultiThreshold"] == 5
    assert not {"BatchNormalization", "Conv", "Quant", "BipolarQuant"} & set(ops)
    # With binary weights the layers fed by bipolar activations become XNOR-popcount;
    # the first layer (8-bit input) stays a MatMul.
    for op, count in STREAMLINED_MATMULS[weight_quant.split("_")[0]].items():
        assert ops.get(op, 0) == count, op
    assert sum(ops.get(op, 0) for op in ("XnorPopcountMatMul", "MatMul")) == 5
    assert ops["Im2Col"] == 3
    saved = ModelWrapper(result["streamlined_model"])
    assert sum(n.op_type == "MultiThreshold" for n in saved.graph.node) == 5


@pytest.mark.slow
def test_finn_build_steps_map_the_cnv_into_one_dataflow_partition(exported_models, finn_python,
                                                                   tmp_path):
    """finn-plus' estimate-only build steps: the whole binary CNV in one partition (only
    the input Transpose outside), outputs unchanged after streamlining and partitioning,
    an estimate per layer. Its fc1 has a channel whose sign is constant (a popcount
    threshold below 0), which finn-plus' step_minimize_bit_width rejects unless the
    thresholds are clipped first (hardware_steps.step_clip_thresholds)."""
    path, inputs, expected = exported_models["binary_per_tensor_const"]
    result = check_with_finn(path, inputs, expected, atol=ATOL, python=finn_python,
                             dataflow=True, work_dir=tmp_path)
    flow = result["dataflow"]
    assert result["ok"] and not flow["problems"]
    assert flow["partitions"] == 1 and flow["outside"] == {"Transpose": 1}
    assert flow["steps"][-1] == "step_generate_estimate_reports"
    assert "step_clip_thresholds" in flow["steps"]
    for step in ("step_streamline", "step_create_dataflow_partition"):
        assert flow["stages"][step]["max_abs_err"] <= ATOL, step
    ops = flow["partition_op_types"]
    # 3 convs + 2 FC layers -> MVAU; 3 convs + 2 max-pools -> sliding windows; the input
    # quantizer -> one Thresholding layer.
    assert ops["MVAU_hls"] == 5 and ops["Pool_hls"] == 2
    assert ops["ConvolutionInputGenerator_rtl"] == 5
    assert ops["Thresholding_rtl"] == 1
    mvaus = {k: v for k, v in flow["estimates"].items() if k.startswith("MVAU")}
    assert len(mvaus) == 5 and all(v["LUT"] > 0 for v in mvaus.values())


@pytest.mark.slow
def test_finn_rejects_bipolar_activation_with_non_unit_scale(tmp_path, finn_python):
    """A bipolar activation of scale 0.5 is valid QONNX (qonnx reproduces PyTorch), but
    FINN's ConvertQONNXtoFINN accepts only scale-1 BipolarQuant activations."""
    path = tmp_path / "cnv_half.onnx"
    inputs, expected = export(make_model(act_scale=0.5), path)
    np.testing.assert_allclose(run_qonnx(path, inputs), expected, rtol=0, atol=1e-5)
    with pytest.raises(FinnCheckError, match="scaling must be 1") as info:
        check_with_finn(path, inputs, expected, atol=ATOL, python=finn_python)
    assert info.value.result["failed_stage"] == "converted"
    assert "ValueError" in info.value.result["error"]
    assert "ValueError" in info.value.stderr


@pytest.mark.slow
def test_finn_flags_intquant_left_unconverted(exported_models, tmp_path, finn_python):
    """IntQuant (qonnx's newer name for Quant) executes fine but FINN's frontend does not
    convert it to MultiThreshold: the check must fail, not pass silently."""
    path, inputs, expected = exported_models["binary_per_tensor_const"]
    model = onnx.load(str(path))
    renamed = 0
    for node in model.graph.node:
        if node.op_type == "Quant":
            node.op_type, renamed = "IntQuant", renamed + 1
    assert renamed == 1
    intquant = tmp_path / "cnv_intquant.onnx"
    onnx.save(model, str(intquant))
    with pytest.raises(FinnCheckError, match=r"nodes left .*IntQuant") as info:
        check_with_finn(intquant, inputs, expected, atol=ATOL, python=finn_python)
    # Outputs are still right: only the node-type check catches it.
    assert info.value.result["stages"]["streamlined"]["max_abs_err"] <= ATOL
    assert info.value.result["stages"]["streamlined"]["op_types"]["IntQuant"] == 1


@pytest.mark.slow
def test_finn_detects_changed_outputs(exported_models, finn_python):
    path, inputs, expected = exported_models["binary_per_tensor_const"]
    wrong = expected.copy()
    wrong[3, 2] += 0.5
    with pytest.raises(FinnCheckError, match="outputs changed, max abs error 0.5"):
        check_with_finn(path, inputs, wrong, atol=ATOL, python=finn_python)


# --- environment management (fast: the build is stubbed) -------------------------------

def test_ensure_finn_env_rebuilds_until_complete_and_prunes(tmp_path, monkeypatch):
    monkeypatch.delenv(lrfinn.PYTHON_ENV_VAR, raising=False)
    calls = []

    def fake_build(venv, base_python):
        calls.append(venv)
        shutil.rmtree(venv, ignore_errors=True)
        venv.mkdir(parents=True)
        if len(calls) == 1:
            raise FinnEnvError("pip failed")  # the marker is never written
        (venv / lrfinn._MARKER).write_text("{}")

    monkeypatch.setattr(lrfinn, "_build", fake_build)
    stale = tmp_path / "finn-venv-0123456789abcdef"
    stale.mkdir()
    with pytest.raises(FinnEnvError, match="pip failed"):
        ensure_finn_env(tmp_path)
    python = ensure_finn_env(tmp_path)  # retried: no marker after the failure
    assert len(calls) == 2
    assert python == lrfinn._venv_python(lrfinn.finn_env_dir(tmp_path))
    assert ensure_finn_env(tmp_path) == python and len(calls) == 2  # cached
    assert not stale.exists()
    assert [p.name for p in tmp_path.glob("finn-venv-*") if p.is_dir()] == \
        [python.parent.parent.name]


def test_env_key_follows_requirements_and_python(tmp_path, monkeypatch):
    a = lrfinn.finn_env_dir(tmp_path, (3, 11))
    assert lrfinn.finn_env_dir(tmp_path, (3, 12)) != a
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(lrfinn.REQUIREMENTS.read_text() + "extra==1\n")
    monkeypatch.setattr(lrfinn, "REQUIREMENTS", reqs)
    assert lrfinn.finn_env_dir(tmp_path, (3, 11)) != a


def test_finn_python_env_var_overrides(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv(lrfinn.PYTHON_ENV_VAR, str(fake))
    assert ensure_finn_env(tmp_path / "unused") == fake
    assert not (tmp_path / "unused").exists()
    monkeypatch.setenv(lrfinn.PYTHON_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FinnEnvError, match="not an existing file"):
        ensure_finn_env()
