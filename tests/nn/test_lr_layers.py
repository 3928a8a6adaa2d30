"""LR Brevitas layers: LR forward in train(), plain Brevitas layer in eval(), loading, freezing."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from brevitas.graph.quantize import layerwise_quantize
from brevitas.nn import QuantConv2d, QuantLinear
from brevitas.quant import Int8WeightPerTensorFloat
from torch import nn

from lr_quant import freeze, is_frozen, unfreeze
from lr_quant.nn import (LRQuantConv1d, LRQuantConv2d, LRQuantLinear, lr_layers,
                         lr_regularization)
from lr_quant.quant import (LRBinaryWeightPerChannelFloat, LRBinaryWeightPerTensorConst,
                            LRTernaryWeightPerChannelFloat, LRTernaryWeightPerTensorConst,
                            lr_weight_quant)

QUANTS = [
    LRBinaryWeightPerTensorConst,
    LRBinaryWeightPerChannelFloat,
    LRTernaryWeightPerTensorConst,
    LRTernaryWeightPerChannelFloat,
    lr_weight_quant({"name": "categorical", "values": (-2, -1, 0, 1, 2)}, per_channel_scale=True),
]
QUANT_IDS = ["bin", "bin-pc", "ter", "ter-pc", "quinary-pc"]


def reference_moments(layer, x, op):
    """Mean/var of op(x, w) for w ~ the layer's distribution, computed from probabilities."""
    dist = layer.lr_distribution
    p = dist.probabilities(layer.weight_logits.detach().double())
    values = torch.tensor(dist.values, dtype=torch.float64).view(-1, *[1] * (p.dim() - 1))
    mean = (p * values).sum(0)
    var = (p * (values - mean) ** 2).sum(0)
    scale = (layer.quant_weight().scale.detach().double() / layer.lr_unit)
    bias = None if layer.bias is None else layer.bias.detach().double()
    m = op(x.double(), mean * scale, bias)
    v = op(x.double() ** 2, var * scale ** 2, None)
    return m, v


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("kind", ["linear", "conv-reflect-strided", "depthwise", "conv1d"])
def test_train_forward_is_the_lr_gaussian(quant, kind):
    """Over 3000 draws (batch rows share the input), the output is N(m, v)."""
    torch.manual_seed(0)
    n = 3000
    if kind == "linear":
        layer = LRQuantLinear(7, 5, weight_quant=quant)
        x = torch.randn(1, 7)
        op = F.linear
    elif kind == "conv-reflect-strided":
        layer = LRQuantConv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect", weight_quant=quant)
        x = torch.randn(1, 3, 5, 5)
        op = lambda a, w, b: F.conv2d(F.pad(a, (1, 1, 1, 1), mode="reflect"), w, b, stride=2)
    elif kind == "depthwise":
        layer = LRQuantConv2d(4, 4, 3, padding=1, groups=4, weight_quant=quant)
        x = torch.randn(1, 4, 4, 4)
        op = lambda a, w, b: F.conv2d(a, w, b, padding=1, groups=4)
    else:
        layer = LRQuantConv1d(3, 4, 3, dilation=2, padding=2, weight_quant=quant)
        x = torch.randn(1, 3, 6)
        op = lambda a, w, b: F.conv1d(a, w, b, padding=2, dilation=2)
    with torch.no_grad():
        layer.weight_logits.normal_(0, 1.5)
        if layer.bias is not None:
            layer.bias.normal_()
    layer.train()
    with torch.no_grad():
        z = layer(x.expand(n, *x.shape[1:])).double()
    m, v = reference_moments(layer, x, op)
    v = v + layer.lr_eps
    assert ((z.mean(0) - m[0]).abs() / (v[0] / n).sqrt()).max() < 5
    assert ((z.var(0) / v[0]) - 1).abs().max() < 6 * (2 / n) ** 0.5
    # rows are independent draws (one noise per output element)
    assert z[0].ne(z[1]).all()


def exact_expected_loss(w_probs, values, x, bias, scale, target):
    """E[(x.w * s + b - t)^2] by enumerating every discrete weight configuration."""
    total = 0.0
    k = len(values)
    for config in itertools.product(range(k), repeat=x.numel()):
        prob = 1.0
        w = torch.zeros(x.numel(), dtype=torch.float64)
        for i, c in enumerate(config):
            prob = prob * w_probs[c, i]
            w[i] = values[c]
        total = total + prob * ((x @ w) * scale + bias - target) ** 2
    return total


@pytest.mark.parametrize("quant", [LRBinaryWeightPerChannelFloat, LRTernaryWeightPerChannelFloat],
                         ids=["bin", "ter"])
def test_gradients_match_finite_differences_of_the_expected_loss(quant):
    """LR gradient (averaged over 40k noise draws) vs finite differences of the exact
    expected loss over all discrete weights, for every logit, the bias and the scale.
    For a squared loss E[L] depends only on (m, v), so LR is unbiased here."""
    torch.manual_seed(0)
    layer = LRQuantLinear(3, 1, weight_quant=quant).double()
    with torch.no_grad():
        layer.weight_logits.normal_(0, 1.0)
    scale_param = layer.get_parameter(layer._scale_parameter_name())
    x = torch.tensor([[0.7, -1.2, 0.4]], dtype=torch.float64)
    target = 0.3
    n = 40_000
    layer.train()
    loss = ((layer(x.expand(n, 3)) - target) ** 2).mean()
    loss.backward()
    assert torch.isfinite(layer.weight_logits.grad).all()
    assert (layer.weight_logits.grad != 0).all(), "every logit must get a gradient"

    dist = layer.lr_distribution

    def expected(logits, bias, scale):
        return exact_expected_loss(dist.probabilities(logits).reshape(dist.num_values, -1),
                                   dist.values, x[0], bias, scale, target)

    params = [layer.weight_logits, layer.bias, scale_param]
    base = [p.detach().clone() for p in params]
    h = 1e-5
    for which, param in enumerate(params):
        fd = torch.zeros_like(param)
        for idx in itertools.product(*[range(s) for s in param.shape]):
            values = []
            for sign in (1, -1):
                args = [b.clone() for b in base]
                args[which][idx] += sign * h
                values.append(expected(args[0], args[1][0], args[2].reshape(()).abs()))
            fd[idx] = (values[0] - values[1]) / (2 * h)
        torch.testing.assert_close(param.grad, fd, atol=0.03 * fd.abs().max(), rtol=0.05)


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_eval_equals_stock_brevitas_layer_with_frozen_weights(quant):
    torch.manual_seed(0)
    layer = LRQuantConv2d(3, 6, 3, padding=1, weight_quant=quant)
    with torch.no_grad():
        layer.weight_logits.normal_(0, 2.0)
    layer.eval()
    stock = QuantConv2d(3, 6, 3, padding=1, weight_quant=quant)
    state = {k: v for k, v in layer.state_dict().items() if k not in ("weight_logits", "lr_frozen")}
    stock.load_state_dict(state)
    stock.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, stock(x), rtol=0, atol=0)
        # and both equal a float conv with mode(logits) * alpha, computed independently
        mode = layer.lr_distribution.mode(layer.weight_logits)
        alpha = layer.quant_weight().scale / layer.lr_unit
        torch.testing.assert_close(out, F.conv2d(x, mode * alpha, layer.bias, padding=1))
    assert set((layer.weight / alpha).round().unique().tolist()) <= set(layer.lr_distribution.values)


def test_eval_follows_logits_updated_in_eval_mode():
    layer = LRQuantLinear(4, 3).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        layer.weight_logits.neg_()
        torch.testing.assert_close(layer(x), F.linear(x, layer.lr_distribution.mode(layer.weight_logits), layer.bias))


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_from_float_initializes_from_pretrained_weights(quant):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=True)
    layer = LRQuantConv2d.from_float(conv, weight_quant=quant)
    w = conv.weight.detach().double()
    normalized = (w / w.std()).clamp(layer.lr_distribution.values[0], layer.lr_distribution.values[-1])
    mean = layer.lr_distribution.mean(layer.weight_logits.detach().double())
    # E[w] follows the normalized pretrained weight: same sign, strong correlation
    corr = torch.corrcoef(torch.stack([mean.flatten(), normalized.flatten()]))[0, 1]
    assert corr > 0.95
    torch.testing.assert_close(layer.bias, conv.bias)
    if layer._scale_parameter_name():
        alpha = layer.quant_weight().scale.flatten() / layer.lr_unit
        torch.testing.assert_close(alpha, conv.weight.detach().abs().mean(dim=(1, 2, 3)))


def test_float_state_dict_and_meta_device_loading_through_brevitas_layerwise_quantize():
    """layerwise_quantize builds on meta and loads with assign=True: logits come from the
    float weights, exactly as from_float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    reference = LRQuantLinear.from_float(model[0], weight_quant=LRTernaryWeightPerChannelFloat)
    layer_map = {nn.Linear: (LRQuantLinear, {"weight_quant": LRTernaryWeightPerChannelFloat,
                                             "return_quant_tensor": False})}
    converted = layerwise_quantize(model, compute_layer_map=layer_map)
    assert isinstance(converted[0], LRQuantLinear) and isinstance(converted[2], LRQuantLinear)
    torch.testing.assert_close(converted[0].weight_logits, reference.weight_logits)
    torch.testing.assert_close(converted[0].weight, reference.weight)
    x = torch.randn(4, 6)
    converted.eval()
    reference.eval()
    torch.testing.assert_close(converted[0](x), reference(x))
    assert all(not p.is_meta for p in converted.parameters())


def test_lr_state_dict_round_trip_and_strict_float_loading():
    src = LRQuantLinear(4, 3, weight_quant=LRTernaryWeightPerChannelFloat)
    dst = LRQuantLinear(4, 3, weight_quant=LRTernaryWeightPerChannelFloat)
    dst.load_state_dict(src.state_dict())
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # a float checkpoint loads strictly (extra LR state is derived from it)
    fl = nn.Linear(4, 3)
    dst.load_state_dict(fl.state_dict(), strict=True)
    torch.testing.assert_close(dst.bias, fl.bias)


def test_freeze_mode_and_sample():
    torch.manual_seed(0)
    model = nn.Sequential(LRQuantLinear(8, 6, weight_quant=LRTernaryWeightPerTensorConst),
                          nn.BatchNorm1d(6), LRQuantLinear(6, 3))
    x = torch.randn(16, 8)
    freeze(model)
    assert is_frozen(model)
    model.train()  # frozen layers are deterministic in train() too (BN re-estimation)
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    for _, layer in lr_layers(model):
        torch.testing.assert_close(layer.weight, layer.lr_distribution.mode(layer.weight_logits))

    freeze(model, "sample", seed=1)
    first = [layer.weight.clone() for _, layer in lr_layers(model)]
    freeze(model, "sample", seed=1)
    second = [layer.weight.clone() for _, layer in lr_layers(model)]
    freeze(model, "sample", seed=2)
    third = [layer.weight.clone() for _, layer in lr_layers(model)]
    for f, s, t in zip(first, second, third):
        torch.testing.assert_close(f, s)
    assert any(not torch.equal(f, t) for f, t in zip(first, third))
    # a sample is a valid discrete network, kept through eval()
    model.eval()
    torch.testing.assert_close(lr_layers(model)[0][1].weight, third[0])

    unfreeze(model)
    model.train()
    assert not is_frozen(model)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # stochastic again


def test_frozen_flag_survives_state_dict():
    a = LRQuantLinear(4, 3)
    freeze(a, "sample", seed=0)
    b = LRQuantLinear(4, 3)
    b.load_state_dict(a.state_dict())
    assert b.is_lr_frozen
    torch.testing.assert_close(b.weight, a.weight)


def test_regularization_sums_layers():
    model = nn.Sequential(LRQuantLinear(4, 3), nn.ReLU(), LRQuantLinear(3, 2, weight_quant=LRTernaryWeightPerTensorConst))
    expected = sum(layer.lr_distribution.regularizer(layer.weight_logits) for _, layer in lr_layers(model))
    torch.testing.assert_close(lr_regularization(model), expected)
    lr_regularization(model).backward()
    assert all(layer.weight_logits.grad is not None for _, layer in lr_layers(model))
    model[0].clamp_logits_(0.1)
    assert model[0].weight_logits.abs().max() <= 0.1


# -- bad input ------------------------------------------------------------------------------

def test_bad_construction():
    with pytest.raises(ValueError, match="needs an LR weight quantizer"):
        LRQuantLinear(4, 3, weight_quant=None)
    with pytest.raises(TypeError, match="not an LR weight quantizer"):
        LRQuantLinear(4, 3, weight_quant=Int8WeightPerTensorFloat)
    with pytest.raises(ValueError, match="p_min"):
        LRQuantLinear(4, 3, lr_p_min=0.9, lr_p_max=0.1)
    with pytest.raises(ValueError, match="lr_eps"):
        LRQuantLinear(4, 3, lr_eps=-1.0)
    with pytest.raises(TypeError, match="expects a Conv2d, got Linear"):
        LRQuantConv2d.from_float(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="freeze how='median'"):
        freeze(nn.Sequential(LRQuantLinear(2, 2)), "median")
    with pytest.raises(ValueError, match="has no LR layers"):
        freeze(nn.Linear(2, 2))


def test_mismatched_checkpoint_shapes_are_reported():
    layer = LRQuantLinear(4, 3)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(nn.Linear(5, 3).state_dict())


def test_non_finite_pretrained_weights_are_rejected():
    conv = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        LRQuantConv2d.from_float(conv)


# -- Gaussian moments in and out (lr_quant.moments) -----------------------------------------

def test_moment_tensor_input_and_output():
    """A MomentTensor input adds op(v_x; E[w]^2 + Var[w]) to the variance; with
    lr_output_moments the output carries (m, v) and its data, drawn where read, is a sample
    of N(m, v)."""
    from lr_quant.moments import MomentTensor, has_moments

    torch.manual_seed(0)
    layer = LRQuantConv2d(3, 4, 3, padding=1, weight_quant=LRTernaryWeightPerChannelFloat,
                          lr_output_moments=True).double()
    with torch.no_grad():
        layer.weight_logits.normal_(0, 1.5)
    m_x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    v_x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    layer.train()
    out = layer(MomentTensor.from_moments(m_x, v_x))
    assert has_moments(out)
    op = lambda a, w, b: F.conv2d(a, w, b, padding=1)
    m_ref, v_ref = reference_moments(layer, m_x, op)
    dist = layer.lr_distribution
    mean, var = dist.moments(layer.weight_logits.detach())
    alpha = layer.quant_weight().scale.detach() / layer.lr_unit
    v_ref = v_ref + op(v_x, (mean ** 2 + var) * alpha ** 2, None)
    torch.testing.assert_close(out.moment_mean, m_ref)
    torch.testing.assert_close(out.moment_var, v_ref)
    # gradients flow to the logits through the moments
    out.moment_var.sum().backward()
    assert layer.weight_logits.grad.abs().sum() > 0
    # eval: a plain deterministic tensor
    layer.eval()
    assert not has_moments(layer(m_x))


@pytest.mark.parametrize("quant", [LRBinaryWeightPerChannelFloat, LRTernaryWeightPerChannelFloat],
                         ids=["bin-pc", "ter-pc"])
def test_sharpness_trains_the_tempered_distribution_with_the_same_mode(quant):
    """lr_sharpness = g: the training moments are those of p^g / sum p^g (oracle: powers of
    the enumerated probabilities), gradients reach the logits, eval keeps the mode."""
    torch.manual_seed(0)
    layer = LRQuantConv2d(3, 4, 3, padding=1, weight_quant=quant, lr_output_moments=True).double()
    with torch.no_grad():
        layer.weight_logits.normal_(0, 1.5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    layer.eval()
    mode_out = layer(x)
    layer.train()
    layer.lr_sharpness = 3.0
    out = layer(x)
    dist = layer.lr_distribution
    p = dist.probabilities(layer.weight_logits.detach())
    p = p.pow(3.0) / p.pow(3.0).sum(0, keepdim=True)
    values = torch.tensor(dist.values, dtype=torch.float64).view(-1, *[1] * (p.dim() - 1))
    mean = (p * values).sum(0)
    var = (p * (values - mean) ** 2).sum(0)
    alpha = layer.quant_weight().scale.detach() / layer.lr_unit
    op = lambda a, w, b: F.conv2d(a, w, b, padding=1)   # noqa: E731
    torch.testing.assert_close(out.moment_mean, op(x, mean * alpha, layer.bias))
    torch.testing.assert_close(out.moment_var, op(x * x, var * alpha ** 2, None))
    out.moment_mean.sum().backward()
    assert layer.weight_logits.grad.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(layer(x), mode_out)


@pytest.mark.parametrize("quant", [LRBinaryWeightPerTensorConst, LRBinaryWeightPerChannelFloat,
                                   lr_weight_quant({"name": "categorical", "values": (-2, 2)},
                                                   per_channel_scale=True)],
                         ids=["bin", "bin-pc", "pm2-pc"])
@pytest.mark.parametrize("kind", ["linear", "linear-3d-input", "conv1d", "conv2d-strided-dilated",
                                  "conv2d-same", "conv2d-reflect", "conv3d", "grouped"])
def test_equal_magnitude_weights_use_the_box_sum_for_the_input_variance(quant, kind):
    """Binary (equal-magnitude) weights: E[w^2] = alpha^2, so op(v_x; E[w]^2 + Var[w]) is
    alpha^2 times a one-channel box sum of v_x. Moments and gradients equal the full
    convolution (the general path, forced here by disabling the shortcut)."""
    from lr_quant.moments import MomentTensor
    from lr_quant.nn import LRQuantConv3d

    torch.manual_seed(0)
    make = {
        "linear": (lambda: LRQuantLinear(7, 5, weight_quant=quant), (3, 7)),
        "linear-3d-input": (lambda: LRQuantLinear(7, 5, weight_quant=quant), (2, 4, 7)),
        "conv1d": (lambda: LRQuantConv1d(3, 4, 3, padding=2, weight_quant=quant), (2, 3, 9)),
        "conv2d-strided-dilated": (lambda: LRQuantConv2d(
            3, 4, 3, stride=2, dilation=2, padding=1, weight_quant=quant), (2, 3, 9, 8)),
        "conv2d-same": (lambda: LRQuantConv2d(3, 4, 3, padding="same", weight_quant=quant),
                        (2, 3, 6, 7)),
        "conv2d-reflect": (lambda: LRQuantConv2d(3, 4, 3, padding=1, padding_mode="reflect",
                                                 weight_quant=quant), (2, 3, 5, 5)),
        "conv3d": (lambda: LRQuantConv3d(2, 3, 3, padding=1, weight_quant=quant), (1, 2, 4, 4, 4)),
        "grouped": (lambda: LRQuantConv2d(4, 6, 3, groups=2, padding=1, weight_quant=quant),
                    (2, 4, 5, 5)),
    }
    build, shape = make[kind]
    layers = [build().double(), None]
    layers[1] = build().double()
    layers[1].load_state_dict(layers[0].state_dict())
    layers[1]._weight_sq_per_output = lambda scale: None      # the full convolution
    with torch.no_grad():
        layers[0].weight_logits.normal_(0, 1.5)
        layers[1].weight_logits.copy_(layers[0].weight_logits)
    m_x, v_x = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    outs, grads = [], []
    for layer in layers:
        layer.lr_output_moments = True
        layer.train()
        m, v = m_x.clone().requires_grad_(), v_x.clone().requires_grad_()
        out = layer(MomentTensor.from_moments(m, v))
        outs.append((out.moment_mean, out.moment_var))
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).view(out.shape)
        params = [layer.weight_logits] + [p for n, p in layer.named_parameters()
                                          if "scaling_impl" in n]
        grads.append(torch.autograd.grad((out.moment_var * w).sum(), [m, v] + params))
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert (layers[0]._weight_sq_per_output(layers[0].lr_scale()) is not None)


def test_moments_travel_lr_bn_sign_lr():
    """LR -> BatchNorm -> stochastic sign (moment mode) -> LR: the second LR layer gets a
    MomentTensor whose moments come from the sign's P(+1) = Phi(m / sqrt(v))."""
    from lr_quant.moments import has_moments
    from lr_quant.nn.stochastic_sign import StochasticSign

    seen = {}
    second = LRQuantLinear(6, 3)
    second.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    model = nn.Sequential(LRQuantLinear(5, 6, lr_output_moments=True), nn.BatchNorm1d(6),
                          StochasticSign(6, threshold_init="zero"), second)
    model.train()
    y = model(torch.randn(16, 5))
    assert has_moments(seen["x"])
    y.sum().backward()
    assert model[0].weight_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_lr_scale_equals_the_quantizer_scale(quant):
    """lr_scale reads the scaling module directly; it must equal quant_weight().scale / unit."""
    layer = LRQuantConv2d.from_float(nn.Conv2d(3, 5, 3), weight_quant=quant)
    scale = layer.lr_scale()
    expected = layer.quant_weight().scale / layer.lr_unit
    if scale is None:
        torch.testing.assert_close(expected, torch.ones_like(expected))
    else:
        torch.testing.assert_close(scale, expected)
        assert scale.requires_grad


def _w1a_training_step(model, x, seed, reads_moments_only=True, monkeypatch=None):
    """One training forward/backward of a converted model with every sign drawing from its
    own generator (so the LR layers' noise is the same global stream with or without sign
    samples); returns (output, named grads, sign generator states before, after)."""
    import contextlib

    import lr_quant.nn.lr_weight as lr_weight
    from lr_quant.quant.sign_settings import sign_quant_modules

    if not reads_moments_only:   # the former path: every input quantizer draws its sample
        monkeypatch.setattr(lr_weight, "moments_only",
                            lambda proxy: contextlib.nullcontext(False))
    quants = list(sign_quant_modules(model))
    for i, q in enumerate(quants):
        q.generator = torch.Generator().manual_seed(100 + i)
    before = [q.generator.get_state() for q in quants]
    torch.manual_seed(seed)
    model.train()
    out = model(x)
    F.cross_entropy(out, torch.arange(x.shape[0]) % 10).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    after = [q.generator.get_state() for q in quants]
    monkeypatch and monkeypatch.undo()
    return out.detach(), grads, before, after


@pytest.mark.parametrize("recipe", ["resnet_w1a1_stochastic", "resnet_w1a2"])
def test_input_quantizer_read_for_moments_only_draws_nothing_and_changes_nothing(
        recipe, monkeypatch):
    """An LR layer reads its stochastic input quantizer's moments only, so that quantizer
    draws no sample in training (its generator is untouched) and the network computes what
    it computed with the (dead) samples: the same output and the same gradients."""
    import copy

    import timm

    from lr_quant.convert import convert_with_report
    from lr_quant.quant.threshold import calibrate_thresholds

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():   # timm zero-initializes each block's last BN: a trained net does not
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    model, _ = convert_with_report(model, recipe)
    x = torch.randn(6, 3, 32, 32)
    calibrate_thresholds(model, x)
    new = _w1a_training_step(copy.deepcopy(model), x, seed=3)
    old = _w1a_training_step(copy.deepcopy(model), x, seed=3, reads_moments_only=False,
                             monkeypatch=monkeypatch)
    # the old path drew from every sign's generator; the new one from none
    assert all(not torch.equal(a, b) for a, b in zip(old[2], old[3]))
    assert all(torch.equal(a, b) for a, b in zip(new[2], new[3]))
    torch.testing.assert_close(new[0], old[0], rtol=1e-4, atol=1e-5)
    assert new[1].keys() == old[1].keys() and any("threshold" in n for n in new[1])
    for name in new[1]:
        torch.testing.assert_close(new[1][name], old[1][name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_an_input_quantizer_that_loses_its_moments_is_an_error():
    from lr_quant.quant.activation import StochasticSignThresholdActPerChannelConst
    from lr_quant.quant.threshold import attach_threshold

    layer = LRQuantLinear(4, 3, input_quant=StochasticSignThresholdActPerChannelConst)
    attach_threshold(layer.input_quant, 4, -1, "zero")
    layer.train()
    assert layer(torch.randn(5, 4)).shape == (5, 3)
    # a hook that hands on the plain data (the moments' mean, not a sample) must not pass
    layer.input_quant.register_forward_hook(
        lambda mod, args, out: getattr(out, "value", out).plain())
    with pytest.raises(RuntimeError, match="lost its moments"):
        layer(torch.randn(5, 4))
