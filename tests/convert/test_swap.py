"""convert(model, recipe): timm backbones -> LR networks, without changing what layers compute."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d
from timm.layers import CondConv2d, Conv2dSame, MixedConv2d, ScaledStdConv2d, StdConv2d
from timm.models.mlp_mixer import MlpMixer
from timm.models.vgg import VGG
from torch import nn

from lr_quant.convert import DROPPABLE_ACTIVATIONS, convert_with_report
from lr_quant.moments import has_moments
from lr_quant.nn import LRQuantConv2d, lr_layers
from lr_quant.quant.activation import ThresholdShift
from lr_quant.quant.threshold import calibrate_thresholds
from lr_quant.recipe import Recipe, load_recipe

# the test's own notion of "a Conv/Linear layer" (independent of lr_quant.convert)
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, CondConv2d)


def weight_layer_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def _vgg(**kw):
    return VGG(cfg=[8, "M", 16, "M", 32, "M", 32, "M", 32, "M"], mlp_ratio=1 / 128,
               norm_layer=nn.BatchNorm2d, **kw)


def _mixer(**kw):
    model = MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32, **kw)
    nn.init.normal_(model.head.weight, std=0.1)   # timm zero-initializes the Mixer head
    return model


# (id, factory(num_classes) -> model, input size); the smallest variants timm offers
ARCHS = [
    ("resnet", lambda n: timm.create_model("test_resnet", num_classes=n), 32),
    ("resnet_d_resnet10t", lambda n: timm.create_model("resnet10t", num_classes=n), 32),
    ("resnext", lambda n: timm.create_model("resnext50_32x4d", num_classes=n,
                                            layers=(1, 1, 1, 1)), 32),
    ("regnet", lambda n: timm.create_model("regnetx_002", num_classes=n), 32),
    ("mobilenetv2", lambda n: timm.create_model("mobilenetv2_035", num_classes=n), 32),
    ("mobilenetv3", lambda n: timm.create_model("mobilenetv3_small_050", num_classes=n), 32),
    ("efficientnet", lambda n: timm.create_model("test_efficientnet", num_classes=n), 32),
    ("tf_efficientnet_lite0_same", lambda n: timm.create_model("tf_efficientnet_lite0",
                                                               num_classes=n), 33),
    ("mixnet", lambda n: timm.create_model("mixnet_s", num_classes=n), 32),
    ("tf_mixnet_same", lambda n: timm.create_model("tf_mixnet_s", num_classes=n), 33),
    ("ghostnet", lambda n: timm.create_model("ghostnet_050", num_classes=n), 32),
    ("densenet", lambda n: timm.create_model("densenet121", num_classes=n, growth_rate=8,
                                             block_config=(1, 1, 1, 1)), 32),
    ("vgg", lambda n: _vgg(num_classes=n), 32),
    ("repvgg", lambda n: timm.create_model("repvgg_a0", num_classes=n), 32),
    ("byobnet", lambda n: timm.create_model("test_byobnet", num_classes=n), 32),
    ("convnext", lambda n: timm.create_model("test_convnext", num_classes=n), 32),
    ("vit", lambda n: timm.create_model("test_vit", num_classes=n), 160),
    ("mlp_mixer", lambda n: _mixer(num_classes=n), 32),
    ("nfnet_scaled_std_conv", lambda n: timm.create_model("test_nfnet", num_classes=n), 32),
]
SLOW = {"resnext", "repvgg", "tf_mixnet_same", "mixnet"}


def _params():
    return [pytest.param(f, s, id=i, marks=[pytest.mark.slow] if i in SLOW else [])
            for i, f, s in ARCHS]


@torch.no_grad()
def pretend_trained(model):
    """Fill zero-initialized parameters (timm's zero-init heads, NFNet's last gains,
    biases) with small random values, as a trained checkpoint would have them."""
    for p in model.parameters():
        if not p.detach().abs().max() > 0:
            p.normal_(0, 0.1)
    return model


@torch.no_grad()
def discrete_float_oracle(fp_model, converted, report):
    """The float model with every converted layer's weight set to that layer's discrete
    (eval) weight: what the converted model must compute in eval()."""
    oracle = copy.deepcopy(fp_model)
    for row in report.converted:
        new = converted.get_submodule(row.name)
        old = oracle.get_submodule(row.name)
        old.weight.copy_(new.quant_weight().value)
        if new.bias is not None:     # (a bias folded into the next BN stays in the oracle)
            old.bias.copy_(new.bias)
    return oracle.eval()


def assert_same_output(a, b):
    scale = b.abs().max().item() + 1e-6
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("factory,size", _params())
def test_convert_timm_architecture(factory, size):
    torch.manual_seed(0)
    model = pretend_trained(factory(10))
    expected = weight_layer_names(model)
    fp_model = copy.deepcopy(model).eval()
    model, report = convert_with_report(model, Recipe())

    # the report accounts for every Conv/Linear, once
    assert sorted(r.name for r in report.layers) == sorted(expected)
    assert len(report.converted) >= 1
    assert len(lr_layers(model)) == len(report.converted)
    for row in report.kept:
        assert row.reason, row
        assert not hasattr(model.get_submodule(row.name), "weight_logits")
    assert "converted" in report.table()

    x = torch.randn(2, 3, size, size)
    # conversion did not change the computation: eval == float model with discrete weights
    model.eval()
    with torch.no_grad():
        out = model(x)
        oracle = discrete_float_oracle(fp_model, model, report)(x)
        again = model(x)
    assert torch.equal(out, again)     # eval is deterministic
    assert_same_output(out, oracle)

    # one LR training step
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [m.weight_logits.grad for _, m in lr_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_conv2d_same_converts_and_computes_tf_same_padding():
    """timm Conv2dSame (dynamic, asymmetric TF 'SAME' padding) -> LRQuantConv2d with
    padding='same' computes the same as Conv2dSame with the discrete weights."""
    torch.manual_seed(0)
    layers = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2),                 # strided: Brevitas' own pad
        nn.BatchNorm2d(8),
        Conv2dSame(8, 8, 4, stride=1, bias=True),      # even kernel: asymmetric pad
        Conv2dSame(8, 8, 5, stride=2, dilation=1, groups=8),
        Conv2dSame(8, 8, 3, stride=1, dilation=2),
    )
    fp = copy.deepcopy(layers).eval()
    model, report = convert_with_report(layers, dict(keep_fp={"first_conv": False}))
    assert len(report.converted) == 4
    assert all(type(m) is LRQuantConv2d for n, m in model.named_children() if n != "1")
    model.eval()
    for h, w in [(15, 17), (16, 16), (9, 10)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert_same_output(model(x), discrete_float_oracle(fp, model, report)(x))
    model.train()
    model(torch.randn(2, 3, 15, 17)).sum().backward()


def _tf_same_net():
    """The stem and downsampling of a tf_ EfficientNet: timm Conv2dSame throughout."""
    return nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2, bias=False),          # stem: kept float (first conv)
        nn.BatchNorm2d(8), nn.ReLU6(),
        Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False),  # strided depthwise
        nn.BatchNorm2d(8), nn.ReLU6(),
        Conv2dSame(8, 16, 5, stride=2, bias=False),         # strided 5x5
        nn.BatchNorm2d(16), nn.ReLU6(),
        Conv2dSame(16, 16, 4, stride=1),                    # stride 1, even kernel
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.mark.parametrize("size", [32, 33])
def test_conv2d_same_strided_exports_and_verifies_with_qonnx(tmp_path, size):
    """Regression: a strided Conv2dSame after a float one (tf_efficientnet_lite0's stem and
    blocks) exported with the pad computed in the graph from Shape(x); qonnx's cleanup
    folded that Shape to zeros (the float stem's pad is dynamic, so the shape is unknown)
    and baked a wrong pad. The pad is now a constant of the static input size."""
    from lr_quant import freeze
    from lr_quant.export import export_qonnx, run_qonnx

    torch.manual_seed(0)
    model = _tf_same_net()
    fp = copy.deepcopy(model).eval()
    model, report = convert_with_report(model, {"keep_fp": {"names": ["0"]}})
    assert {r.name for r in report.converted} == {"3", "6", "9", "12"}
    freeze(model)
    model.eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        assert_same_output(expected, discrete_float_oracle(fp, model, report)(x))
    result = export_qonnx(model, x, tmp_path / "same.onnx", num_checks=2)
    assert result.verified and result.float_layers == ["0"]
    assert result.op_counts["BipolarQuant"] == 4
    got = torch.from_numpy(run_qonnx(result, x.numpy()))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layer_variants_kept_in_full_precision_with_reasons():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.std = StdConv2d(3, 8, 3, padding=1)
            self.scaled = ScaledStdConv2d(8, 8, 3, padding=1)
            self.cond = CondConv2d(8, 8, 3, padding=1, num_experts=2)
            self.mixed = MixedConv2d(8, 8, [3, 5], depthwise=True)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            routing = torch.sigmoid(x.mean((2, 3)).repeat(1, 1)[:, :2])
            x = self.mixed(self.cond(self.scaled(self.std(x)), routing))
            t = x.flatten(2).transpose(1, 2)
            t = self.attn(t, t, t)[0]
            return self.fc(t.mean(1))

    model = Net()
    fp = copy.deepcopy(model).eval()
    model, report = convert_with_report(model, {"keep_fp": {"first_conv": False}})
    reasons = {r.name: r.reason for r in report.kept}
    assert "weight standardization" in reasons["std"]
    assert "weight standardization" in reasons["scaled"]
    assert "CondConv2d" in reasons["cond"]
    assert "MultiheadAttention" in reasons["attn.out_proj"]
    converted = {r.name for r in report.converted}
    assert converted == {"mixed.0", "mixed.1", "fc"}     # MixedConv2d: its children
    assert report["mixed.0"].kind == "depthwise"
    x = torch.randn(2, 3, 9, 9)
    model.eval()
    with torch.no_grad():
        assert_same_output(model(x), discrete_float_oracle(fp, model, report)(x))


def test_pretrained_checkpoint_is_the_lr_initialization(tmp_path):
    """Weights saved with safetensors and loaded by timm (pretrained_cfg_overlay file=) are
    the LR init: E[w] = W / std(W) exactly where the clip is inactive, corr > 0.95."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path / "fp.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = timm.create_model("test_resnet", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if isinstance(m, nn.Conv2d)}
    assert torch.equal(float_weights["layer1.0.conv1"], src.layer1[0].conv1.weight)
    for weights in ("lr_binary_per_channel", "lr_ternary"):
        m = copy.deepcopy(model)
        m, report = convert_with_report(m, {"weights": {"conv": weights}})
        assert len(report.converted) > 5
        for row in report.converted:
            layer = m.get_submodule(row.name)
            mean = layer.lr_distribution.mean(layer.weight_logits).double()
            w = float_weights[row.name].double()
            w = (w / w.std()).clamp(-1, 1)
            corr = torch.corrcoef(torch.stack([mean.flatten(), w.flatten()]))[0, 1]
            assert corr > 0.95, (row.name, corr)
            # binary: p = 0.5(1 + w) unclipped for |w| <= 0.9; ternary: p(+|!=0) =
            # 0.5(1 + w / (0.05 + 0.9|w|)) unclipped for |w| <= 0.045 / 0.19 ~ 0.237
            bound = 0.9 if weights.startswith("lr_binary") else 0.23
            inactive = w.abs() < bound
            assert inactive.any()
            torch.testing.assert_close(mean[inactive], w[inactive], rtol=0, atol=1e-5)
    # from scratch: the float weights are *not* the init
    m = copy.deepcopy(model)
    m, report = convert_with_report(m, {"init": {"from_pretrained": False, "seed": 3}})
    layer = m.get_submodule("layer1.0.conv1")
    mean = layer.lr_distribution.mean(layer.weight_logits).double().flatten()
    corr = torch.corrcoef(torch.stack([mean, float_weights["layer1.0.conv1"].double().flatten()]))
    assert abs(corr[0, 1]) < 0.3


def test_brevitas_ste_baseline_and_ste_sign():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    w0 = model.layer1[0].conv1.weight.detach().clone()
    model, report = convert_with_report(model, {
        "weights": {"conv": "brevitas_binary"}, "activations": {"quantizer": "ste_sign"}})
    layer = model.layer1[0].conv1
    assert type(layer) is QuantConv2d and report["layer1.0.conv1"].weight_bits == 1
    assert torch.equal(layer.weight, w0)          # no in-place clamp of the float weight
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert torch.equal(layer.weight, w0)
    assert layer.weight.grad is not None
    assert isinstance(layer.input_quant.fused_activation_quant_proxy.activation_impl,
                      ThresholdShift)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_ste_ternary_baseline_gets_ternary_thresholds():
    from lr_quant.quant.threshold import TernaryThreshold

    torch.manual_seed(0)
    # timm zero-initializes the last BN of each block (no gradient into the block): undo it
    model = pretend_trained(timm.create_model("test_resnet", num_classes=10))
    model, report = convert_with_report(model, {
        "weights": {"conv": "brevitas_ternary"}, "activations": {"quantizer": "ste_ternary"}})
    layer = model.layer1[0].conv2
    assert report["layer1.0.conv2"].input_bits == 2
    threshold = layer.input_quant.fused_activation_quant_proxy.activation_impl
    assert isinstance(threshold, TernaryThreshold)
    x = torch.randn(4, 3, 32, 32)
    calibrate_thresholds(model, x)
    model.train()
    # straight-through rounding: gradients reach both thresholds (a cross-entropy loss: the
    # plain sum of the outputs does not depend on the inputs of a train-mode BatchNorm)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    assert threshold.threshold.grad.abs().sum() > 0 and threshold.half_width.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        q = layer.input_quant(torch.randn(2, layer.in_channels, 8, 8))
    assert set(getattr(q, "value", q).unique().tolist()) == {-1.0, 0.0, 1.0}


def _sign_input_probe(model):
    """name -> whether the input of that layer's sign threshold carried moments."""
    seen = {}
    for name, m in model.named_modules():
        proxy = getattr(getattr(m, "input_quant", None), "fused_activation_quant_proxy", None)
        impl = getattr(proxy, "activation_impl", None)
        if isinstance(impl, ThresholdShift):
            def probe(mod, args, name=name):
                seen.setdefault(name, has_moments(args[0]))
            impl.register_forward_pre_hook(probe)
    return seen


@pytest.mark.parametrize("arch,dropped,kept_act", [
    ("test_resnet", ["layer1.0.act1", "layer4.0.act1"], ["layer1.0.act2", "act1"]),
    # with one block per stage every next block has a 1x1 conv shortcut: the block output
    # ReLU (act3) feeds only sign inputs (next conv1 and the shortcut conv) and is dropped
    # too, except the last one (global pooling reads it)
    pytest.param("resnext50_32x4d", ["layer1.0.act1", "layer1.0.act2", "layer1.0.act3"],
                 ["layer4.0.act3", "act1"], marks=pytest.mark.slow),
])
def test_w1a1_resnet_moments_reach_sign_inside_block(arch, dropped, kept_act):
    torch.manual_seed(0)
    kwargs = {"layers": (1, 1, 1, 1)} if arch.startswith("resnext") else {}
    # timm zero-initializes the last BN of each block: a trained checkpoint does not
    model = pretend_trained(timm.create_model(arch, num_classes=10, **kwargs))
    model, report = convert_with_report(model, "resnet_w1a1_stochastic")
    names = [n for n, _ in report.dropped_activations]
    for n in dropped:
        assert n in names and isinstance(model.get_submodule(n), nn.Identity)
    for n in kept_act:   # feeds a residual add / max pool too: must stay
        assert isinstance(model.get_submodule(n), DROPPABLE_ACTIVATIONS), n
    assert report["layer1.0.conv2"].input_quant == "stochastic_sign"
    assert report["layer1.0.conv2"].input_bits == 1
    first = model.pretrained_cfg["first_conv"]
    assert not report[first].converted and not report[first].input_quant   # float input
    x = torch.randn(4, 3, 32, 32)
    assert calibrate_thresholds(model, x) == len(report.converted)
    seen = _sign_input_probe(model)
    model.train()
    loss = F.cross_entropy(model(x), torch.arange(4))
    assert torch.isfinite(loss)
    loss.backward()
    # LR conv1 -> bn1 -> (ReLU dropped) -> sign of conv2: moment mode in a real block
    assert seen["layer1.0.conv2"] is True
    assert seen["layer1.0.conv1"] is False        # after act2 of the stem/previous block
    thresholds = model.layer1[0].conv2.input_quant.fused_activation_quant_proxy.activation_impl
    assert thresholds.threshold.grad is not None and thresholds.threshold.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_w1a2_resnet_ternary_activations_in_moment_mode_and_exact_export(tmp_path):
    """resnet_w1a2: every converted layer reads its input through a TernaryThreshold +
    stochastic ternary quantizer; conv -> BN -> ternary inside a block runs in moment mode;
    inputs after a kept ReLU (>= half zeros) still get all three values after calibration;
    the frozen model exports to QONNX (Sub -> Mul -> 2-bit Quant) that qonnx reproduces."""
    from lr_quant import freeze
    from lr_quant.export import export_qonnx, verify_qonnx
    from lr_quant.quant.activation import StochasticTernaryQuant
    from lr_quant.quant.threshold import TernaryThreshold

    torch.manual_seed(0)
    model = pretend_trained(timm.create_model("test_resnet", num_classes=10))
    model, report = convert_with_report(model, "resnet_w1a2")
    assert "layer1.0.act1" in [n for n, _ in report.dropped_activations]
    for row in report.converted:
        assert row.input_quant == "stochastic_ternary" and row.input_bits == 2, row
        proxy = model.get_submodule(row.name).input_quant.fused_activation_quant_proxy
        assert isinstance(proxy.activation_impl, TernaryThreshold)
        assert isinstance(proxy.tensor_quant, StochasticTernaryQuant)
    x = torch.randn(8, 3, 32, 32)
    calibrate_thresholds(model, x)
    seen = _sign_input_probe(model)
    inputs = {}
    relu_fed = model.layer2[0].conv1.input_quant.fused_activation_quant_proxy.activation_impl
    def grab(module, args):   # returns None: a pre-hook's return value replaces the input
        inputs.setdefault("x", args[0])
    handle = relu_fed.register_forward_pre_hook(grab)
    model.train()
    loss = F.cross_entropy(model(x), torch.arange(8) % 10)
    loss.backward()
    assert seen["layer1.0.conv2"] is True and seen["layer1.0.conv1"] is False
    th = model.layer1[0].conv2.input_quant.fused_activation_quant_proxy.activation_impl
    for p in (th.threshold, th.half_width):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    handle.remove()
    xin = inputs["x"].detach()
    xin = xin.plain() if hasattr(xin, "plain") else xin
    assert (xin >= 0).all()
    model.eval()
    with torch.no_grad():
        q = model.layer2[0].conv1.input_quant(xin)
    q = q.value if hasattr(q, "value") else q
    present = torch.stack([(q == v).flatten(2).any(2).any(0) for v in (-1.0, 0.0, 1.0)])
    assert present.all(0).float().mean() > 0.9     # all three values in (almost) every channel
    freeze(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    path = export_qonnx(model, x[:2], tmp_path / "w1a2.onnx")
    assert verify_qonnx(path, model, [x[:2], x[2:4]]) < 1e-4


@pytest.mark.parametrize("arch,size", [("mobilenetv3_small_050", 32), ("test_vit", 160),
                                       ("test_convnext", 32)])
def test_w1a1_noise_mode_on_any_graph(arch, size):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    model, report = convert_with_report(model, "resnet_w1a1_stochastic")
    x = torch.randn(2, 3, size, size)
    calibrate_thresholds(model, x)
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert all(r.input_quant == "stochastic_sign" for r in report.converted)


def test_finn_recipe_int8_first_layer_and_binary_everywhere():
    torch.manual_seed(0)
    model = _vgg(num_classes=10)
    model.pretrained_cfg = {"first_conv": "features.0", "classifier": "head.fc"}
    # the packaged recipe's one override names finn_cnv's classifier ("head"); the FINN
    # rules themselves apply to any backbone
    recipe = load_recipe("finn_cnv_w1a1")
    recipe.overrides = {}
    model, report = convert_with_report(model, recipe)
    assert not report.kept
    assert report["features.0"].input_quant == "int8"
    assert report["features.0"].weight_quant == "lr_binary"
    # (a sign in front of a max-pool says so: "stochastic_sign (before features.2 ...)")
    assert all(r.input_quant.startswith("stochastic_sign") for r in report.converted
               if r.name != "features.0")
    x = torch.randn(2, 3, 32, 32)
    calibrate_thresholds(model, x)
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_bias_before_norm_folded_exactly():
    torch.manual_seed(0)
    model = pretend_trained(_vgg(num_classes=10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):     # non-trivial running statistics
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    assert model.features[0].bias is not None
    fp = copy.deepcopy(model).eval()
    model, report = convert_with_report(model, {"weights": {"bias_before_norm": "fold"},
                                                "keep_fp": {"first_conv": False}})
    folded = [r.name for r in report.converted if "bias folded" in r.reason]
    assert "features.0" in folded and len(folded) == 5
    assert model.features[0].bias is None
    assert model.head.fc.bias is not None                 # no BN after the classifier
    assert any("head.fc: bias kept" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert_same_output(model(x), discrete_float_oracle(fp, model, report)(x))
