"""The compiled training path (lr_quant.compile_regions, ``train.compile``) against eager:
the same outputs and gradients at a fixed seed (the regions draw torch's random numbers),
no graph break inside the compiled regions, and a Trainer run that uses it."""

import copy

import pytest
import torch
from torch import nn

from lr_quant import set_compile
from lr_quant.compile_regions import compiled
from lr_quant.convert import convert
from lr_quant.moments import MomentTensor
from lr_quant.nn.lr_weight import LRWeightMixin
from lr_quant.quant.activation import StochasticBinaryQuant
from lr_quant.quant.threshold import calibrate_thresholds

pytestmark = pytest.mark.slow   # Inductor compiles C++ kernels (about a minute)

W1A1 = {
    "version": 2, "name": "compile_w1a1",
    "weights": {"conv": "lr_binary_per_channel", "linear": "lr_binary_per_channel"},
    "keep_fp": {"first_conv": False, "classifier": False, "names": ["0", "10"]},
    "activations": {"quantizer": "stochastic_sign", "threshold_init": "median",
                    "drop_relu": True, "moments": True},
}


def _w1a1_cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(6, 3, 8, 8)
    convert(model, W1A1, example_input=x)
    calibrate_thresholds(model, x)
    return model.to(dtype).train()


def _step(model, x, y):
    torch.manual_seed(11)
    out = model(x)
    out = getattr(out, "value", out)
    nn.functional.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_compiled_training_step_equals_eager_outputs_and_gradients():
    eager = _w1a1_cnn()
    fast = copy.deepcopy(eager)
    switched = set_compile(fast)
    lr_count = sum(isinstance(m, LRWeightMixin) for m in eager.modules())
    sign_count = sum(isinstance(m, StochasticBinaryQuant) for m in eager.modules())
    assert lr_count == 2 and sign_count == 2 and switched == lr_count + sign_count
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out_fast, grads_fast = _step(fast, x, y)   # the regions draw torch's random numbers
    out_eager, grads_eager = _step(eager, x, y)
    assert compiled(LRWeightMixin._lr_sample_core) is compiled(LRWeightMixin._lr_sample_core)
    torch.testing.assert_close(out_fast, out_eager, rtol=1e-12, atol=1e-12)
    assert grads_fast.keys() == grads_eager.keys() and len(grads_eager) > 10
    for name, g in grads_eager.items():
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-9, atol=1e-12, msg=name)
    # switched off again: the eager path (no compiled call) gives the same numbers
    set_compile(fast, False)
    fast.zero_grad()
    out_off, _ = _step(fast, x, y)
    torch.testing.assert_close(out_off, out_eager, rtol=0, atol=0)


def test_compiled_regions_have_no_graph_break():
    model = _w1a1_cnn(torch.float32)
    layers = [m for m in model.modules() if isinstance(m, LRWeightMixin)]
    signs = [m for m in model.modules() if isinstance(m, StochasticBinaryQuant)]
    x = torch.randn(6, 8, 8, 8)
    # plain input (first LR layer) and a moment input (m_x, v_x) as after a sign
    for x_var in (None, torch.rand_like(x)):
        report = torch._dynamo.explain(LRWeightMixin._lr_sample_core)(layers[0], x, x_var, None)
        assert report.graph_break_count == 0 and report.graph_count == 1, report
    mean, var = torch.randn(6, 8, 8, 8), torch.rand(6, 8, 8, 8) + 0.1
    for region in (StochasticBinaryQuant._sample, StochasticBinaryQuant._moments):
        report = torch._dynamo.explain(region)(signs[0], mean, var, 1e-8)
        assert report.graph_break_count == 0 and report.graph_count == 1, (region, report)


def test_set_compile_only_touches_modules_with_a_compiled_path():
    model = _w1a1_cnn()
    assert set_compile(model) == 4
    assert all(m.lr_compile for m in model.modules() if hasattr(type(m), "lr_compile"))
    assert not hasattr(model[0], "lr_compile")       # the float first conv
    assert set_compile(nn.Sequential(nn.Linear(2, 2))) == 0


def test_trainer_compile_option_runs_the_regions_while_fitting(monkeypatch):
    """``train.compile: true`` switches the regions on for fit() and off afterwards (the
    compiler is replaced by a recorder here: the compiled numbers are the first test's)."""
    import lr_quant.nn.lr_weight as lr_weight_module
    import lr_quant.quant.activation as activation_module
    from lr_quant.nn import LRQuantLinear, StochasticSign
    from lr_quant.train import Trainer
    from lr_quant.train_config import TrainConfig

    from lr_quant.data import Datasets, digits_split
    from torch.utils.data import TensorDataset

    x, y, x_test, y_test = digits_split(seed=0)
    train = TensorDataset(x[40:240], y[40:240])
    data = Datasets(train=train, val=TensorDataset(x[:40], y[:40]),
                    test=TensorDataset(x_test, y_test), num_classes=10, train_eval=train,
                    example_shape=(64,))

    def quiet(*_):
        pass

    calls = []

    def recorder(fn, device_type):
        assert device_type == "cpu"
        calls.append(fn.__qualname__)
        return fn

    monkeypatch.setattr(lr_weight_module, "compiled", recorder)
    monkeypatch.setattr(activation_module, "compiled", recorder)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), StochasticSign(16),
                          LRQuantLinear(16, 10))
    cfg = TrainConfig(epochs=1, batch_size=40, seed=0, compile=True)
    trainer = Trainer(model, cfg, data, log=quiet, progress=False)
    trainer.fit()
    steps = trainer.total_steps
    assert calls.count("LRWeightMixin._lr_sample_core") == steps
    assert calls.count("StochasticBinaryQuant._sample") == steps
    assert not any(getattr(m, "lr_compile", False) for m in model.modules())
    calls.clear()
    Trainer(model, TrainConfig(epochs=1, batch_size=40, seed=0), data, log=quiet,
            progress=False).fit()
    assert calls == []


@pytest.mark.parametrize("output_moments", [False, True], ids=["sample", "moments"])
def test_cpu_regions_keep_the_nchw_layout_and_save_what_eager_saves(output_moments):
    """With oneDNN, Inductor would turn a region's convolutions channels_last and convert
    at every boundary with the eager NCHW code around it (slower, and it keeps more); and its
    partitioner would keep x^2 for the variance convolution's weight gradient, which eager
    rebuilds from x. Every 4-d tensor the compiled region saves for the backward, its outputs
    and the input gradient are NCHW-contiguous; it saves no more bytes than eager, except
    the noise of a drawn sample (eager replays it from the generator state; a compiled
    region keeps it); the numbers are eager's."""
    from lr_quant import LRQuantConv2d
    from lr_quant.moments import split_moments
    from lr_quant.quant import lr_weight_quant

    torch.manual_seed(0)
    eager = LRQuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                     weight_quant=lr_weight_quant("binary", True),
                                     lr_output_moments=output_moments).train()
    fast = copy.deepcopy(eager)
    set_compile(fast)
    x = torch.randn(4, 8, 10, 10)
    results, saved_bytes = [], []
    for layer in (fast, eager):
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = (storage.nbytes(), t)
            return t

        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(xi)
        outs = split_moments(out) if output_moments else (out, None)
        outs = [o for o in outs if o is not None]
        weights = [torch.linspace(-1, 1, o.numel()).view_as(o) * (k + 1)
                   for k, o in enumerate(outs)]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results.append((*[o.detach() for o in outs], xi.grad, layer.weight_logits.grad))
        saved_bytes.append(sum(n for n, _ in saved.values()))
        if layer is fast:
            planes = [t for _, t in saved.values() if t.dim() == 4 and t.shape[1] > 1 and
                      t.shape[2] * t.shape[3] > 1]
            assert planes, "the compiled region saved no 4-d tensor"
            assert all(t.is_contiguous() for t in planes), \
                [(tuple(t.shape), t.stride()) for t in planes if not t.is_contiguous()]
            assert all(o.is_contiguous() for o in outs) and xi.grad.is_contiguous()
    noise_bytes = 0 if output_moments else results[1][0].numel() * results[1][0].element_size()
    assert 0 < saved_bytes[0] <= saved_bytes[1] + noise_bytes, (saved_bytes, noise_bytes)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
