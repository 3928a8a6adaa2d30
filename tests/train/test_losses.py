"""Loss terms against their formulas, and mixup / cutmix composed with KD: the student and the
teacher see the same mixed batch, cross-entropy is taken against the soft targets."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lr_quant.data import DataConfig, Datasets, batch_mixer, digits_split
from lr_quant.train import Trainer
from lr_quant.train.losses import classification_loss, distillation_loss
from lr_quant.train_config import TrainConfig


def test_classification_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    logp = torch.log_softmax(logits, 1)
    nll = -logp[torch.arange(6), y]
    assert classification_loss(logits, y).item() == pytest.approx(nll.mean().item(), rel=1e-12)
    eps = 0.2   # (1 - eps) one-hot + eps / C
    smoothed = (1 - eps) * nll - eps / 5 * logp.sum(1)
    assert classification_loss(logits, y, eps).item() == pytest.approx(smoothed.mean().item(),
                                                                       rel=1e-12)
    soft = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    assert classification_loss(logits, soft).item() == pytest.approx(
        -(soft * logp).sum(1).mean().item(), rel=1e-12)
    # a one-hot soft target is the hard-label loss
    assert classification_loss(logits, F.one_hot(y, 5).double()).item() == pytest.approx(
        nll.mean().item(), rel=1e-12)


def test_mixer_is_timm_mixup_with_smoothed_targets():
    assert batch_mixer(DataConfig(), 10) is None
    mixer = batch_mixer(DataConfig(mixup=0.4), 4, label_smoothing=0.1)
    np.random.seed(3)
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, target = mixer(x.clone(), y)
    # x_mixed = lam x + (1 - lam) x[reversed], one lam for the batch (mode "batch")
    lam = ((mixed - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()
    assert 0 <= lam <= 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5, rtol=0)
    smooth = lambda t: F.one_hot(t, 4).float() * 0.9 + 0.1 / 4   # noqa: E731
    torch.testing.assert_close(target, lam * smooth(y) + (1 - lam) * smooth(y.flip(0)),
                               atol=1e-5, rtol=0)


def _data():
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    train = TensorDataset(x_train[:128], y_train[:128])
    return Datasets(train=train, val=TensorDataset(x_train[:0], y_train[:0]),
                    test=TensorDataset(x_test, y_test), num_classes=10, train_eval=train,
                    example_shape=(64,))


def test_student_and_teacher_see_the_same_mixed_batch():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    teacher = nn.Sequential(nn.Linear(64, 10))
    seen = {"student": [], "teacher": []}
    student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()))
    teacher.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))
    config = TrainConfig(epochs=1, batch_size=32, kd_weight=0.5, val_fraction=0.0,
                         val_frozen=False, label_smoothing=0.1)
    data = _data()
    trainer = Trainer(student, config, data, teacher=teacher, log=lambda *_: None,
                      progress=False, mixer=batch_mixer(DataConfig(mixup=1.0), 10, 0.1))
    losses = []
    inner = trainer._loss

    def recording(x, y):
        loss, out = inner(x, y)
        losses.append((x.clone(), y.clone(), loss.item()))
        return loss, out

    trainer._loss = recording
    trainer.fit(stop_after_steps=2)
    assert len(losses) == 2
    raw = {tuple(row.tolist()) for row in data.train.tensors[0]}
    for k, (x, y, _) in enumerate(losses):
        torch.testing.assert_close(seen["student"][k], x)
        torch.testing.assert_close(seen["teacher"][k], x)
        assert y.shape == (32, 10) and torch.allclose(y.sum(1), torch.ones(32))
        assert sum(tuple(row.tolist()) in raw for row in x) < len(x)   # mixed, not raw rows
    # the loss is (1 - w) CE(soft) + w KD(teacher(x_mixed)) on the parameters of that step
    x, y, _ = losses[-1]
    with torch.no_grad():
        out, t = student(x), teacher(x)
        expected = 0.5 * classification_loss(out, y) + 0.5 * distillation_loss(out, t, 4.0)
        trainer._wrap()   # fit released its wrapper
        got, _ = inner(x, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_odd_batches_cannot_be_mixed():
    with pytest.raises(ValueError, match="must be even"):
        Trainer(nn.Linear(64, 10), TrainConfig(batch_size=31), _data(), log=lambda *_: None,
                progress=False, mixer=batch_mixer(DataConfig(cutmix=1.0), 10))
