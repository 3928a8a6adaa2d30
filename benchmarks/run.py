"""The benchmark report: ``python -m benchmarks.run [--quick] [--out benchmarks/results]``.

Writes results.json (every number, per-round samples and per-run accuracies included),
results.md (tables) and PNG plots. Parts: speed (training step time, memory, profiles),
accuracy (digits MLP, procedural gratings CNN), export (QONNX export, packed size).
--quick runs a tiny configuration of each part (the smoke test). ``--parts`` runs a subset;
the other parts of an existing results.json in --out are kept (meta.kept_parts says from when).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from . import accuracy, export_size, report, speed

FULL = dict(
    speed_models=["resnet18", "mobilenetv2_050"], speed_rounds=11,
    speed_cases=[(32, 32), (112, 16), (224, 8)],   # (image size, batch)
    speed_methods=speed.SPEED_METHODS, profile_methods=["fp", "lr_w1", "ste_w1", "lr_w1a1"],
    micro_threads="1,2",
    micro_rounds=9,
    seeds=[0, 1, 2], lrs=[1e-3, 3e-3, 1e-2],
    digits_budgets=[0, 1, 2, 10], digits_fp_epochs=15,
    gratings=dict(n_train=1000, n_val=400, n_test=1000), gratings_budgets=[0, 1, 2, 4],
    gratings_fp_epochs=6, gratings_width=16,
    tasks=["digits_mlp_mid", "digits_mlp_all", "gratings_cnn"],
    acc_methods=accuracy.ACC_METHODS)
QUICK = dict(
    speed_models=["resnet10t"], speed_rounds=1, speed_cases=[(32, 4)], micro_rounds=1,
    speed_methods=["fp", "lr_w1", "ste_w1"], profile_methods=["lr_w1"], micro_threads="1",
    seeds=[0], lrs=[3e-3], digits_budgets=[0, 1], digits_fp_epochs=1,
    gratings=dict(n_train=100, n_val=50, n_test=50), gratings_budgets=[0, 1],
    gratings_fp_epochs=1, gratings_width=4,
    tasks=["digits_mlp_mid", "gratings_cnn"],
    acc_methods=["fp", "lr_w1", "lr_w1a1", "ste_w1a1"])


PART_KEYS = {"speed": ("speed", "conv_microbench", "targets"),
             "accuracy": ("accuracy", "accuracy_protocol"), "export": ("export",)}


def _keep_parts_not_run(results: dict, previous_path: Path, parts: set) -> None:
    """A run of some parts keeps the other parts of an earlier results.json in the same
    folder (marked in meta.kept_parts with that run's date and command)."""
    if not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    kept = {}
    for part, keys in PART_KEYS.items():
        if part in parts or not all(k in previous for k in keys[:1]):
            continue
        for k in keys:
            if k in previous:
                results[k] = previous[k]
        old_meta = previous.get("meta", {})
        kept[part] = old_meta.get("kept_parts", {}).get(part) or dict(
            date=old_meta.get("date"), command=old_meta.get("command"))
    if kept:
        results["meta"]["kept_parts"] = kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--parts", default="speed,accuracy,export",
                   help="comma-separated subset of speed,accuracy,export")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the main measurements (default 1: on a shared "
                        "2-core machine, 2 threads oversubscribe; see the microbenchmark)")
    p.add_argument("--no-flush-denormal", action="store_true",
                   help="keep subnormal floats (default: flushed to zero, as lr_quant's "
                        "Trainer does on CPU; see TrainConfig.flush_denormal)")
    p.add_argument("--micro-threads", default=None,
                   help="thread counts for the conv microbenchmark (default 1,2; quick: 1)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    flush = not args.no_flush_denormal and torch.set_flush_denormal(True)
    try:
        t_start = time.perf_counter()

        def log(msg):
            print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

        import brevitas
        notes = [f"main measurements with torch.set_num_threads({args.threads})",
                 "subnormal floats flushed to zero (torch.set_flush_denormal, as lr_quant's "
                 "Trainer does on CPU)" if flush else "subnormal floats kept"]
        results = dict(meta=dict(
            command="python -m benchmarks.run" + (" --quick" if args.quick else "") +
                    (f" --parts {args.parts}" if args.parts != "speed,accuracy,export" else "") +
                    (f" --threads {args.threads}" if args.threads != 1 else "") +
                    (" --no-flush-denormal" if args.no_flush_denormal else ""),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            platform=platform.platform(terse=True), torch=torch.__version__,
            brevitas=brevitas.__version__, cpus=os.cpu_count(), quick=args.quick,
            threads=args.threads, load_avg_start=list(os.getloadavg()), notes=notes,
            config=cfg))

        if "speed" in parts:
            results["speed"] = []
            for name in cfg["speed_models"]:
                for size, batch in cfg["speed_cases"]:
                    log(f"speed: {name} {size}x{size} batch {batch}")
                    results["speed"].append(speed.run_model(
                        name, cfg["speed_rounds"], batch, size, methods=cfg["speed_methods"],
                        profile_methods=cfg["profile_methods"] if size == cfg["speed_cases"][0][0]
                        else (), log=log))
            results["conv_microbench"] = []
            micro = args.micro_threads or cfg["micro_threads"]
            for n in [int(t) for t in micro.split(",") if t]:
                torch.set_num_threads(n)
                mb = speed.conv_microbench(cfg["micro_rounds"], log=log)
                mb["threads"] = n
                results["conv_microbench"].append(mb)
            torch.set_num_threads(args.threads)
            results["targets"] = report.target_rows(results["speed"])

        if "accuracy" in parts:
            results["accuracy"] = []
            results["accuracy_protocol"] = " ".join(accuracy.__doc__.split("Protocol", 1)[1].split())
            results["accuracy_protocol"] = "Protocol" + results["accuracy_protocol"]
            g = cfg["gratings"]
            width = cfg["gratings_width"]
            accuracy.TASKS["gratings_cnn"]["model"] = partial(accuracy.cnn, width)
            for task in cfg["tasks"]:
                log(f"accuracy: {task}")
                if task.startswith("digits"):
                    data_fn, budgets, fp_epochs, batch = (accuracy.digits_data, cfg["digits_budgets"],
                                                          cfg["digits_fp_epochs"], 32)
                else:
                    data_fn = partial(accuracy.gratings_data, n_train=g["n_train"],
                                      n_val=g["n_val"], n_test=g["n_test"])
                    budgets, fp_epochs, batch = cfg["gratings_budgets"], cfg["gratings_fp_epochs"], 64
                results["accuracy"].append(accuracy.run_task(
                    task, cfg["seeds"], cfg["lrs"], budgets, data_fn, fp_epochs, batch,
                    methods=cfg["acc_methods"], log=log))

        if "export" in parts:
            log("export / pack")
            results["export"] = export_size.run(args.quick, log=log)

        _keep_parts_not_run(results, out / "results.json", parts)
        results["meta"]["total_s"] = time.perf_counter() - t_start
        results["meta"]["load_avg_end"] = list(os.getloadavg())
        plot_files = report.plots(results, out)
        results["meta"]["plots"] = plot_files
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / "results.md").write_text(report.markdown(results, plot_files))
        log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {plot_files}")
    finally:
        if flush:   # the flag is process wide: leave the process as it was
            torch.set_flush_denormal(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
