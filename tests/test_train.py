"""The fine-tuning loop: optimizer groups, schedules, losses, BN re-estimation, NaN stop,
bit-exact resume, and the learning proofs (LR fine-tuning recovers FP accuracy)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lr_quant import freeze
from lr_quant.checkpoint import load_checkpoint
from lr_quant.data import Datasets, digits_split
from lr_quant.nn import LRQuantConv2d, LRQuantLinear, lr_layers
from lr_quant.quant import lr_weight_quant
from lr_quant.train import (LAST_CHECKPOINT, NonFiniteLossError, Trainer, distillation_loss,
                            evaluate, param_groups, reestimate_batchnorm,
                            regularization)
from lr_quant.train_config import ScheduleConfig, TrainConfig


def mlp(hidden=64):
    return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def to_lr(model, distribution="binary"):
    quant = lr_weight_quant(distribution, False)
    return nn.Sequential(*[LRQuantLinear.from_float(m, weight_quant=quant)
                           if isinstance(m, nn.Linear) else m for m in model])


def digits_data(val_fraction=0.1, n_train=None):
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    if n_train:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    n_val = int(len(x_train) * val_fraction)
    train = TensorDataset(x_train[n_val:], y_train[n_val:])
    return Datasets(train=train, val=TensorDataset(x_train[:n_val], y_train[:n_val]),
                    test=TensorDataset(x_test, y_test), num_classes=10, train_eval=train,
                    example_shape=(64,))


def quiet(*_):
    pass


def trained_fp(data, epochs=8, seed=0):
    torch.manual_seed(seed)
    model = mlp(128)
    Trainer(model, TrainConfig(epochs=epochs, params_lr=1e-2, seed=seed), data, log=quiet,
            progress=False).fit()
    return model


# -- pieces --------------------------------------------------------------------------------
def test_param_groups_separate_logits_without_decay():
    model = to_lr(mlp(16))
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(logits_lr=0.1, params_lr=0.01,
                                                                    weight_decay=0.05))}
    logits = {id(m.weight_logits) for _, m in lr_layers(model)}
    assert {id(p) for p in groups["logits_lr"]["params"]} == logits
    assert groups["logits_lr"]["lr"] == 0.1 and groups["logits_lr"]["weight_decay"] == 0.0
    # the materialized discrete weight is not trained; BN / biases get no decay
    assert all(p.ndim <= 1 for p in groups["params_no_decay"]["params"])
    assert groups["params_no_decay"]["weight_decay"] == 0.0
    assert "params" not in groups   # every multi-dim real parameter here is an LR weight
    assert not any(p.requires_grad for _, m in lr_layers(model) for p in [m.weight])


def test_fit_steps_with_linear_warmup_then_cosine():
    """The rates every optimizer step of a fit used (timm's cosine, stepped per update):
    linear from warmup_lr over the warmup epoch, then base * (1 + cos(pi t / T)) / 2 at
    step t of T; the history records the rates of each epoch's last step."""
    data = digits_data(n_train=200)   # 180 training samples: 4 steps of 45 per epoch
    cfg = TrainConfig(epochs=3, batch_size=45, warmup_epochs=1, warmup_lr=1e-4,
                      logits_lr=0.02, params_lr=0.004, val_frozen=False)
    trainer = Trainer(to_lr(mlp(16)), cfg, data, log=quiet, progress=False)
    used, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    history = trainer.fit()

    def expected(base, t, warmup=4, total=12):
        if t < warmup:
            return 1e-4 + t * (base - 1e-4) / warmup
        return 0.5 * base * (1 + math.cos(math.pi * t / total))

    assert len(used) == 12
    for t, lrs in enumerate(used):
        assert lrs["logits_lr"] == pytest.approx(expected(0.02, t), rel=1e-12), t
        assert lrs["params_no_decay"] == pytest.approx(expected(0.004, t), rel=1e-12), t
    assert [h["logits_lr"] for h in history] == pytest.approx(
        [expected(0.02, t) for t in (3, 7, 11)], rel=1e-12)
    assert [h["lr"] for h in history] == pytest.approx([expected(0.004, t) for t in (3, 7, 11)],
                                                       rel=1e-12)


def test_distillation_loss_is_hinton_kd():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    T = 3.0
    p = torch.softmax(t / T, 1)
    expected = (p * (p.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(distillation_loss(s, t, T), expected)
    assert distillation_loss(t, t, T).abs() < 1e-6


def test_regularization_per_distribution():
    model = nn.Sequential(LRQuantLinear(4, 3, weight_quant=lr_weight_quant("binary", False)),
                          LRQuantLinear(3, 2, weight_quant=lr_weight_quant("ternary", False)))
    b, t = model[0], model[1]
    p = torch.sigmoid(b.weight_logits)
    expected = 0.5 * (p * (1 - p)).sum() + 0.25 * t.weight_logits.square().sum()
    torch.testing.assert_close(regularization(model, 0.5, 0.25), expected)
    torch.testing.assert_close(regularization(model, 0.5, 0.0), 0.5 * (p * (1 - p)).sum())
    assert regularization(model, 0.0, 0.0) is None


def test_bn_reestimation_gives_exact_statistics_of_the_frozen_network():
    torch.manual_seed(0)
    model = nn.Sequential(LRQuantConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    model(torch.randn(8, 3, 6, 6))          # stochastic LR statistics in the running stats
    freeze(model)
    batches = [torch.randn(5, 3, 6, 6) for _ in range(3)]
    assert reestimate_batchnorm(model, batches) == 1
    with torch.no_grad():
        z = torch.cat([model[0](x) for x in batches])  # frozen: deterministic
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    # cumulative average of per-batch unbiased variances (what momentum=None computes)
    per_batch = torch.stack([model[0](x).detach().transpose(0, 1).reshape(4, -1).var(1)
                             for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not model.training


def test_sign_schedules_are_applied_per_step():
    from lr_quant.nn.stochastic_sign import StochasticSign
    from lr_quant.quant.activation import sign_quant_modules

    data = digits_data(n_train=200)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), StochasticSign(16),
                          LRQuantLinear(16, 10))
    cfg = TrainConfig(epochs=2, batch_size=40, seed=0,
                      sign_temperature=ScheduleConfig(2.0, 0.5, "linear"),
                      sign_noise_std=ScheduleConfig(1.0, 0.25, "exponential"))
    trainer = Trainer(model, cfg, data, log=quiet, progress=False)
    trainer.fit()
    (sign,) = list(sign_quant_modules(model))
    last = trainer.total_steps - 1
    assert float(sign.temperature) == pytest.approx(2.0 - 1.5 * last / trainer.total_steps)
    assert float(sign.noise_std) == pytest.approx(0.25 ** (last / trainer.total_steps))


def test_sharpness_schedule_reaches_every_lr_layer():
    data = digits_data(n_train=200)
    model = nn.Sequential(LRQuantLinear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          LRQuantLinear(32, 10))
    cfg = TrainConfig(epochs=2, batch_size=40, seed=0,
                      sharpness=ScheduleConfig(1.0, 8.0, "exponential"))
    trainer = Trainer(model, cfg, data, log=quiet, progress=False)
    trainer.fit()
    r = (trainer.total_steps - 1) / trainer.total_steps
    assert [layer.lr_sharpness for _, layer in lr_layers(model)] == [pytest.approx(8.0 ** r)] * 2


# -- robustness ----------------------------------------------------------------------------
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    data = digits_data(n_train=300)
    model = to_lr(mlp(16))
    trainer = Trainer(model, TrainConfig(epochs=3, batch_size=50, seed=0), data,
                      output_dir=tmp_path, log=quiet, progress=False)
    trainer.fit(stop_after_steps=2)
    good = load_checkpoint(tmp_path / LAST_CHECKPOINT)[0]
    with torch.no_grad():   # poison a parameter: the next forward gives NaN
        model[1].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 3.*last good "
                                                 r"checkpoint is .*checkpoint.safetensors"):
        trainer.fit()
    kept = load_checkpoint(tmp_path / LAST_CHECKPOINT)[0]
    assert all(torch.equal(kept[k], good[k]) for k in good)
    assert torch.isfinite(kept["1.weight"]).all()


def test_bf16_autocast_and_logit_clamp():
    data = digits_data(n_train=200)
    model = to_lr(mlp(16))
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=50, amp=True, logit_clamp=0.5,
                                         logits_lr=1.0), data, log=quiet, progress=False)
    history = trainer.fit()
    assert math.isfinite(history[0]["train_loss"])
    assert all(m.weight_logits.abs().max() <= 0.5 for _, m in lr_layers(model))
    assert all(m.weight_logits.dtype == torch.float32 for _, m in lr_layers(model))


class _SubnormalProbe(nn.Module):
    """Records, in training forwards, whether arithmetic on a subnormal float32 gives 0."""

    def __init__(self):
        super().__init__()
        self.flushed = []

    def forward(self, x):
        tiny = torch.tensor([1e-40], dtype=torch.float32)   # subnormal (< 1.18e-38)
        self.flushed.append((self.training, bool((tiny * 1.0 + 0.0 == 0).item())))
        return x


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_during_fit_only(flush):
    supported = torch.set_flush_denormal(False)   # x86 (SSE3): True
    probe = _SubnormalProbe()
    model = nn.Sequential(probe, *to_lr(mlp(16)))
    Trainer(model, TrainConfig(epochs=1, batch_size=60, flush_denormal=flush),
            digits_data(n_train=200), log=quiet, progress=False).fit()
    training = [f for t, f in probe.flushed if t]
    assert len(training) == 3 and all(f == (flush and supported) for f in training)
    probe.flushed.clear()
    model(torch.randn(4, 64))   # after fit: the process-wide flag is off again
    assert probe.flushed == [(True, False)]


def test_batch_size_must_fit_the_data():
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(mlp(8), TrainConfig(batch_size=512), digits_data(n_train=300), log=quiet)


# -- resume --------------------------------------------------------------------------------
def _resume_setup(tmp_path, name):
    from lr_quant.nn.stochastic_sign import StochasticSign

    torch.manual_seed(0)
    data = digits_data(n_train=400)
    fp = mlp(32)
    teacher = copy.deepcopy(fp)
    model = to_lr(fp)
    model.insert(3, StochasticSign(32))   # sign noise + threshold too
    cfg = TrainConfig(epochs=3, batch_size=32, seed=3, kd_weight=0.5, beta_regularizer=1e-4,
                      logit_clamp=3.0, warmup_epochs=1, optimizer="adamw", weight_decay=0.01,
                      grad_clip=1.0,
                      sign_temperature=ScheduleConfig(1.0, 0.5, "cosine"))
    return Trainer(model, cfg, data, teacher=teacher, output_dir=tmp_path / name, log=quiet,
                   progress=False)


def test_resume_continues_bit_exactly(tmp_path):
    full = _resume_setup(tmp_path, "full")
    history = full.fit()
    steps = full.total_steps
    assert steps == 3 * (360 // 32)

    first = _resume_setup(tmp_path, "cut")
    first.fit(stop_after_steps=steps // 2 + 1)          # mid-epoch interruption
    assert first.state.global_step == steps // 2 + 1
    # a new process: fresh model, optimizer and RNG, then resume
    torch.manual_seed(1234)
    second = _resume_setup(tmp_path, "cut")
    resumed_history = second.fit(resume=tmp_path / "cut" / LAST_CHECKPOINT)
    assert second.state.global_step == steps
    a, b = full.model.state_dict(), second.model.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for h1, h2 in zip(history, resumed_history):
        assert h1["train_loss"] == h2["train_loss"] and h1["val_loss"] == h2["val_loss"]


# -- learning proofs (moved from the demo tests) -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("distribution", ["binary", "ternary"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fine_tuning_from_fp_recovers_accuracy(distribution, seed):
    """Measured (test split of 450 digits, chance 10%): FP 97-98%, LR at conversion
    81-92%, frozen LR binary 96-98%, ternary 97-98%. Bounds keep 4+ points of margin."""
    data = digits_data()
    fp = trained_fp(data, seed=seed)
    fp_acc = evaluate(fp, data.test)["accuracy"]
    model = to_lr(copy.deepcopy(fp), distribution)
    converted = evaluate(model, data.test)["accuracy"]
    cfg = TrainConfig(epochs=10, logits_lr=1e-2, params_lr=1e-2, seed=seed, kd_weight=0.3,
                      sampled_networks=3)
    trainer = Trainer(model, cfg, data, teacher=fp, log=quiet, progress=False)
    trainer.fit()
    metrics = trainer.finalize()
    assert fp_acc > 0.94
    assert metrics["frozen_test_accuracy"] > 0.92
    assert metrics["frozen_test_accuracy"] > converted + 0.03
    assert metrics["sampled_best_val_accuracy"] >= metrics["sampled_mean_val_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("distribution", ["binary", "ternary"])
def test_training_from_scratch_learns(distribution):
    """Measured: frozen binary 86%, ternary 91% (15 epochs from a random init)."""
    data = digits_data()
    torch.manual_seed(0)
    model = to_lr(mlp(256), distribution)
    trainer = Trainer(model, TrainConfig(epochs=15, logits_lr=1e-2, params_lr=1e-2), data,
                      log=quiet, progress=False)
    trainer.fit()
    assert trainer.finalize()["frozen_test_accuracy"] > 0.75
