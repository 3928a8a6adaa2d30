"""Tests of lr_quant.quant.activation: the stochastic sign quantizer inside Brevitas, export."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from brevitas.nn import QuantIdentity, QuantLinear
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
from brevitas.quant.binary import SignedBinaryWeightPerTensorConst

from lr_quant.functional.sign import ternary_sign
from lr_quant.moments import MomentTensor, has_moments
from lr_quant.nn.stochastic_sign import StochasticSign, StochasticTernarySign
from lr_quant.quant.activation import (
    ParamSchedule,
    StochasticBinaryQuant,
    StochasticSignActPerTensorConst,
    StochasticTernaryActPerTensorConst,
    StochasticTernaryQuant,
    ThresholdShift,
    attach_threshold,
    set_sign_noise_std,
    set_sign_temperature,
    unsigned_ternary_injector,
)

N = 120_000


def _tol(p, n=N, k=5.0):
    # binomial: std of a frequency of n draws is sqrt(p(1-p)/n) <= 0.5/sqrt(n) ~ 1.4e-3;
    # 5 std is ~7e-3, far below the O(0.1) errors of a wrong sigma / threshold / mode.
    return k * math.sqrt(max(p * (1 - p), 0.25 / n) / n)


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _calibrated_two_layer_net(act, first_bias=False):
    """act(16) -> binary QuantLinear -> BN -> act(12) -> binary QuantLinear, thresholds and
    BN statistics initialized by three training passes (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        act(16),
        QuantLinear(16, 12, bias=first_bias, weight_quant=SignedBinaryWeightPerTensorConst),
        nn.BatchNorm1d(12),
        act(12),
        QuantLinear(12, 5, bias=False, weight_quant=SignedBinaryWeightPerTensorConst))
    model.train()
    for _ in range(3):
        model(torch.randn(128, 16) + torch.linspace(-1, 1, 16))
    return model


def test_proxy_is_stock_and_export_metadata_is_bipolar_scale_one():
    q = QuantIdentity(act_quant=StochasticSignActPerTensorConst)
    assert type(q.act_quant) is ActQuantProxyFromInjector   # export handlers: exact class
    assert isinstance(q.act_quant.fused_activation_quant_proxy.tensor_quant, StochasticBinaryQuant)
    assert float(q.act_quant.scale()) == 1.0 and float(q.act_quant.bit_width()) == 1.0
    assert q.act_quant.is_signed and float(q.act_quant.zero_point()) == 0.0


def test_noise_mode_frequency_and_eval_determinism():
    q = QuantIdentity(act_quant=StochasticSignActPerTensorConst, sign_noise_std=0.5,
                      sign_propagate_moments=False)
    x = torch.tensor([-0.4, 0.0, 0.3, 1.0]).repeat(N, 1)
    q.train()
    y = q(x)
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    freq = (y > 0).double().mean(0)
    for f, xv in zip(freq.tolist(), [-0.4, 0.0, 0.3, 1.0]):
        p = _phi(xv / 0.5)
        assert abs(f - p) < _tol(p)
    q.eval()
    a, b = q(x[:4]), q(x[:4])
    assert torch.equal(a, b) and a[0].tolist() == [-1.0, 1.0, 1.0, 1.0]   # sign(0) = +1


def test_moment_mode_uses_input_moments_and_propagates_sign_moments():
    q = QuantIdentity(act_quant=StochasticSignActPerTensorConst, sign_noise_std=5.0)
    m = torch.tensor([0.3, -1.0, 2.0])
    v = torch.tensor([0.5, 2.0, 4.0])
    x = MomentTensor.from_moments(m.repeat(N, 1), v.repeat(N, 1))
    q.train()
    y = q(x)
    assert isinstance(y, MomentTensor) and has_moments(y)
    freq = (y.plain() > 0).double().mean(0)
    for f, mi, vi in zip(freq.tolist(), m.tolist(), v.tolist()):
        p = _phi(mi / math.sqrt(vi))   # not sigma_a = 5: the moments win in "auto" mode
        assert abs(f - p) < _tol(p)
    p = torch.tensor([_phi(mi / math.sqrt(vi)) for mi, vi in zip(m.tolist(), v.tolist())])
    assert torch.allclose(y.moment_mean[0], 2 * p - 1, atol=1e-5)
    assert torch.allclose(y.moment_var[0], 4 * p * (1 - p), atol=1e-5)
    # the sample follows the moments it carries
    emp = y.plain().double()
    assert torch.allclose(emp.mean(0), y.moment_mean[0].double(), atol=0.02)


def test_training_gradients_reach_input_threshold_and_sigma():
    s = StochasticSign(3, learn_noise_std=True, noise_std=0.8, temperature=0.7)
    x = torch.randn(256, 3, requires_grad=True)
    s.train()
    y = s(x)
    loss = (y * torch.linspace(-1, 1, 3)).sum()
    loss.backward()
    t = s.threshold_module.threshold
    for g in (x.grad, t.grad, s.sign_quant.noise_std.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # more input -> more +1: the pseudo-gradient of sum(y) w.r.t. x is positive
    x2 = torch.zeros(64, 3, requires_grad=True)
    s(x2).sum().backward()
    assert (x2.grad > 0).all()


def test_threshold_median_init_and_state_dict():
    torch.manual_seed(0)
    s = StochasticSign(4, noise_std=1e-3)
    x = torch.randn(1001, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    x = x + torch.tensor([5.0, -1.0, 0.0, 2.0])
    s.train()
    y = s(x)
    t = s.threshold_module.threshold.detach()
    assert torch.allclose(t, x.median(0).values)
    assert ((y > 0).float().mean(0) - 0.5).abs().max() < 0.01   # median: P(+1) = 1/2
    s2 = StochasticSign(4)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2.threshold_module.threshold, t) and bool(s2.threshold_module.initialized)
    s2.train()
    s2(x + 100.0)   # already initialized: not re-initialized
    assert torch.equal(s2.threshold_module.threshold.detach(), t)
    s2.threshold_module.reset()
    s2(x + 100.0)
    assert torch.allclose(s2.threshold_module.threshold.detach(), t + 100.0)
    # 4-d inputs: per-channel on dim 1
    c = StochasticSign(3).train()
    z = torch.randn(8, 3, 5, 5) + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    c(z)
    assert torch.allclose(c.threshold_module.threshold.detach(),
                          z.transpose(0, 1).reshape(3, -1).median(1).values)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="sigma"):
        StochasticSign(3, noise_std=-1.0)
    with pytest.raises(ValueError, match="tau"):
        StochasticSign(3, temperature=0.0)
    with pytest.raises(ValueError, match="sign_mode"):
        StochasticSign(3, mode="gumbel")
    s = StochasticSign(3)
    with pytest.raises(ValueError, match="tau"):
        s.set_temperature(-0.1)
    with pytest.raises(ValueError, match="sigma"):
        s.set_noise_std(float("nan"))
    with pytest.raises(ValueError, match="3 channels"):
        s.train()(torch.randn(4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        StochasticSign(2).train()(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="threshold_init"):
        ThresholdShift(3, threshold_init="quantile")
    with pytest.raises(ValueError, match="MomentTensor"):
        StochasticSign(3, mode="moment").train()(torch.randn(2, 3))


def test_schedules_and_model_setters():
    lin = ParamSchedule(1.0, 0.1, 10, "linear")
    cos = ParamSchedule(1.0, 0.1, 10, "cosine")
    exp = ParamSchedule(1.0, 0.01, 10, "exponential")
    assert lin(0) == 1.0 and math.isclose(lin(5), 0.55) and math.isclose(lin(99), 0.1)
    assert cos(0) == 1.0 and math.isclose(cos(5), 0.55) and math.isclose(cos(10), 0.1)
    assert math.isclose(exp(5), 0.1) and math.isclose(exp(10), 0.01)
    assert ParamSchedule(2.0, 0.0, 3, "constant")(2) == 2.0
    for bad in (dict(kind="step"), dict(steps=0)):
        with pytest.raises(ValueError):
            ParamSchedule(**{**dict(start=1.0, end=0.5, steps=5, kind="linear"), **bad})
    with pytest.raises(ValueError, match="exponential"):
        ParamSchedule(1.0, 0.0, 5, "exponential")
    model = nn.Sequential(StochasticSign(4), nn.Linear(4, 4), StochasticSign(4))
    assert set_sign_temperature(model, exp(3)) == 2 and set_sign_noise_std(model, 0.3) == 2
    assert math.isclose(float(model[2].sign_quant.temperature), exp(3), rel_tol=1e-6)
    assert math.isclose(float(model[0].sign_quant.noise_std), 0.3, rel_tol=1e-6)


def _export_and_run(model, x, path):
    from brevitas.export import export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    export_qonnx(model, x[:1], str(path), dynamo=False)
    wrapped = cleanup_model(ModelWrapper(str(path)))
    iname, oname = wrapped.graph.input[0].name, wrapped.graph.output[0].name
    out = np.concatenate(
        [execute_onnx(wrapped, {iname: x[i:i + 1].numpy()})[oname] for i in range(len(x))])
    return wrapped, out


def test_qonnx_export_bipolar_scale_one_with_thresholds(tmp_path):
    model = _calibrated_two_layer_net(StochasticSign, first_bias=True)
    with torch.no_grad():
        model[0].threshold_module.threshold.add_(0.05 * torch.randn(16))
    model.eval()
    x = torch.randn(24, 16) + torch.linspace(-1, 1, 16)
    x[0, :] = model[0].threshold_module.threshold.detach()   # exactly at threshold -> +1
    with torch.no_grad():
        ref = model(x).numpy()
        ref2 = model(x).numpy()
    assert np.array_equal(ref, ref2)
    wrapped, out = _export_and_run(model, x, tmp_path / "sign.onnx")
    ops = [n.op_type for n in wrapped.graph.node]
    assert ops.count("Sub") == 2, ops
    bipolar = [n for n in wrapped.graph.node if n.op_type == "BipolarQuant"]
    act_bipolar = [n for n in bipolar if wrapped.get_initializer(n.input[0]) is None]
    assert len(act_bipolar) == 2
    for n in act_bipolar:
        scale = wrapped.get_initializer(n.input[1])
        assert scale.size == 1 and float(scale.reshape(())) == 1.0   # FINN: scale 1 only
        # each activation BipolarQuant is fed by the threshold Sub
        assert wrapped.find_producer(n.input[0]).op_type == "Sub"
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_as_input_quant_of_a_brevitas_layer_with_attached_threshold(tmp_path):
    torch.manual_seed(1)
    layer = QuantLinear(8, 4, bias=False, input_quant=StochasticSignActPerTensorConst,
                        weight_quant=SignedBinaryWeightPerTensorConst)
    shift = attach_threshold(layer.input_quant, 8)
    assert any(p is shift.threshold for p in layer.parameters())
    layer.train()
    y = layer(torch.randn(64, 8) + 3.0)   # training: stochastic, threshold initialized
    assert torch.isfinite(y).all()
    assert torch.allclose(shift.threshold.detach(), torch.full((8,), 3.0), atol=0.5)
    layer.eval()
    x = torch.randn(10, 8) + 3.0
    with torch.no_grad():
        ref = layer(x).numpy()
    wrapped, out = _export_and_run(layer, x, tmp_path / "inq.onnx")
    assert "Sub" in [n.op_type for n in wrapped.graph.node]
    assert np.abs(out - ref).max() <= 1e-5


def test_loading_an_uninitialized_threshold_re_arms_the_data_init():
    a = StochasticSign(2).train()
    a(torch.randn(16, 2))
    fresh = StochasticSign(2)
    a.load_state_dict(fresh.state_dict())   # initialized=False again
    x = torch.randn(33, 2) + 7.0
    a(x)
    assert torch.allclose(a.threshold_module.threshold.detach(), x.median(0).values)


@pytest.mark.slow
@pytest.mark.parametrize("act,matmul", [(StochasticSign, "XnorPopcountMatMul"),
                                        (StochasticTernarySign, "MatMul")], ids=["A1", "A2"])
def test_finn_frontend_absorbs_the_thresholds_and_keeps_outputs(tmp_path, act, matmul):
    """FINN (finn-plus, own venv): ConvertQONNXtoFINN + BNN streamlining turn each
    Sub -> BipolarQuant (sign) or Sub -> Mul -> Quant(2 bit) (ternary) into a MultiThreshold
    (Sub and Mul absorbed) and keep the outputs; binary x binary becomes XNOR-popcount."""
    from brevitas.export import export_qonnx
    from lr_quant.finn import check_with_finn

    model = _calibrated_two_layer_net(act).eval()
    x = torch.randn(20, 16) + torch.linspace(-1, 1, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    path = tmp_path / "act_finn.onnx"
    export_qonnx(model, x[:1], str(path), dynamo=False)
    result = check_with_finn(path, x.numpy(), ref, atol=1e-4)
    ops = result["stages"]["streamlined"]["op_types"]
    assert not {"Sub", "BipolarQuant", "Quant"} & set(ops), ops
    assert ops.get("MultiThreshold", 0) == 2 and ops.get(matmul, 0) == 2, ops
    for stage in ("qonnx", "converted", "streamlined"):
        assert result["stages"][stage]["max_abs_err"] <= 1e-4


def test_layerwise_quantize_with_a_stochastic_sign_input_quant():
    """Brevitas' layerwise_quantize loads the float state strictly under
    IGNORE_MISSING_KEYS: the sign quantizer's own buffers must not fail that load."""
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas import config

    from lr_quant.nn import LRQuantLinear
    from lr_quant.quant.activation import StochasticSignActPerTensorConst

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    layer_map = {nn.Linear: (LRQuantLinear, {"input_quant": StochasticSignActPerTensorConst,
                                             "return_quant_tensor": False})}
    converted = layerwise_quantize(model, compute_layer_map=layer_map)
    assert isinstance(converted[2], LRQuantLinear)
    assert not config.IGNORE_MISSING_KEYS  # restored by Brevitas afterwards
    # outside that context a strict load still reports missing keys
    with pytest.raises(RuntimeError, match="Missing key"):
        converted[2].load_state_dict({"weight": torch.randn(2, 3), "bias": torch.zeros(2)})


def test_attached_threshold_survives_a_state_dict_load():
    """Brevitas rebuilds an act proxy from its injector when a state dict loads: the
    threshold attached to a layer's input_quant must stay the same module and parameter
    (an optimizer holding it keeps working) and receive the loaded values."""
    from lr_quant.nn import LRQuantLinear
    from lr_quant.quant.activation import StochasticSignActPerTensorConst, attach_threshold

    def build():
        layer = LRQuantLinear(4, 3, input_quant=StochasticSignActPerTensorConst)
        return layer, attach_threshold(layer.input_quant, 4, threshold_channel_dim=-1)

    source, source_shift = build()
    with torch.no_grad():
        source_shift.threshold.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
    target, target_shift = build()
    param = target_shift.threshold
    target.load_state_dict(source.state_dict(), strict=True)
    shift = target.input_quant.fused_activation_quant_proxy.activation_impl
    assert shift is target_shift and shift.threshold is param
    torch.testing.assert_close(param, source_shift.threshold)


# -- ternary activations ---------------------------------------------------------------


def _ternary_probs_x(m, s, c, t):
    """(P(-1), P(0), P(+1)) of y = ternary(x) with thresholds c -+ t, x ~ N(m, s^2)."""
    p_plus = 1 - _phi((c + t - m) / s)
    p_minus = _phi((c - t - m) / s)
    return p_minus, 1 - p_plus - p_minus, p_plus


def _set_ternary(layer, centre, half):
    with torch.no_grad():
        layer.threshold_module.threshold.copy_(torch.tensor(centre))
        layer.threshold_module.half_width.copy_(torch.tensor(half))
        layer.threshold_module.initialized.fill_(True)


def test_ternary_proxy_is_stock_and_export_metadata_is_2bit_narrow_scale_one():
    q = QuantIdentity(act_quant=StochasticTernaryActPerTensorConst)
    assert type(q.act_quant) is ActQuantProxyFromInjector
    assert isinstance(q.act_quant.fused_activation_quant_proxy.tensor_quant, StochasticTernaryQuant)
    assert float(q.act_quant.scale()) == 1.0 and float(q.act_quant.bit_width()) == 2.0
    assert q.act_quant.is_signed and q.act_quant.is_narrow_range
    assert q.act_quant.rounding_mode == "ROUND" and float(q.act_quant.zero_point()) == 0.0
    # eval is Brevitas' own ternary activation quantizer (round half to even, clip to +-1)
    from brevitas.quant.ternary import SignedTernaryActPerTensorConst
    stock = QuantIdentity(act_quant=SignedTernaryActPerTensorConst).eval()
    x = torch.cat([torch.randn(1000) * 2, torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5])])
    assert torch.equal(q.eval()(x), stock(x))


def test_ternary_noise_mode_frequencies_match_phi_in_input_units():
    """Noise mode reads the normalized input u = (x - c)/(2t) as u + N(0, sigma_a^2): in the
    input's units the noise std is 2 t sigma_a and the thresholds are c -+ t."""
    layer = StochasticTernarySign(3, noise_std=0.4, propagate_moments=False)
    centre, half = [0.0, 1.0, -0.5], [0.5, 0.25, 1.0]
    _set_ternary(layer, centre, half)
    xs = [0.3, 1.4, -2.0]
    layer.train()
    y = layer(torch.tensor(xs).repeat(N, 1))
    assert set(y.unique().tolist()) <= {-1.0, 0.0, 1.0}
    for k in range(3):
        probs = _ternary_probs_x(xs[k], 2 * half[k] * 0.4, centre[k], half[k])
        for value, p in zip((-1.0, 0.0, 1.0), probs):
            f = (y[:, k] == value).double().mean().item()
            assert abs(f - p) < _tol(p), (k, value, f, p)


def test_ternary_moment_mode_probabilities_and_propagated_moments():
    layer = StochasticTernarySign(2, noise_std=5.0)
    centre, half = [0.2, -1.0], [0.6, 0.3]
    _set_ternary(layer, centre, half)
    m, v = torch.tensor([0.5, -0.2]), torch.tensor([0.8, 2.5])
    x = MomentTensor.from_moments(m.repeat(N, 1), v.repeat(N, 1))
    layer.train()
    y = layer(x)
    assert isinstance(y, MomentTensor) and has_moments(y)
    sample = y.plain().double()
    for k in range(2):
        probs = _ternary_probs_x(m[k].item(), math.sqrt(v[k].item()), centre[k], half[k])
        for value, p in zip((-1.0, 0.0, 1.0), probs):
            f = (sample[:, k] == value).double().mean().item()
            assert abs(f - p) < _tol(p), (k, value, f, p)   # the moments win over sigma_a
        mean = probs[2] - probs[0]
        var = sum(p * (val - mean) ** 2 for p, val in zip(probs, (-1.0, 0.0, 1.0)))
        assert y.moment_mean[0, k].item() == pytest.approx(mean, abs=1e-5)
        assert y.moment_var[0, k].item() == pytest.approx(var, abs=1e-5)
        assert abs(sample[:, k].mean().item() - mean) < 5 * math.sqrt(var / N)   # Monte Carlo


def test_ternary_moment_gradients_match_finite_differences():
    """d E[y] / d(m, v, c, t) through the propagated moments equals finite differences of
    the closed form E[y] = Phi((m - c - t)/s) - Phi((c - t - m)/s) (float64)."""
    layer = StochasticTernarySign(1).double()
    _set_ternary(layer, [0.3], [0.4])
    m = torch.tensor([[0.1]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[0.7]], dtype=torch.float64, requires_grad=True)
    layer.train()
    y = layer(MomentTensor.from_moments(m, v))
    th = layer.threshold_module
    grads = torch.autograd.grad(y.moment_mean.sum(), (m, v, th.threshold, th.half_width))

    def expected(mv, vv, cv, tv):
        s = math.sqrt(vv + layer.sign_quant.eps * (2 * tv) ** 2)
        return (1 - _phi((cv + tv - mv) / s)) - _phi((cv - tv - mv) / s)

    point, h = [0.1, 0.7, 0.3, 0.4], 1e-6
    for k, g in enumerate(grads):
        hi, lo = list(point), list(point)
        hi[k] += h
        lo[k] -= h
        fd = (expected(*hi) - expected(*lo)) / (2 * h)
        assert g.item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (k, g.item(), fd)


def test_ternary_eval_is_deterministic_and_matches_the_thresholds():
    layer = StochasticTernarySign(2)
    _set_ternary(layer, [0.0, 1.0], [0.25, 0.5])   # 0.5 / t = 2 and 1: exact in float
    layer.eval()
    x = torch.tensor([[-0.25, 0.5], [0.25, 1.5], [0.2500001, 1.5000001], [-0.2500001, 0.4999999],
                      [0.0, 1.0]])
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    # on a threshold (|x - c| == t) the value is 0, beyond it +-1
    assert a.tolist() == [[0, -0], [0, 0], [1, 1], [-1, -1], [0, 0]]
    torch.testing.assert_close(a, ternary_sign(x - torch.tensor([0.0, 1.0]),
                                               torch.tensor([0.25, 0.5])))


def test_ternary_layer_bad_inputs_and_setters():
    with pytest.raises(ValueError, match="sigma"):
        StochasticTernarySign(3, noise_std=0.0)
    with pytest.raises(ValueError, match="sign_mode"):
        StochasticTernarySign(3, mode="soft")
    with pytest.raises(ValueError, match="MomentTensor"):
        StochasticTernarySign(3, mode="moment").train()(torch.randn(2, 3))
    model = nn.Sequential(StochasticSign(4), StochasticTernarySign(4))
    assert set_sign_temperature(model, 0.3) == 2 and set_sign_noise_std(model, 0.2) == 2
    fixed = StochasticTernarySign(threshold=False).eval()   # thresholds +-1/2: clip(round(x))
    assert fixed.threshold_module is None
    x = torch.tensor([-2.0, -0.5, -0.49, 0.5, 0.51, 1.5])
    assert fixed(x).tolist() == [-1, 0, 0, 0, 1, 1]
    assert math.isclose(float(model[1].sign_quant.temperature), 0.3, rel_tol=1e-6)


def test_ternary_qonnx_export_sub_mul_quant_and_exact_thresholds(tmp_path):
    """Export: Sub(c) -> Mul(0.5/t) -> Quant(scale 1, 2 bit, narrow, signed, ROUND); qonnx
    execution equals PyTorch exactly, also for inputs exactly on the thresholds."""
    model = _calibrated_two_layer_net(StochasticTernarySign, first_bias=True)
    with torch.no_grad():   # dyadic c, power-of-two t: x = c -+ t gives u = -+0.5 exactly
        model[0].threshold_module.half_width.copy_(2.0 ** torch.randint(-3, 1, (16,)).float())
        centre = model[0].threshold_module.threshold
        centre.copy_(torch.round(centre * 8) / 8)
    model.eval()
    c = model[0].threshold_module.threshold.detach()
    t = model[0].threshold_module.half_width.detach()
    x = torch.randn(24, 16) + torch.linspace(-1, 1, 16)
    x[0], x[1] = c + t, c - t
    with torch.no_grad():
        ref = model(x).numpy()
        hidden = model[0](x)
    assert (hidden[:2] == 0).all()
    wrapped, out = _export_and_run(model, x, tmp_path / "ternary.onnx")
    ops = [n.op_type for n in wrapped.graph.node]
    assert ops.count("Sub") == 2 and "Clip" not in ops, ops   # the scale folds to a constant
    quant = [n for n in wrapped.graph.node if n.op_type == "Quant"]
    assert len(quant) == 2
    for n in quant:
        attrs = {a.name: a.i for a in n.attribute if a.type == a.INT}
        assert attrs["narrow"] == 1 and attrs["signed"] == 1
        assert [float(wrapped.get_initializer(n.input[k]).reshape(-1)[0]) for k in (1, 2, 3)] \
            == [1.0, 0.0, 2.0]
        mul = wrapped.find_producer(n.input[0])
        assert mul.op_type == "Mul" and wrapped.find_producer(mul.input[0]).op_type == "Sub"
    assert np.array_equal(out, ref) or np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_ternary_standalone_layer_keeps_its_threshold_through_a_state_dict_load():
    """Brevitas rebuilds the act proxy from its injector on load: the layer's threshold
    module (and its parameters, held by an optimizer) must stay the same objects."""
    for cls in (StochasticSign, StochasticTernarySign):
        source, target = cls(3).train(), cls(3)
        source(torch.randn(50, 3) + 2.0)
        module, params = target.threshold_module, list(target.parameters())
        target.load_state_dict(source.state_dict(), strict=True)
        assert target.threshold_module is module
        assert all(a is b for a, b in zip(params, target.parameters()))
        for a, b in zip(source.threshold_module.parameters(), module.parameters()):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["stochastic_ternary", "ste_ternary"])
def test_unsigned_ternary_is_the_signed_ternary_plus_one(name, tmp_path):
    """The FINN form's quantizer before a padded max-pool: same thresholds, values {0, 1, 2}
    = the signed ternary + 1, in training (same random draws; noise and moment mode, moments
    shifted) and in eval; exported as Quant(scale 1, 2 bit, narrow, unsigned), executed by
    qonnx exactly as PyTorch."""
    from lr_quant.quant.threshold import UnsignedTernaryThreshold, attach_threshold
    from lr_quant.registry import get_act_quantizer

    act = get_act_quantizer(name)
    signed = QuantIdentity(act_quant=act.injector, return_quant_tensor=False)
    unsigned = QuantIdentity(act_quant=unsigned_ternary_injector(act.injector),
                             return_quant_tensor=False)
    attach_threshold(signed.act_quant, 3, 1, threshold_class=act.threshold)
    attach_threshold(unsigned.act_quant, 3, 1, threshold_class=UnsignedTernaryThreshold)
    centre, half = torch.tensor([0.0, 1.0, -0.5]), torch.tensor([0.5, 0.25, 1.0])
    for q in (signed, unsigned):
        th = q.act_quant.fused_activation_quant_proxy.activation_impl
        with torch.no_grad():
            th.threshold.copy_(centre)
            th.half_width.copy_(half)
            th.initialized.fill_(True)
    assert float(unsigned.act_quant.scale()) == 1.0 and float(unsigned.act_quant.bit_width()) == 2
    assert not unsigned.act_quant.is_signed and unsigned.act_quant.is_narrow_range
    x = torch.randn(64, 3, 4, 4) * 2
    moments = MomentTensor.from_moments(x, torch.rand_like(x) + 0.1)
    signed.train(), unsigned.train()
    for inp in (x, moments):
        torch.manual_seed(1)
        ys = signed(inp)
        torch.manual_seed(1)
        yu = unsigned(inp)
        assert torch.equal(torch.as_tensor(yu).detach(), torch.as_tensor(ys).detach() + 1)
        assert set(torch.as_tensor(yu).unique().tolist()) <= {0.0, 1.0, 2.0}
        if has_moments(ys):
            torch.testing.assert_close(yu.moment_mean, ys.moment_mean + 1)
            torch.testing.assert_close(yu.moment_var, ys.moment_var)
    signed.eval(), unsigned.eval()
    assert torch.equal(unsigned(x), signed(x) + 1)
    wrapped, out = _export_and_run(nn.Sequential(unsigned).eval(), x[:4], tmp_path / "u.onnx")
    quant = [n for n in wrapped.graph.node if n.op_type == "Quant"]
    attrs = {a.name: a.i for a in quant[0].attribute if a.type == a.INT}
    assert len(quant) == 1 and attrs["signed"] == 0 and attrs["narrow"] == 1
    np.testing.assert_array_equal(out, unsigned(x[:4]).detach().numpy())


def test_unsigned_ternary_refuses_a_quantizer_that_is_not_ternary():
    with pytest.raises(TypeError, match="not a 2-bit narrow ternary"):
        unsigned_ternary_injector(StochasticSignActPerTensorConst)


@pytest.mark.parametrize("injector", [StochasticSignActPerTensorConst,
                                      StochasticTernaryActPerTensorConst])
def test_constant_scale_one_skips_the_multiply_and_other_scales_still_apply(injector):
    """Scale 1 (the FINN form): the training output is the quantizer's own draw, unscaled (a
    multiply by 1 would copy sample, mean and variance: three passes, and a second copy of
    E[y] kept by the next layer). A constant scale 2 quantizes x / 2 (ternary; the sign is
    scale invariant) and gives 2x the sample and mean, 4x the variance, from the same draw."""
    m = 3.0 * torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    v = torch.rand(64, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    outputs = {}
    for scale in (1.0, 2.0):
        quant = QuantIdentity(act_quant=injector.let(min_val=-scale, max_val=scale),
                              return_quant_tensor=False)
        quant.train()
        tensor_quant = quant.act_quant.fused_activation_quant_proxy.tensor_quant
        drawn, returned = [], []
        draw = tensor_quant._training_sample
        tensor_quant._training_sample = lambda t: drawn.append(draw(t)) or drawn[-1]
        hook = tensor_quant.register_forward_hook(lambda mod, a, out: returned.append(out[0]))
        torch.manual_seed(2)
        x = MomentTensor.from_moments(m.clone(), v.clone(), sample=m.clone())
        outputs[scale] = quant(x)
        hook.remove()
        assert isinstance(outputs[scale], MomentTensor) and has_moments(outputs[scale])
        # scale 1: what the quantizer returns is its draw itself, not a product with 1
        assert (returned[0] is drawn[0]) == (scale == 1.0)
    # the oracle: the unit quantizer on x / 2, times 2 (sign: on x, times 2)
    quant = QuantIdentity(act_quant=injector, return_quant_tensor=False)
    quant.train()
    divisor = 1.0 if injector is StochasticSignActPerTensorConst else 2.0
    torch.manual_seed(2)
    x = MomentTensor.from_moments(m / divisor, v / divisor ** 2, sample=m / divisor)
    reference = quant(x)
    scaled = outputs[2.0]
    torch.testing.assert_close(scaled.plain(), 2.0 * reference.plain())
    torch.testing.assert_close(scaled.moment_mean, 2.0 * reference.moment_mean)
    torch.testing.assert_close(scaled.moment_var, 4.0 * reference.moment_var)
