"""benchmarks.run: a run of some parts keeps the other parts of the earlier results.json,
and the report's targets follow the input size (issue 14: per-size step bounds)."""

import json

import pytest

@pytest.fixture(scope="module")
def bench(benchmark_modules):
    return benchmark_modules("run", "report")


def test_parts_not_run_are_kept_with_their_origin(bench, tmp_path):
    run, _ = bench
    earlier = {"meta": {"date": "2026-11-30 10:00 UTC", "command": "python -m benchmarks.run"},
               "speed": ["old speed"], "targets": ["old"], "accuracy": ["acc"],
               "accuracy_protocol": "Protocol ...", "export": {"size": 1}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    results = {"meta": {"date": "now"}, "speed": ["new speed"], "targets": ["new"]}
    run._keep_parts_not_run(results, path, {"speed"})
    assert results["speed"] == ["new speed"] and results["targets"] == ["new"]
    assert results["accuracy"] == ["acc"] and results["export"] == {"size": 1}
    origin = {"date": "2026-11-30 10:00 UTC", "command": "python -m benchmarks.run"}
    assert results["meta"]["kept_parts"] == {"accuracy": origin, "export": origin}
    # kept twice: the origin stays the run that measured it
    path.write_text(json.dumps(results))
    again = {"meta": {"date": "later"}, "speed": ["newer"]}
    run._keep_parts_not_run(again, path, {"speed"})
    assert again["meta"]["kept_parts"]["accuracy"] == origin
    # nothing earlier: nothing kept
    fresh = {"meta": {}}
    run._keep_parts_not_run(fresh, tmp_path / "absent.json", {"speed"})
    assert "kept_parts" not in fresh["meta"]


def _speed_entry(size, fp, lr, lr_compiled, mem_fp=100, mem_lr=150):
    times = {"fp": {"median_s": fp}, "lr_w1": {"median_s": lr},
             "lr_w1_compiled": {"median_s": lr_compiled}}
    memory = {m: {"total_bytes": mem_fp if m == "fp" else mem_lr} for m in times}
    return dict(model="resnet18", case=f"resnet18 {size}x{size} b8", image_size=size,
                times=times, memory=memory,
                labels={"fp": "FP32", "lr_w1": "LR W1", "lr_w1_compiled": "LR W1 compiled"})


def test_targets_follow_the_input_size_and_cover_compiled_variants(bench):
    _, report = bench
    rows = report.target_rows([_speed_entry(32, 1.0, 2.4, 2.6), _speed_entry(112, 1.0, 2.1, 1.9),
                               _speed_entry(224, 1.0, 3.0, 3.0)])
    by = {(r["model"], r["target"]): r for r in rows}
    assert by[("resnet18 32x32 b8", "LR W1 step <= 2.5x FP")]["met"] is True
    assert by[("resnet18 32x32 b8", "LR W1 compiled step <= 2.5x FP")]["met"] is False
    assert by[("resnet18 112x112 b8", "LR W1 step <= 2.0x FP")]["met"] is False
    assert by[("resnet18 112x112 b8", "LR W1 compiled step <= 2.0x FP")]["value"] == \
        pytest.approx(1.9)
    assert not any("step <= 2" in t for (c, t) in by if c.startswith("resnet18 224"))
    assert by[("resnet18 224x224 b8", "LR W1 training memory <= 2x FP")]["value"] == \
        pytest.approx(1.5)
    # a method that was not measured is reported as n/a, not dropped
    assert by[("resnet18 224x224 b8", "LR W2 training memory <= 2x FP")]["met"] is None
