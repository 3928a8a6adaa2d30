"""lr_quant.train.optim: timm optimizers and learning-rate schedules for LR models.

Every timm optimizer trains a tiny LR model with the logits in their own group; every
accepted schedule gives the rates of its analytic formula at each step; plateau reduces
the rate when the validation accuracy stalls (also through a Trainer, across a resume);
layer decay scales the real-valued parameters' rates per layer, never the logits'."""

import importlib.util
import math

import pytest
import timm.optim
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lr_quant.data import Datasets
from lr_quant.nn import LRQuantLinear, lr_layers
from lr_quant.quant import lr_weight_quant
from lr_quant.recipe import Recipe
from lr_quant.schema import RecipeError
from lr_quant.train import LAST_CHECKPOINT, Trainer, build_optimizer, build_scheduler
from lr_quant.train_config import TrainConfig, timm_schedules

LOGITS_LR, PARAMS_LR, WEIGHT_DECAY = 0.05, 0.01, 0.02


def tiny_lr_model():
    torch.manual_seed(0)
    return nn.Sequential(LRQuantLinear(6, 8, weight_quant=lr_weight_quant("binary", False)),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _needs(name):
    """Why timm's optimizer `name` cannot run here (None: it can)."""
    info = timm.optim.get_optimizer_info(name)
    if isinstance(info.opt_class, str):   # apex / bitsandbytes
        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None:
            return f"needs the {package!r} package"
        return "needs a CUDA device" if not torch.cuda.is_available() else "cuda"
    if info.second_order:
        return "needs second-order gradients"
    return None


def _check_groups(model, optimizer):
    groups = {g["name"]: g for g in optimizer.param_groups}
    logits = {id(p) for _, m in lr_layers(model) for p in m.lr_parameters()}
    assert {id(p) for p in groups["logits_lr"]["params"]} == logits
    assert groups["logits_lr"]["lr"] == LOGITS_LR and groups["logits_lr"]["weight_decay"] == 0
    assert [p.shape for p in groups["params"]["params"]] == [model[3].weight.shape]
    assert groups["params"]["lr"] == PARAMS_LR
    assert groups["params"]["weight_decay"] == WEIGHT_DECAY
    assert all(p.ndim == 1 for p in groups["params_no_decay"]["params"])
    assert groups["params_no_decay"]["weight_decay"] == 0
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))   # no parameter in two groups
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:It is highly recommended to have 'opt_einsum'")
@pytest.mark.parametrize("name", timm.optim.list_optimizers())
def test_every_timm_optimizer_trains_the_lr_model(name, monkeypatch):
    model = tiny_lr_model()
    cfg = TrainConfig(optimizer=name, logits_lr=LOGITS_LR, params_lr=PARAMS_LR,
                      weight_decay=WEIGHT_DECAY)
    reason = _needs(name)
    if reason == "cuda":
        pytest.skip(f"{name}: a CUDA optimizer (this test trains on the CPU)")
    if reason is not None:
        with pytest.raises(ValueError, match=f"optimizer='{name}' {reason}"):
            build_optimizer(model, cfg)
        return
    if name.startswith("kron"):   # skip kron's torch.compile (~25 s of compiling here)
        monkeypatch.setattr("timm.optim.kron.has_dynamo", False)
    optimizer = build_optimizer(model, cfg)
    _check_groups(model, optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    moved = set()
    for _ in range(2):   # adopt leaves the parameters at the first step
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        moved |= {n for n, p in model.named_parameters()
                  if p.grad is not None and p.grad.abs().max() > 1e-6}
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "0.weight_logits" in moved
    assert moved <= changed, moved - changed
    _check_groups(model, optimizer)   # the steps left the groups' settings alone


def test_lookahead_wraps_a_timm_optimizer():
    model = tiny_lr_model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="lookahead_adam",
                                                   logits_lr=LOGITS_LR, params_lr=PARAMS_LR,
                                                   weight_decay=WEIGHT_DECAY))
    assert type(optimizer).__name__ == "Lookahead"
    _check_groups(model, optimizer)


def test_optimizer_kwargs_reach_the_optimizer_and_bad_ones_are_named():
    model = tiny_lr_model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw",
                                                   optimizer_kwargs={"betas": [0.8, 0.9]}))
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in optimizer.param_groups)
    with pytest.raises(ValueError, match=r"optimizer='adamw' with optimizer_kwargs=.*'betaz'"):
        build_optimizer(model, TrainConfig(optimizer="adamw", optimizer_kwargs={"betaz": 1}))
    with pytest.raises(ValueError, match="optimizer_kwargs: 'lr' is set by train.params_lr"):
        TrainConfig(optimizer_kwargs={"lr": 1.0})


# -- schedules ------------------------------------------------------------------------------
B, P = 0.1, 0.01   # logits_lr, params_lr
EPOCHS, STEPS = 4, 5
T = EPOCHS * STEPS

# schedule: (config fields, rate at step t for base rate b), written from the formulas
SCHEDULES = {
    "cosine": (dict(warmup_epochs=1, warmup_lr=1e-3, min_lr=1e-4),
               lambda b, t: 1e-3 + t * (b - 1e-3) / STEPS if t < STEPS
               else 1e-4 + 0.5 * (b - 1e-4) * (1 + math.cos(math.pi * t / T))),
    "tanh": ({}, lambda b, t: 0.5 * b * (1 - math.tanh(-7 * (1 - t / T) + 3 * t / T))),
    "step": (dict(decay_epochs=1.5, decay_rate=0.5), lambda b, t: b * 0.5 ** math.floor(t / 7.5)),
    # timm's convention: a milestone at step m applies from step m - 1
    "multistep": (dict(decay_milestones=[1, 2.5]),
                  lambda b, t: b * 0.1 ** ((t >= 5 - 1) + (t >= 12.5 - 1))),
    "constant": (dict(warmup_epochs=1), lambda b, t: b * t / STEPS if t < STEPS else b),
    "poly": (dict(decay_rate=2.0), lambda b, t: b * (1 - t / T) ** 2),
    # stable, then 1 - sqrt over the last decay_epochs
    "wsd": (dict(decay_epochs=1), lambda b, t: b if t <= 15 else b * (1 - math.sqrt((t - 15) / 5))),
}


def _rates(config, steps=T):
    """[(logits rate, params rate)] of optimizer steps 0..steps-1, stepped as the Trainer
    does (step_update(steps done) after each)."""
    optimizer = build_optimizer(tiny_lr_model(), config)
    scheduler = build_scheduler(optimizer, config, STEPS)
    rates = []
    for t in range(steps):
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
        rates.append((groups["logits_lr"], groups["params_no_decay"]))
        scheduler.step_update(t + 1)
    return rates


def test_every_accepted_schedule_is_tested():
    assert set(timm_schedules()) - {"plateau", "rsqrt"} == set(SCHEDULES)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_rates_follow_the_formula(name):
    fields, rate = SCHEDULES[name]
    config = TrainConfig(epochs=EPOCHS, schedule=name, logits_lr=B, params_lr=P, **fields)
    for t, (logits, params) in enumerate(_rates(config)):
        assert logits == pytest.approx(rate(B, t), rel=1e-9, abs=1e-15), (name, t)
        assert params == pytest.approx(rate(P, t), rel=1e-9, abs=1e-15), (name, t)


@pytest.mark.skipif("rsqrt" not in timm_schedules(), reason="timm without rsqrt")
def test_rsqrt_decays_to_min_lr():
    config = TrainConfig(epochs=EPOCHS, schedule="rsqrt", logits_lr=B, params_lr=P,
                         warmup_epochs=1, min_lr=1e-4)
    logits = [r[0] for r in _rates(config, T + 1)]
    assert logits[STEPS] == pytest.approx(B)   # the end of warmup
    assert all(a >= b for a, b in zip(logits[STEPS:], logits[STEPS + 1:]))
    assert logits[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize("fields, message", [
    (dict(schedule="step"), "decay_epochs must be > 0 with schedule 'step'"),
    (dict(schedule="multistep"), "decay_milestones must be increasing epochs"),
    (dict(schedule="multistep", decay_milestones=[3, 1]), "decay_milestones must be increasing"),
    (dict(schedule="plateau", val_fraction=0.0), "it needs val_fraction > 0"),
    (dict(schedule="cosin"), "schedule='cosin' is not one of .* \\(did you mean 'cosine'\\?\\)"),
    (dict(schedule_kwargs={"nois": [0.5]}), "unknown key 'nois'.*did you mean 'noise'"),
    (dict(schedule_kwargs={"min_lr": 0.1}), "'min_lr' is set by train.min_lr"),
    (dict(layer_decay=0.0), "layer_decay must be > 0"),
])
def test_bad_schedule_settings_are_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_plateau_reduces_the_rate_when_the_metric_stalls():
    config = TrainConfig(schedule="plateau", logits_lr=B, params_lr=P, decay_rate=0.5,
                         min_lr=B / 3, schedule_kwargs={"patience_epochs": 1})
    optimizer = build_optimizer(tiny_lr_model(), config)
    scheduler = build_scheduler(optimizer, config, STEPS)
    scheduler.step_update(3)   # per-update stepping leaves plateau alone
    logits = []
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7], start=1):
        scheduler.step(epoch, accuracy)
        logits.append(optimizer.param_groups[0]["lr"])
    # patience 1: the 2nd epoch without improvement halves the rate; min_lr floors it
    assert logits == pytest.approx([B, B, B, B / 2, B / 2, B / 3, B / 3])
    # min_lr is one absolute floor for every group: the params group (P < B / 3) stays at P
    assert [g["lr"] for g in optimizer.param_groups[1:]] == [P, P]


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g)
    train = TensorDataset(x[:100], y[:100])
    return Datasets(train=train, val=TensorDataset(x[100:], y[100:]), test=TensorDataset(x, y),
                    num_classes=3, train_eval=train, example_shape=(6,))


def _plateau_trainer(out, **fields):
    cfg = TrainConfig(**{**dict(epochs=4, batch_size=25, schedule="plateau", logits_lr=B,
                                params_lr=P, val_frozen=False, bn_reestimate_batches=1,
                                decay_rate=0.5, schedule_kwargs={"patience_epochs": 0}),
                         **fields})
    trainer = Trainer(tiny_lr_model(), cfg, _data(), output_dir=out, log=lambda *_: None,
                      progress=False)
    trainer._validate = lambda: {"loss": 1.0, "accuracy": 0.5}   # a stalled metric
    return trainer


def test_plateau_in_a_fit_and_across_a_resume(tmp_path):
    """Each epoch without improvement halves the rates (patience 0); a run stopped in
    epoch 3 and resumed in a new Trainer continues with the reduced rates and counters,
    bit for bit; a resume with another logits_lr scales the reduced rate by new / old."""
    full = _plateau_trainer(tmp_path / "full")
    history = full.fit()
    assert [h["logits_lr"] for h in history] == pytest.approx([B, B, B / 2, B / 4])
    assert [h["lr"] for h in history] == pytest.approx([P, P, P / 2, P / 4])

    _plateau_trainer(tmp_path / "cut").fit(stop_after_steps=10)   # epoch 3, step 2 of 4
    resumed = _plateau_trainer(tmp_path / "cut")
    resumed.resume(tmp_path / "cut" / LAST_CHECKPOINT)
    assert resumed.optimizer.param_groups[0]["lr"] == B / 2
    assert resumed.scheduler.lr_scheduler.num_bad_epochs == 0   # just reduced
    changed = _plateau_trainer(tmp_path / "cut", logits_lr=2 * B)
    changed.resume(tmp_path / "cut" / LAST_CHECKPOINT)
    groups = changed.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(B) and groups[0]["initial_lr"] == 2 * B
    assert groups[1]["lr"] == P / 2

    resumed.fit()
    assert len(resumed.state.history) == 4
    for h1, h2 in zip(history, resumed.state.history):
        assert (h1["logits_lr"], h1["lr"], h1["train_loss"]) == (
            h2["logits_lr"], h2["lr"], h2["train_loss"])
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)



def test_per_step_schedule_resumes_at_the_restored_step_with_new_rates(tmp_path):
    trainer = Trainer(tiny_lr_model(), TrainConfig(epochs=2, batch_size=25, logits_lr=B,
                                                   params_lr=P, val_frozen=False),
                      _data(), output_dir=tmp_path, log=lambda *_: None, progress=False)
    trainer.fit(stop_after_steps=3)
    resumed = Trainer(tiny_lr_model(), TrainConfig(epochs=4, batch_size=25, logits_lr=B / 10,
                                                   params_lr=P, val_frozen=False),
                      _data(), output_dir=tmp_path, log=lambda *_: None, progress=False)
    resumed.resume(tmp_path / LAST_CHECKPOINT)
    # this config's cosine (16 steps now) at step 3
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 16))
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [B / 10 * factor, P * factor, P * factor])


# -- layer decay -----------------------------------------------------------------------------
def test_layer_decay_scales_each_layer_and_leaves_the_logits_alone():
    import timm

    from lr_quant.convert import convert

    model = convert(timm.create_model("test_resnet", num_classes=10), Recipe())
    config = TrainConfig(layer_decay=0.5, weight_decay=WEIGHT_DECAY, logits_lr=LOGITS_LR,
                         params_lr=PARAMS_LR)
    optimizer = build_optimizer(model, config)
    build_scheduler(optimizer, config, 3)   # timm's schedulers apply the groups' lr_scale
    groups = optimizer.param_groups
    assert groups[0]["name"] == "logits_lr" and groups[0]["lr"] == LOGITS_LR
    assert groups[0]["weight_decay"] == 0 and "lr_scale" not in groups[0]
    logits = {id(p) for _, m in lr_layers(model) for p in m.lr_parameters()}
    assert {id(p) for p in groups[0]["params"]} == logits
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}

    # test_resnet: stem, 4 stages of one block, head: layer k of 6 gets 0.5 ** (5 - k)
    def depth(name):
        if name.startswith("layer"):
            return int(name[len("layer")])
        return 5 if name.startswith("fc.") else 0

    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups[1:] for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) in rate:
            lr, wd = rate[id(p)]
            assert lr == pytest.approx(PARAMS_LR * 0.5 ** (5 - depth(name))), name
            assert wd == (0 if p.ndim <= 1 else WEIGHT_DECAY), name
    assert rate[id(model.fc.weight)][0] == PARAMS_LR


# -- recipes ---------------------------------------------------------------------------------
def test_recipe_names_a_bad_optimizer_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"^train.optimizer: optimizer='lamm' is not a timm "
                                          r"optimizer \(did you mean 'lamb'\?\)"):
        Recipe.from_dict({"train": {"optimizer": "lamm"}})
    recipe = Recipe.from_dict({"train": {"optimizer": "lion", "schedule": "multistep",
                                         "decay_milestones": [2, 4], "layer_decay": 0.7,
                                         "optimizer_kwargs": {"betas": [0.9, 0.95]},
                                         "schedule_kwargs": {"noise": [0.5]}}})
    assert recipe.train.decay_milestones == [2.0, 4.0]
    assert recipe.train.optimizer_kwargs == {"betas": [0.9, 0.95]}
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_command_line_overrides_of_the_optimization_fields(capsys):
    from lr_quant.cli import build_parser, main, resolve_recipe

    args = build_parser().parse_args(
        ["train", "-c", "quickstart", "--output", "x", "--train.optimizer", "lamb",
         "--train.schedule", "multistep", "--train.decay_milestones", "[2, 4]",
         "--train.layer_decay", "0.8", "--train.optimizer_kwargs", "{betas: [0.9, 0.95]}",
         "--train.schedule_kwargs", "{noise: [0.5], noise_std: 0.5}"])
    train = resolve_recipe(args).train
    assert (train.optimizer, train.schedule, train.decay_milestones) == ("lamb", "multistep",
                                                                         [2.0, 4.0])
    assert train.layer_decay == 0.8 and train.optimizer_kwargs == {"betas": [0.9, 0.95]}
    assert train.schedule_kwargs == {"noise": [0.5], "noise_std": 0.5}
    assert main(["train", "-c", "quickstart", "--output", "x", "--train.optimizer", "lamm"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer: optimizer='lamm' is not a timm optimizer (did you mean 'lamb'?)" in err
    assert "Traceback" not in err
