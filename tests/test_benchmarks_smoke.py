"""Smoke test of the benchmark report (benchmarks/run.py --quick): it runs end to end and
the JSON holds what the report claims (structure, consistency, sanity of accuracies and
sizes). Timing values are never asserted (shared CPUs)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import run
    finally:
        sys.path.remove(str(ROOT))
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_writes_report_files(quick_results):
    out, results = quick_results
    md = (out / "results.md").read_text()
    assert "## Targets (issue 8)" in md and "## Accuracy" in md and "## Export" in md
    for name in results["meta"]["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["meta"]["quick"] is True


def test_speed_and_memory_entries(quick_results):
    _, results = quick_results
    (res,) = results["speed"]
    assert set(res["times"]) == {"fp", "lr_w1", "ste_w1"} and not res["errors"]
    for m, t in res["times"].items():
        assert len(t["samples_s"]) == res["rounds"] and all(s > 0 for s in t["samples_s"])
    assert res["times"]["fp"]["ratio_fp"] == pytest.approx(1.0)
    mem = res["memory"]
    # LR keeps the logits and a float weight per quantized weight: more parameters than FP,
    # and the x^2 / variance path saves more tensors for backward
    assert mem["lr_w1"]["param_bytes"] > mem["fp"]["param_bytes"]
    assert mem["lr_w1"]["saved_bytes"] > mem["fp"]["saved_bytes"] > 0
    assert mem["lr_w1"]["total_bytes"] == mem["lr_w1"]["saved_bytes"] + 3 * mem["lr_w1"]["param_bytes"]
    assert res["profiles"]["lr_w1"]["top"], "profile rows"
    # issue 14's targets at this input size (32x32), and issue 8's at every size
    assert {r["target"] for r in results["targets"]} >= {
        "LR W1 step <= 2.5x FP", "LR W1 training memory <= 2x FP"}
    assert all(r["model"] == res["case"] == "resnet10t 32x32 b4" for r in results["targets"])


def test_accuracy_entries(quick_results):
    _, results = quick_results
    tasks = {t["task"]: t for t in results["accuracy"]}
    assert set(tasks) == {"digits_mlp_mid", "gratings_cnn"}
    digits = tasks["digits_mlp_mid"]
    assert not digits["errors"]
    for method, per in digits["summary"].items():
        assert set(per) == {str(b) for b in digits["budgets"]}
        for b, s in per.items():
            assert 0.0 <= s["mean"] <= 1.0 and s["lrs"] and all(l in digits["lrs"] for l in s["lrs"])
    # conversion keeps the pretrained network's knowledge: well above chance at 0 epochs
    assert digits["summary"]["lr_w1"]["0"]["mean"] > 0.5
    # at 0 epochs LR and STE W1A1 are the same discrete network (mode = sign of the
    # pretrained weights, same calibrated thresholds)
    assert digits["summary"]["lr_w1a1"]["0"]["mean"] == pytest.approx(
        digits["summary"]["ste_w1a1"]["0"]["mean"])
    # the val split picks the lr: every run row has both val and test accuracies
    assert all(0 <= r["val"] <= 1 and 0 <= r["test"] <= 1 for r in digits["runs"])


def test_export_and_pack_entries(quick_results):
    _, results = quick_results
    rows = results["export"]
    assert rows and all("error" not in r for r in rows)
    for r in rows:
        assert r["export_verified"] and r["packed_same_argmax"]
        assert r["packed_state_bytes"] < r["fp32_state_bytes"]
        assert r["packed_layer_compression"] > 10
        assert math.isfinite(r["packed_max_rel_err"]) and r["packed_max_rel_err"] < 1e-4
    assert any("BipolarQuant" in k for r in rows for k in r["quant_nodes"])
