"""Packed deployment layers and pack_model on small models with random discrete weights."""

import copy

import pytest
import torch
from torch import nn

from triton_kernels.deploy import PackedConv2d, PackedLinear, input_mode, pack_model
from triton_kernels.discrete import NotDiscreteError, discretize_weight, layer_weight


class Bipolar(nn.Module):
    """Input quantizer: +1 where x >= 0 else -1."""

    def forward(self, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class Round(nn.Module):
    """A non-bipolar input quantizer (kept by the packed layer)."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class QLinear(nn.Linear):
    def __init__(self, *a, input_quant=None, **kw):
        super().__init__(*a, **kw)
        self.input_quant = input_quant

    def forward(self, x):
        return super().forward(self.input_quant(x) if self.input_quant is not None else x)


class QConv2d(nn.Conv2d):
    def __init__(self, *a, input_quant=None, **kw):
        super().__init__(*a, **kw)
        self.input_quant = input_quant

    def forward(self, x):
        return super().forward(self.input_quant(x) if self.input_quant is not None else x)


def _discrete_(layer, ternary, g):
    """Random discrete weight with power-of-two channel scales and a bias on a 1/8 grid:
    on integer inputs every float op is then exact, in any summation order, so the packed
    and the original layer agree bit for bit."""
    n = layer.weight.shape[0]
    shape = layer.weight.shape
    v = torch.randint(-1, 2, shape, generator=g) if ternary else torch.randint(0, 2, shape, generator=g) * 2 - 1
    scale = 2.0 ** torch.randint(-3, 2, (n,), generator=g)
    with torch.no_grad():
        layer.weight.copy_(v.float() * scale.view(-1, *[1] * (len(shape) - 1)))
        if layer.bias is not None:
            layer.bias.copy_(torch.randint(-16, 17, (n,), generator=g) / 8)
    return layer


def _int_input(*shape, g):
    return torch.randint(-4, 5, shape, generator=g).float()


def _model(g):
    m = nn.Sequential(
        _discrete_(nn.Conv2d(3, 8, 3, padding=1), False, g),  # binary weights, float input
        nn.BatchNorm2d(8),
        _discrete_(QConv2d(8, 8, 3, stride=2, padding=1, bias=False, input_quant=Bipolar()), True, g),  # ternary
        nn.Flatten(),
        _discrete_(QLinear(8 * 4 * 4, 64, input_quant=Bipolar()), False, g),  # W1A1
        _discrete_(QLinear(64, 32, input_quant=Round()), True, g),  # ternary, kept quantizer
        nn.Linear(32, 10),  # full precision: left alone
    )
    with torch.no_grad():
        m[1].running_mean.normal_(generator=g)
        m[1].running_var.uniform_(0.5, 2.0, generator=g)
    return m.eval()


def test_pack_model_outputs_predictions_and_report():
    g = torch.Generator().manual_seed(0)
    model = _model(g)
    x = _int_input(16, 3, 8, 8, g=g)
    with torch.no_grad():
        ref = model(x)
        packed = copy.deepcopy(model)
        report = pack_model(packed)
        out = packed(x)
    names = {e.name: e for e in report.entries}
    assert [e.name for e in report.packed] == ["0", "2", "4", "5"]
    assert names["6"].packed is False and "not scale x" in names["6"].reason
    assert (names["0"].weight_bits, names["0"].act_bits) == (1, 16)
    assert (names["2"].weight_bits, names["2"].act_bits) == (2, 1)
    assert (names["4"].weight_bits, names["4"].act_bits) == (1, 1)
    assert (names["5"].weight_bits, names["5"].act_bits) == (2, 16)
    assert isinstance(packed[0], PackedConv2d) and isinstance(packed[4], PackedLinear)
    assert isinstance(packed[5].input_quant, Round) and packed[4].input_quant is None
    assert isinstance(packed[6], nn.Linear) and not isinstance(packed[6], PackedLinear)
    assert torch.equal(out, ref)  # exact: see _discrete_
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert "packed 4 / 5 layers" in str(report)


def test_w1a1_layer_is_integer_exact():
    g = torch.Generator().manual_seed(1)
    lin = QLinear(200, 24, bias=False, input_quant=Bipolar())
    v = torch.randint(0, 2, (24, 200), generator=g) * 2 - 1
    with torch.no_grad():
        lin.weight.copy_(v.float())
    p = PackedLinear.from_linear(lin)
    assert p.act_bits == 1 and p.weight_bits == 1
    for m in (4, 40):  # XNOR path and int8 path
        x = torch.randn(m, 200, generator=g)
        oracle = torch.where(x >= 0, 1.0, -1.0).double() @ v.double().T
        assert torch.equal(p(x).double(), oracle)


def test_interpreted_kernels_end_to_end():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(_discrete_(QConv2d(2, 4, 3, padding=1, input_quant=Bipolar()), False, g), nn.Flatten(),
                          _discrete_(QLinear(4 * 4 * 4, 5, input_quant=Bipolar()), True, g),
                          _discrete_(nn.Linear(5, 3), False, g)).eval()
    x = _int_input(3, 2, 4, 4, g=g)
    with torch.no_grad():
        ref = model(x)
        report = pack_model(model)
        for m in model.modules():
            if isinstance(m, (PackedLinear, PackedConv2d)):
                m.backend = "interpret"
        out = model(x)
    assert [(e.weight_bits, e.act_bits) for e in report.packed] == [(1, 1), (2, 1), (1, 16)]
    assert torch.equal(out, ref)


def test_state_dict_size_and_reload():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(_discrete_(nn.Linear(512, 256), False, g), nn.ReLU(),
                          _discrete_(nn.Linear(256, 128), False, g)).eval()
    fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = pack_model(model)
    sd = model.state_dict()
    packed = sum(t.numel() * t.element_size() for t in sd.values())
    assert sd["0.weight_packed"].dtype == torch.int32 and sd["0.weight_packed"].shape == (256, 16)
    assert 16 <= fp32 / packed <= 32
    assert report.compression == pytest.approx(fp32 / packed)
    fresh = nn.Sequential(PackedLinear(512, 256), nn.ReLU(), PackedLinear(256, 128))
    fresh.load_state_dict(sd)
    x = torch.randn(4, 512, generator=g)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_discretize_weight():
    w = torch.tensor([[0.5, -0.5, 0.5], [-2.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    d = discretize_weight(w)
    assert d.bits == 2
    assert d.values.tolist() == [[1, -1, 1], [-1, 0, 1], [0, 0, 0]]
    assert d.scale.tolist() == [0.5, 2.0, 1.0]
    assert discretize_weight(torch.tensor([[3.0, -3.0]])).bits == 1
    with pytest.raises(NotDiscreteError, match="1 of 2 channels differ"):
        discretize_weight(torch.tensor([[1.0, -1.0], [1.0, 0.5]]))
    with pytest.raises(NotDiscreteError, match="at least 2-D"):
        discretize_weight(torch.ones(3))


def test_layer_weight_prefers_quant_weight():
    class FakeQuantTensor:
        def __init__(self, value):
            self.value = value

    class FakeBrevitasLinear(nn.Linear):
        def quant_weight(self):
            return FakeQuantTensor(torch.sign(self.weight) * 0.25)

    lin = FakeBrevitasLinear(4, 2)
    torch.testing.assert_close(layer_weight(lin), torch.sign(lin.weight.detach()) * 0.25)
    p = PackedLinear.from_linear(lin)
    torch.testing.assert_close(p.weight_scale, torch.full((2,), 0.25))


def test_unpackable_layers_are_reported():
    class WithOutputQuant(nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            self.output_quant = Round()

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), WithOutputQuant(), nn.Linear(4, 4))
    for m in model:
        with torch.no_grad():
            m.weight.copy_(torch.sign(m.weight) + (m.weight == 0))
    report = pack_model(model, filter_fn=lambda name, m: name != "4")
    reasons = [e.reason for e in report.entries]
    assert not report.packed
    assert "groups=2" in reasons[0] and "padding='same'" in reasons[1] and "reflect" in reasons[2]
    assert "output_quant is enabled" in reasons[3] and reasons[4] == "filtered out"


def test_input_mode_detection():
    probe = torch.tensor([[-1.0, 0.0, 2.0]])
    assert input_mode(QLinear(3, 1, input_quant=Bipolar()), probe) == (1, None)
    rnd = Round()
    assert input_mode(QLinear(3, 1, input_quant=rnd), probe) == (16, rnd)
    assert input_mode(nn.Linear(3, 1), probe) == (16, None)
    plain_sign = QLinear(3, 1, input_quant=type("Sign", (nn.Module,), {"forward": lambda s, x: torch.sign(x)})())
    assert input_mode(plain_sign, probe)[0] == 16  # sign(0) = 0 is not bipolar


def test_packed_layer_input_errors():
    p = PackedLinear(40, 3)
    with pytest.raises(ValueError, match="K=40 features"):
        p(torch.zeros(2, 41))
    with pytest.raises(TypeError, match="expected a tensor"):
        p([0.0] * 40)
    c = PackedConv2d(3, 2, 3)
    with pytest.raises(ValueError, match="4-D"):
        c(torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="weight_bits must be 1 or 2"):
        PackedLinear(4, 4, weight_bits=3)
    with pytest.raises(ValueError, match="act must be 'auto' or 'fp'"):
        pack_model(nn.Linear(2, 2), act="int8")
