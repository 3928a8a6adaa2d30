"""activations.sign_before_pool: conv -> BN -> ReLU -> MaxPool -> conv gets its sign in
front of the pool (what FINN maps), computing what the sign after the pool computes."""

import copy

import pytest
import timm
import torch
from brevitas.nn import QuantIdentity
from torch import nn

from lr_quant.convert import convert_with_report
from lr_quant.nn import LRQuantConv2d
from lr_quant.quant.activation import ThresholdShift
from lr_quant.quant.threshold import calibrate_thresholds
from lr_quant.recipe import Recipe


class PoolNet(nn.Module):
    """conv-BN-ReLU-MaxPool-conv; `shortcut` adds a second reader of the pool output."""

    def __init__(self, shortcut: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.shortcut = shortcut
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        p = self.pool(self.act1(self.bn1(self.conv1(x))))
        y = self.conv2(p)
        if self.shortcut:
            y = y + p
        return self.head(y.mean((2, 3)))


def recipe(move: bool) -> Recipe:
    return Recipe.from_dict({
        "weights": {"conv": "lr_binary", "linear": None},
        "activations": {"quantizer": "stochastic_sign", "sign_before_pool": move},
        "keep_fp": {"first_conv": False, "classifier": True}})


def converted(model, move: bool):
    torch.manual_seed(0)
    model = copy.deepcopy(model)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):   # statistics with both signs after BN
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.weight.data.uniform_(0.5, 1.5)
    return convert_with_report(model, recipe(move), example_input=torch.randn(2, 3, 8, 8))


def thresholds(model):
    return [m for m in model.modules() if isinstance(m, ThresholdShift)]


def test_sign_moves_in_front_of_the_pool_and_computes_the_same():
    torch.manual_seed(0)
    base = PoolNet()
    after, _ = converted(base, move=False)
    before, report = converted(base, move=True)
    # without the move the ReLU stays (the pool reads it); the sign is conv2's input
    assert isinstance(before.act1, QuantIdentity) and isinstance(after.act1, nn.ReLU)
    assert isinstance(before.conv2, LRQuantConv2d)
    assert not before.conv2.input_quant.is_quant_enabled and after.conv2.input_quant.is_quant_enabled
    row = {r.name: r for r in report.converted}["conv2"]
    assert "before pool" in row.input_quant and row.input_bits == 1
    assert any("act1 (ReLU) became the stochastic_sign" in n for n in report.notes)
    # same thresholds t > 0 in both places: max(sign(x - t)) = sign(max(relu(x)) - t)
    # (sign is monotone; relu changes nothing above t > 0), exactly
    (t_after,), (t_before,) = thresholds(after), thresholds(before)
    with torch.no_grad():
        t_after.threshold.copy_(torch.linspace(0.05, 0.4, 8))
        t_before.threshold.copy_(t_after.threshold)
    x = torch.randn(16, 3, 8, 8)
    after.eval(), before.eval()
    with torch.no_grad():
        pooled = before.pool(before.act1(before.bn1(before.conv1(x))))
        assert set(pooled.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(before(x), after(x), rtol=0, atol=1e-5)


def test_moved_sign_trains_and_calibrates():
    torch.manual_seed(0)
    model, _ = converted(PoolNet(), move=True)
    x = torch.randn(16, 3, 8, 8)
    assert calibrate_thresholds(model, x) == 1
    (shift,) = thresholds(model)
    # median init: half of the BN outputs of every channel lie above the threshold
    with torch.no_grad():
        bn_out = model.bn1(model.conv1(x))
    frac = (bn_out > shift.threshold.view(1, -1, 1, 1)).float().mean((0, 2, 3))
    assert torch.allclose(frac, torch.full_like(frac, 0.5), atol=0.05)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (16,)))
    loss.backward()
    assert shift.threshold.grad is not None and shift.threshold.grad.abs().sum() > 0
    assert model.conv1.weight_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("why", ["second reader of the pool", "flag off"])
def test_sign_stays_after_the_pool(why):
    model, report = converted(PoolNet(shortcut=why == "second reader of the pool"),
                              move=why != "flag off")
    assert not isinstance(model.act1, QuantIdentity)
    assert model.conv2.input_quant.is_quant_enabled
    assert not any("became the stochastic_sign" in n for n in report.notes)


def test_finn_cnv_recipe_puts_every_pooled_sign_before_its_pool():
    model = timm.create_model("finn_cnv", num_classes=10, channels=(4, 8, 8), fc_features=8)
    model, report = convert_with_report(model, "finn_cnv_w1a1")
    order = [type(m).__name__ for m in model.features]
    for i, name in enumerate(order):
        if name == "MaxPool2d":
            assert order[i - 1] == "QuantIdentity", order
    assert len(report.converted) == 9 and not report.kept
