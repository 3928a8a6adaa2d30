"""Accuracy after conversion + short fine-tuning: FP vs LR vs Brevitas STE, small models.

Tasks (all offline, in-process, seeded):
  digits_mlp_mid   8x8 digits, 20% training split, MLP 64-256-256-10 (BN, ReLU); first and
                   last Linear full precision, the middle one quantized
  digits_mlp_all   the same with every Linear quantized (first layer reads float pixels)
  gratings_cnn     10 orientations of noisy sinusoidal gratings (16x16, random frequency,
                   phase, contrast, Gaussian noise): a task FP does not saturate; CNN
                   conv(1-32)-conv(32-64)-pool-conv(64-64)-gap-fc, first conv + fc float

Protocol, identical for every method: one FP model is pretrained per (task, seed); each
method converts a copy with `lr_quant.convert` (same recipe as the speed benchmark), then
fine-tunes with Adam at a constant learning rate (LR logits get 10x, the ratio of the
packaged recipes' logits_lr / params_lr). The network is evaluated after 0, 1, 2, ... epochs
as a *discrete* network: LR layers frozen to the mode, then BatchNorm statistics
re-estimated on the training split (all methods, FP included). For every (method, budget,
seed) the learning rate is the best of the sweep on the validation split; the test split
is only reported.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import METHODS, Stat, convert_method

ACC_METHODS = ["fp", "lr_w1", "lr_w2", "lr_w1a1", "ste_w1", "ste_w2", "ste_w1a1"]
LOGIT_LR_FACTOR = 10.0


# -- data ---------------------------------------------------------------------------------
def _standardize(x_train, *others):
    mean, std = x_train.mean(), x_train.std()
    return [(x - mean) / std for x in (x_train,) + others]


def _stratified(y: np.ndarray, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        start = 0
        for i, f in enumerate(fractions):
            n = int(round(len(idx) * f)) if i < len(fractions) - 1 else len(idx) - start
            parts[i].append(idx[start:start + n])
            start += n
    return [np.sort(np.concatenate(p)) for p in parts]


def digits_data(seed: int, train_fraction: float = 0.2, val_fraction: float = 0.15):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    tr, va, te = _stratified(y, [train_fraction, val_fraction, 1 - train_fraction -
                                 val_fraction], seed)
    xs = _standardize(x[tr], x[va], x[te])
    return tuple(torch.from_numpy(a) for a in (xs[0], y[tr], xs[1], y[va], xs[2], y[te]))


def gratings(n: int, seed: int, size: int = 16, noise: float = 1.2):
    """n images (n, 1, size, size) of 10 grating orientations (18 degrees apart)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    theta = y * math.pi / 10 + rng.normal(0, math.radians(4), n)
    freq = rng.uniform(0.12, 0.3, n)
    phase = rng.uniform(0, 2 * math.pi, n)
    contrast = rng.uniform(0.4, 1.0, n)
    c = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    proj = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
    img = contrast[:, None, None] * np.sin(2 * math.pi * freq[:, None, None] * proj +
                                           phase[:, None, None])
    img = img + rng.normal(0, noise, img.shape)
    return img[:, None].astype(np.float32), y.astype(np.int64)


def gratings_data(seed: int, n_train: int, n_val: int, n_test: int, noise: float = 1.2):
    x, y = gratings(n_train + n_val + n_test, seed=1000 + seed, noise=noise)
    a, b = n_train, n_train + n_val
    xs = _standardize(x[:a], x[a:b], x[b:])
    return tuple(torch.from_numpy(t) for t in (xs[0], y[:a], xs[1], y[a:b], xs[2], y[b:]))


# -- models -------------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn(width: int = 32) -> nn.Sequential:
    w1, w2 = width, 2 * width
    return nn.Sequential(nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
                         nn.Conv2d(w1, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(w2, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, 10))


TASKS = {
    "digits_mlp_mid": dict(model=mlp, fp_names=["0", "6"],
                           title="digits 8x8, 20% train, MLP, middle layer quantized"),
    "digits_mlp_all": dict(model=mlp, fp_names=[],
                           title="digits 8x8, 20% train, MLP, all 3 layers quantized"),
    "gratings_cnn": dict(model=cnn, fp_names=["0", "12"],
                         title="10-class noisy gratings 16x16, CNN, 2 middle convs quantized"),
}


# -- training -----------------------------------------------------------------------------
def _plain(t):
    return t if isinstance(t, torch.Tensor) and type(t) is torch.Tensor else getattr(t, "value", t)


def _optimizer(model: nn.Module, lr: float):
    logits = [p for n, p in model.named_parameters() if n.endswith("weight_logits")]
    ids = {id(p) for p in logits}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [dict(params=rest, lr=lr)]
    if logits:
        groups.append(dict(params=logits, lr=lr * LOGIT_LR_FACTOR))
    return torch.optim.Adam(groups)


def fit_epochs(model, x, y, epochs: int, lr: float, batch: int, seed: int):
    """Constant-lr Adam; yields after every epoch (so one run gives every budget)."""
    g = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(_plain(model(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        yield epoch


@torch.no_grad()
def discrete_eval(model, x_train, splits, batch: int = 512) -> List[float]:
    """Freeze a copy (LR: mode), re-estimate BN on x_train, accuracy on each (x, y)."""
    from lr_quant.freeze import freeze
    from lr_quant.nn.lr_layers import lr_layers

    m = copy.deepcopy(model)
    if lr_layers(m):
        freeze(m)
    m.eval()
    norms = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for b in norms:
        b.reset_running_stats()
        b.momentum = None
        b.train()
    for s in range(0, len(x_train), batch):
        m(x_train[s:s + batch])
    m.eval()
    return [float((_plain(m(x)).argmax(1) == y).float().mean()) for x, y in splits]


def pretrain_fp(task: str, data, seed: int, epochs: int, batch: int) -> nn.Module:
    torch.manual_seed(seed)
    model = TASKS[task]["model"]()
    for _ in fit_epochs(model, data[0], data[1], epochs, 3e-3, batch, seed):
        pass
    return model


def run_task(task: str, seeds: Sequence[int], lrs: Sequence[float], budgets: Sequence[int],
             data_fn, fp_epochs: int, batch: int, methods=ACC_METHODS, log=print) -> dict:
    runs = []  # one row per (method, seed, lr, epoch)
    errors = {}
    max_epochs = max(budgets)
    for seed in seeds:
        data = data_fn(seed)
        x_tr, y_tr, x_va, y_va, x_te, y_te = data
        fp = pretrain_fp(task, data, seed, fp_epochs, batch)
        fp_val, fp_test = discrete_eval(fp, x_tr, [(x_va, y_va), (x_te, y_te)])
        log(f"  {task} seed {seed}: pretrained FP val {fp_val:.3f} test {fp_test:.3f}")
        for method in methods:
            for lr in lrs:
                torch.manual_seed(seed)
                try:
                    model = convert_method(fp, method, x_tr[:256], keep_first_last=False,
                                           fp_names=TASKS[task]["fp_names"])
                except Exception as e:
                    errors[method] = f"{type(e).__name__}: {e}"
                    log(f"  {task} {method}: FAILED {errors[method]}")
                    break
                if 0 in budgets:
                    va, te = discrete_eval(model, x_tr, [(x_va, y_va), (x_te, y_te)])
                    runs.append(dict(method=method, seed=seed, lr=lr, epoch=0, val=va, test=te))
                for epoch in fit_epochs(model, x_tr, y_tr, max_epochs, lr, batch, seed):
                    if epoch in budgets:
                        va, te = discrete_eval(model, x_tr, [(x_va, y_va), (x_te, y_te)])
                        runs.append(dict(method=method, seed=seed, lr=lr, epoch=epoch,
                                         val=va, test=te))
            best = [r for r in runs if r["method"] == method and r["seed"] == seed and
                    r["epoch"] == max_epochs]
            if best:
                log(f"  {task} seed {seed} {method}: after {max_epochs} ep, test " +
                    " ".join(f"lr{r['lr']:g}={r['test']:.3f}" for r in best))
    summary = summarize(runs, methods, budgets, seeds)
    return dict(task=task, title=TASKS[task]["title"], seeds=list(seeds), lrs=list(lrs),
                budgets=list(budgets), fp_epochs=fp_epochs, batch=batch,
                n_train=int(len(data[0])), n_val=int(len(data[2])), n_test=int(len(data[4])),
                summary=summary, runs=runs, errors=errors,
                labels={m: METHODS[m]["label"] for m in methods})


def summarize(runs, methods, budgets, seeds) -> Dict[str, Dict[str, dict]]:
    """method -> budget -> {mean, std, values, lrs}: test acc at the val-best lr per seed."""
    out: Dict[str, Dict[str, dict]] = {}
    for m in methods:
        for b in budgets:
            tests, chosen = [], []
            for s in seeds:
                cands = [r for r in runs if r["method"] == m and r["epoch"] == b and r["seed"] == s]
                if not cands:
                    continue
                best = max(cands, key=lambda r: (r["val"], -r["lr"]))  # ties: smaller lr
                tests.append(best["test"])
                chosen.append(best["lr"])
            if tests:
                st = Stat.of(tests)
                out.setdefault(m, {})[str(b)] = dict(mean=st.mean, std=st.std, values=st.values,
                                                     lrs=chosen)
    return out
