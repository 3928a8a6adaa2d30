"""The dataflow check must not pass a float datapath. finn-plus maps float Mul / Add / Max into
FLOAT32 `Elementwise*_hls` layers, so a residual block that adds an unquantized BatchNorm
output reaches "one partition, outputs equal" too; the check lists the FLOAT32 layers (FINN's
own test) and fails on any that is not the input quantizer or the output scale. The same block
with both Add inputs ternary (the form a FINN ResNet needs, issue 13) passes it: an integer
ElementwiseAdd."""

import numpy as np
import pytest
import torch
from brevitas.nn import QuantConv2d, QuantIdentity
from brevitas.quant import Int8ActPerTensorFloatMinMaxInit, SignedBinaryWeightPerTensorConst
from torch import nn

from lr_quant.export import export_qonnx
from lr_quant.finn import FinnCheckError, check_with_finn, ensure_finn_env
from lr_quant.nn import StochasticTernarySign

SHAPE = (3, 8, 8)


def _conv(cin, cout, k, padding):
    return QuantConv2d(cin, cout, k, padding=padding, bias=False,
                       weight_quant=SignedBinaryWeightPerTensorConst)


class ResidualBlock(nn.Module):
    """int8 input -> stem conv -> BN -> ternary -> [conv -> BN -> conv -> BN (-> ternary)] +
    identity -> ternary (the output: the block alone, no head)."""

    def __init__(self, quantized_add: bool, c: int = 8):
        super().__init__()
        self.inp = QuantIdentity(act_quant=Int8ActPerTensorFloatMinMaxInit, min_val=-1.0,
                                 max_val=1.0 - 2.0**-7)
        self.stem, self.bn0, self.q0 = _conv(3, c, 3, 1), nn.BatchNorm2d(c), StochasticTernarySign(c)
        self.conv1, self.bn1, self.q1 = _conv(c, c, 3, 1), nn.BatchNorm2d(c), StochasticTernarySign(c)
        self.conv2, self.bn2 = _conv(c, c, 3, 1), nn.BatchNorm2d(c)
        self.q2 = StochasticTernarySign(c) if quantized_add else nn.Identity()
        self.qout = StochasticTernarySign(c)

    def forward(self, x):
        x = self.q0(self.bn0(self.stem(self.inp(x))))
        r = self.q2(self.bn2(self.conv2(self.q1(self.bn1(self.conv1(x))))))
        return self.qout(r + x)


def _calibrated(quantized_add: bool) -> nn.Module:
    """BatchNorm statistics and affine drawn around the data, thresholds at the data's
    tertiles nudged off the reachable integer sums (no rounding ties)."""
    torch.manual_seed(0)
    model = ResidualBlock(quantized_add).eval()

    def bn_hook(m, inp):
        m.running_mean.copy_(inp[0].mean((0, 2, 3)))
        m.running_var.copy_(inp[0].var((0, 2, 3)) + 1e-3)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.3, 0.3)

    def q_hook(m, inp):
        m.threshold_module.init_from_data(inp[0])
        with torch.no_grad():
            m.threshold_module.threshold.add_(0.0123)
            m.threshold_module.half_width.mul_(1.0317)

    hooks = [m.register_forward_pre_hook(bn_hook) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)]
    hooks += [m.register_forward_pre_hook(q_hook) for m in model.modules()
              if isinstance(m, StochasticTernarySign)]
    with torch.no_grad():
        model(_inputs(64, 1))
    for h in hooks:
        h.remove()
    return model


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (n, *SHAPE), generator=g).float() / 128


def _check(quantized_add: bool, tmp_path):
    model = _calibrated(quantized_add)
    x = _inputs(8, 7)
    with torch.no_grad():
        expected = model(x).numpy()
    assert len({tuple(r) for r in expected.reshape(len(x), -1)}) > 1   # not constant
    path = tmp_path / "block.onnx"
    export_qonnx(model, x[:1], path, check_inputs=[x[i:i + 1] for i in range(4)])
    return check_with_finn(path, x.numpy(), expected, atol=1e-3, dataflow=True,
                           python=ensure_finn_env(), work_dir=tmp_path / "finn")


@pytest.mark.slow
def test_an_unquantized_residual_add_is_a_float_datapath(tmp_path):
    with pytest.raises(FinnCheckError, match="float datapath inside the partition") as error:
        _check(quantized_add=False, tmp_path=tmp_path)
    flow = error.value.result["dataflow"]
    assert flow["partitions"] == 1   # what the check passed before: one partition ...
    for step in ("step_streamline", "step_create_dataflow_partition"):
        assert flow["stages"][step]["max_abs_err"] <= 1e-3   # ... and equal outputs
    inner = set(flow["float_nodes"]["float"]) - set(flow["float_nodes"]["allowed"])
    assert any(name.startswith("ElementwiseAdd") for name in inner)


@pytest.mark.slow
def test_a_residual_add_of_ternary_tensors_is_integer(tmp_path):
    flow = _check(quantized_add=True, tmp_path=tmp_path)["dataflow"]
    assert flow["partitions"] == 1 and not flow["problems"]
    ops = flow["partition_op_types"]
    assert any(k.startswith("ElementwiseAdd") for k in ops)
    assert any(k.startswith("DuplicateStreams") for k in ops)
    # float only where FINN expects it: the int8 input quantizer (reads the graph input)
    assert flow["float_nodes"]["float"]
    assert flow["float_nodes"]["float"] == flow["float_nodes"]["allowed"]
