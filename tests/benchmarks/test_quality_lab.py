"""The quality lab (benchmarks/quality.py) and its procedural tasks (benchmarks/quality_tasks.py).

Unit tests: the task images (shapes, dtypes, balance, determinism, the idempotent writer),
the STE analogue of a recipe, the learning-rate selection on a synthetic cache (chosen on
validation, not test; failures reported). The end-to-end test runs the tiniest real grid:
one `lr-quant train` subprocess on the digits, and checks the report against the run's
own metrics.json."""

import json
import math

import numpy as np
import pytest

@pytest.fixture(scope="module")
def lab(benchmark_modules):
    return benchmark_modules("quality", "quality_tasks")


# -- tasks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["shapes", "textures"])
def test_draw_shapes_balance_determinism(lab, task):
    _, qt = lab
    images, labels = qt.draw(task, 30, seed=3)
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (30,) and np.bincount(labels, minlength=10).tolist() == [3] * 10
    again, labels2 = qt.draw(task, 30, seed=3)
    assert np.array_equal(images, again) and np.array_equal(labels, labels2)
    other, _ = qt.draw(task, 30, seed=4)
    assert not np.array_equal(images, other)
    assert images.std() > 10   # not blank


def test_draw_unknown_task(lab):
    with pytest.raises(ValueError, match="unknown task"):
        lab[1].draw("nope", 10, 0)


def test_write_imagefolder_layout_and_idempotence(lab, tmp_path):
    from PIL import Image

    _, qt = lab
    root = qt.write_imagefolder("shapes", tmp_path / "shapes", n_train=20, n_test=10, seed=1)
    for split, per_class in (("train", 2), ("val", 1)):
        counts = [len(list((root / split / f"class_{k}").glob("*.png"))) for k in range(10)]
        assert counts == [per_class] * 10
    # the files are the seeded draw: image i of the train split lies in its label's folder
    images, labels = qt.draw("shapes", 20, 1)
    png = np.asarray(Image.open(root / "train" / f"class_{labels[0]}" / "00000.png"))
    assert np.array_equal(png, images[0])
    marker = json.loads((root / "task.json").read_text())
    assert marker == {"task": "shapes", "n_train": 20, "n_test": 10, "seed": 1, "size": 32}
    # a second call with the same spec writes nothing
    victim = next((root / "train" / "class_0").glob("*.png"))
    victim.unlink()
    assert qt.write_imagefolder("shapes", root, n_train=20, n_test=10, seed=1) == root
    assert not victim.exists()


# -- methods -------------------------------------------------------------------------------
def test_method_args_read_the_recipe_and_swap_lr_for_ste(lab):
    from lr_quant.recipe import load_recipe
    from lr_quant.recipe_overrides import apply_overrides

    q, _ = lab
    lr = load_recipe("resnet_w1a1_stochastic").train
    args = q.method_args("ste_w1a1", "resnet10t", 3.0)
    assert args[:2] == ["-c", "resnet_w1a1_stochastic"]
    assert float(args[args.index("--train.logits_lr") + 1]) == pytest.approx(3 * lr.logits_lr)
    assert float(args[args.index("--train.params_lr") + 1]) == pytest.approx(3 * lr.params_lr)
    sets = {args[i + 1] for i, a in enumerate(args) if a == "--set"}
    assert sets == {"weights.conv=brevitas_binary", "weights.depthwise=brevitas_binary",
                    "weights.linear=brevitas_binary", "activations.quantizer=ste_sign"}
    assert "--set" not in q.method_args("lr_w1a1", "resnet10t", 1.0)
    # the packaged W1A1 default is exactly the STE twin the lab measures at x1
    twin_args = q.method_args("ste_w1a1", "resnet10t", 1.0)
    twin = apply_overrides("resnet_w1a1_stochastic", sets=[
        twin_args[i + 1] for i, a in enumerate(twin_args) if a == "--set"] +
        [f"train.params_lr={twin_args[twin_args.index('--train.params_lr') + 1]}"])
    default = load_recipe("resnet_w1a1")
    for part in ("weights", "keep_fp"):
        assert getattr(twin, part) == getattr(default, part), part
    for key in ("quantizer", "threshold_init", "drop_relu", "input_quantizer"):
        assert getattr(twin.activations, key) == getattr(default.activations, key), key
    for key in ("params_lr", "kd_weight", "kd_temperature", "optimizer", "schedule", "epochs"):
        assert getattr(twin.train, key) == getattr(default.train, key), key
    # depthwise-separable nets: mobilenet_w1 (ternary depthwise) and its STE analogue
    mob = q.method_args("ste_w1", "mobilenetv2_050", 1.0)
    assert mob[:2] == ["-c", "mobilenet_w1"] and "weights.depthwise=brevitas_ternary" in mob
    assert "weights.conv=brevitas_binary" in mob
    assert "--set" in q.method_args("ste_w2", "resnet10t", 1.0)


# -- selection and report on a synthetic cache ---------------------------------------------
GRID = ["--tasks", "digits16", "--models", "resnet10t", "--methods", "lr_w1", "--budgets", "2",
        "--seeds", "0", "1", "--lr-mults", "0.3", "1", "3"]


def _fake_run(q, cache, mult, seed, val, test, train_acc=0.5, seconds=(3.0, 5.0)):
    run = q.Run("digits16", "resnet10t", "lr_w1", mult, 2, seed)
    folder = run.path(cache)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"fp_test_accuracy": 0.9, "frozen_val_accuracy": val, "frozen_test_accuracy": test,
         "final_test_accuracy": test}))
    (folder / "history.json").write_text(json.dumps(
        [{"epoch": i + 1, "seconds": s, "train_accuracy": train_acc, "val_accuracy": val}
         for i, s in enumerate(seconds)]))
    (folder / "lab.json").write_text(json.dumps({"rc": 0, "wall_s": 10.0, "command": []}))
    return folder


def test_selection_on_validation_and_failures_reported(lab, tmp_path):
    q, _ = lab
    cache, out = tmp_path / "cache", tmp_path / "out"
    # seed 0: lr x3 has the best val (and the worse test: selection must not look at test)
    _fake_run(q, cache, 0.3, 0, val=0.70, test=0.95)
    _fake_run(q, cache, 3.0, 0, val=0.80, test=0.60, train_acc=0.9)
    # seed 1: lr x1 failed; x0.3 wins
    _fake_run(q, cache, 0.3, 1, val=0.75, test=0.70, train_acc=0.7)
    _fake_run(q, cache, 3.0, 1, val=0.50, test=0.99)
    failed = q.Run("digits16", "resnet10t", "lr_w1", 1.0, 2, 1).path(cache)
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps(
        {"rc": 2, "error": "lr-quant train: error: boom", "stderr_tail": "boom"}))

    rc = q.main(["--report-only", *GRID, "--cache", str(cache), "--out", str(out)])
    assert rc == 1   # a run of the grid failed
    results = json.loads((out / "quality.json").read_text())
    (entry,) = results["table"]
    cell = entry["methods"]["lr_w1"]["2"]
    assert cell["lr_mults"] == [3.0, 0.3] and cell["seeds"] == [0, 1]
    assert cell["test"]["values"] == [0.60, 0.70]
    assert cell["test"]["mean"] == pytest.approx(0.65)
    assert cell["test"]["std"] == pytest.approx(math.sqrt(0.005))
    assert cell["train_seconds"]["mean"] == pytest.approx(8.0)
    assert cell["stochastic_train"]["mean"] == pytest.approx(0.8)
    assert cell["runs"] == 5 and cell["expected"] == 6 and cell["failed"] == 1
    assert entry["sec_per_epoch"]["lr_w1"] == pytest.approx(4.0)
    (fail,) = [r for r in results["runs"] if r["status"] == "failed"]
    assert fail["lr_mult"] == 1.0 and fail["error"] == "lr-quant train: error: boom"
    md = (out / "quality.md").read_text()
    assert "65.0 ± 7.1 (4/6)" in md and "## Failed runs" in md and "error: boom" in md
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_ties_prefer_the_recipe_lr(lab):
    q, _ = lab
    rec = lambda m: dict(task="t", model="m", method="lr_w1", epochs=1, seed=0,  # noqa: E731
                         lr_mult=m, status="done", val=0.5, test=m)
    assert q.select([rec(3.0), rec(1.0), rec(0.3)])[("t", "m", "lr_w1", 1, 0)]["lr_mult"] == 1.0
    # closest to 1 on a log scale (3 is closer than 0.3), then the smaller
    assert q.select([rec(3.0), rec(0.3)])[("t", "m", "lr_w1", 1, 0)]["lr_mult"] == 3.0
    assert q.select([rec(2.0), rec(0.5)])[("t", "m", "lr_w1", 1, 0)]["lr_mult"] == 0.5


def test_lr_vs_ste_verdicts(lab):
    q, _ = lab
    stat = lambda x: dict(mean=x, std=0.0, values=[x])  # noqa: E731
    cell = lambda acc, sec: dict(test=stat(acc), train_seconds=stat(sec))  # noqa: E731
    entry = dict(methods={"lr_w1": {"1": cell(0.80, 100), "4": cell(0.85, 400)},
                          "ste_w1": {"1": cell(0.81, 50), "4": cell(0.84, 200)}})
    rows = {r["budget"]: r for r in q.compare(entry, [1, 4])}
    assert rows[1]["equal_epochs"]["verdict"] == "loss"           # -1.0 point
    assert rows[1]["equal_time"]["ste_budget"] == 1
    assert rows[4]["equal_epochs"]["verdict"] == "win"            # +1.0 point
    assert rows[4]["equal_time"]["ste_budget"] == 4
    assert q.verdict(0.4) == "tie" and q.verdict(-0.49) == "tie"


def test_cache_refuses_runs_made_with_other_rates_than_the_recipe_gives_now(lab, tmp_path):
    """A multiplier names a rate relative to the recipe: a cached run whose recorded command
    used other rates (the recipe changed since) is "stale" and the lab refuses the cache,
    naming the run and both rates; runs with the current rates are "done"."""
    q, _ = lab
    cache = tmp_path / "cache"
    current = _fake_run(q, cache, 1.0, 0, val=0.7, test=0.7)
    (current / "lab.json").write_text(json.dumps(
        {"rc": 0, "wall_s": 10.0, "command": q.method_args("lr_w1", "resnet10t", 1.0)}))
    old = _fake_run(q, cache, 3.0, 0, val=0.7, test=0.7)
    command = q.method_args("lr_w1", "resnet10t", 3.0)
    command[command.index("--train.params_lr") + 1] = "0.123"
    (old / "lab.json").write_text(json.dumps({"rc": 0, "wall_s": 10.0, "command": command}))
    runs = [q.Run("digits16", "resnet10t", "lr_w1", m, 2, 0) for m in (1.0, 3.0)]
    assert [q.run_state(r, cache) for r in runs] == ["done", "stale"]
    with pytest.raises(SystemExit, match=r"1 cached run\(s\).*0\.123.*another --cache"):
        q.check_rates(runs, cache)
    with pytest.raises(SystemExit, match="other learning rates"):
        q.main(["--report-only", *GRID, "--cache", str(cache), "--out", str(tmp_path / "o")])


def test_cache_refuses_other_settings(lab, tmp_path):
    q, _ = lab
    q.check_settings(tmp_path, {"fp_epochs": 15, "set": []})
    q.check_settings(tmp_path, {"fp_epochs": 15, "set": []})
    with pytest.raises(SystemExit, match="another --cache"):
        q.check_settings(tmp_path, {"fp_epochs": 1, "set": []})


# -- end to end: one real `lr-quant train` subprocess (~20-30 s here, FP pretraining included) --
def test_lab_end_to_end_tiny(lab, tmp_path):
    q, _ = lab
    cache, out = tmp_path / "cache", tmp_path / "out"
    rc = q.main(["--tasks", "digits16", "--models", "resnet10t", "--methods", "lr_w1",
                 "--budgets", "1", "--seeds", "0", "--lr-mults", "1", "--fp-epochs", "1",
                 "--set", "data.train_fraction=0.2", "--set", "train.batch_size=32",
                 "--cache", str(cache), "--out", str(out)])
    run = q.Run("digits16", "resnet10t", "lr_w1", 1.0, 1, 0).path(cache)
    assert rc == 0, (run / "failed.json").read_text() if (run / "failed.json").exists() else rc
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1
    assert not (run / "checkpoint.safetensors").exists()   # deleted after a successful run
    # the run really used the lab's settings
    recipe_text = (run / "recipe.yaml").read_text()
    assert "train_fraction: 0.2" in recipe_text and "batch_size: 32" in recipe_text
    results = json.loads((out / "quality.json").read_text())
    cell = results["table"][0]["methods"]["lr_w1"]["1"]
    assert cell["test"]["values"] == [metrics["final_test_accuracy"]]
    assert cell["val"]["values"] == [metrics["frozen_val_accuracy"]]
    fp = json.loads((cache / "fp" / "resnet10t_digits16_e1_s0.json").read_text())
    assert results["table"][0]["fp"]["mean"] == fp["test_accuracy"]
    assert fp["test_accuracy"] == pytest.approx(metrics["fp_test_accuracy"])  # same teacher
    md = (out / "quality.md").read_text()
    assert f"{100 * metrics['final_test_accuracy']:.1f} ± 0.0" in md
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # cached: a second invocation trains nothing and reports the same
    assert q.main(["--tasks", "digits16", "--models", "resnet10t", "--methods", "lr_w1",
                   "--budgets", "1", "--seeds", "0", "--lr-mults", "1", "--fp-epochs", "1",
                   "--set", "data.train_fraction=0.2", "--set", "train.batch_size=32",
                   "--cache", str(cache), "--out", str(out)]) == 0
    assert json.loads((run / "metrics.json").read_text()) == metrics
