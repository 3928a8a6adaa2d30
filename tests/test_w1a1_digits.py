"""W1A1: LR binary weights + stochastic sign activations, converted from a pretrained FP
MLP with BatchNorm and ReLU on the offline digits (first and last layer full precision).

The sign replaces the ReLU that fed the binarized layer: for a threshold t > 0,
sign(ReLU(a) - t) = sign(a - t), and without a threshold the sign of a ReLU output is +1
everywhere (chance accuracy). Measured here (450 test digits, 10 + 10 epochs):
  64-256-256-10, noise mode:                FP 97.8 / 98.9 / 97.8, W1A1 97.3 / 97.8 / 97.8
  64-256-256-256-10, moment mode (LR->BN->sign->LR):
                                            FP 97.6 / 98.4 / 98.4, W1A1 96.2 / 97.8 / 97.8
  (noise mode on the deeper net: 95.8 / 97.6 / 97.6)
Ternary activations (StochasticTernarySign, thresholds c -+ t, W1A2), same protocol:
  64-256-256-10, noise mode:                FP 97.8 / 98.9 / 97.8, W1A2 98.0 / 98.4 / 97.8
  64-256-256-256-10, moment mode:           FP 97.6 / 98.4 / 98.4, W1A2 96.9 / 96.9 / 97.3
The bound is FP - 4 points (18 test digits) for every seed.
"""

import copy

import pytest
import torch
from torch import nn

from lr_quant import freeze
from lr_quant.data import digits_split
from lr_quant.export import export_qonnx, verify_qonnx
from lr_quant.moments import has_moments
from lr_quant.nn import LRQuantLinear
from lr_quant.nn.stochastic_sign import StochasticSign, StochasticTernarySign

pytestmark = pytest.mark.slow


def fit(model, x, y, epochs, lr, batch_size, seed=0):
    """Adam on cross-entropy with a cosine schedule, seeded minibatches."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def reestimate_batchnorm(model, x, batch=256):
    """Cumulative BN statistics of the frozen (deterministic) network."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])


def w1a1_mlp(seed, deep, act=StochasticSign):
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_split(seed=seed)
    layers = [nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
              nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()]
    if deep:
        layers += [nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()]
    fp = nn.Sequential(*layers, nn.Linear(256, 10))
    fit(fp, x_train, y_train, epochs=10, lr=1e-2, batch_size=64, seed=seed)
    model = copy.deepcopy(fp)
    model[2] = act(256, noise_std=0.5)
    model[3] = LRQuantLinear.from_float(fp[3], lr_output_moments=deep)
    if deep:
        model[5] = act(256, noise_std=0.5)
        model[6] = LRQuantLinear.from_float(fp[6])
    return fp, model, (x_train, y_train, x_test, y_test)


@pytest.mark.parametrize("act", [StochasticSign, StochasticTernarySign], ids=["A1", "A2"])
@pytest.mark.parametrize("deep", [False, True], ids=["noise-mode", "moment-mode"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w1a1_mlp_within_a_few_points_of_fp(seed, deep, act):
    fp, model, (x_train, y_train, x_test, y_test) = w1a1_mlp(seed, deep, act)
    if deep:  # the second sign sees the Gaussian moments of LR -> BN
        seen = []
        model[5].register_forward_pre_hook(lambda mod, args: seen.append(has_moments(args[0])))
        model.train()
        model(x_train[:32])
        assert seen == [True]
    torch.manual_seed(seed)
    fit(model, x_train, y_train, epochs=10, lr=3e-3, batch_size=64, seed=seed)
    freeze(model)
    reestimate_batchnorm(model, x_train)
    fp_acc, w1a1_acc = accuracy(fp, x_test, y_test), accuracy(model, x_test, y_test)
    assert w1a1_acc >= fp_acc - 0.04, (fp_acc, w1a1_acc)


@pytest.mark.parametrize("act,values", [(StochasticSign, {-1.0, 1.0}),
                                        (StochasticTernarySign, {-1.0, 0.0, 1.0})],
                         ids=["A1", "A2"])
def test_w1a1_eval_and_export_are_deterministic(tmp_path, act, values):
    _, model, (x_train, y_train, x_test, _) = w1a1_mlp(0, deep=True, act=act)
    fit(model, x_train, y_train, epochs=2, lr=3e-3, batch_size=64, seed=0)
    freeze(model)
    model.eval()
    with torch.no_grad():
        first, second = model(x_test[:64]), model(x_test[:64])
        hidden = model[2](model[1](model[0](x_test[:64])))
    assert torch.equal(first, second)
    assert set(hidden.unique().tolist()) == values
    path = export_qonnx(model, x_test[:64], tmp_path / "w1a1.onnx", require_frozen=True)
    assert verify_qonnx(path, model, [x_test[:64], x_test[64:128]]) < 1e-4
