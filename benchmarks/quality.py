"""The quality lab: FP vs LR vs Brevitas STE, trained through the real user path (issue 12).

What it measures. For each task, timm model, method, epoch budget and seed, one
`lr-quant train` command (a subprocess, exactly what a user runs) fine-tunes a pretrained
FP model to binary / ternary weights (and binary activations), freezes it, re-estimates
BatchNorm and reports the deployed network's accuracy. The lab reports, per task and
model: test accuracy (mean ± std over seeds) by method and budget next to the pretrained
FP model's accuracy; training seconds per epoch per method; an equal-wall-clock view
(accuracy next to the training seconds it cost, and LR vs STE at equal epochs and at
equal time); and for LR the gap between the trained object (the stochastic network's
final-epoch train accuracy) and the deployed one (frozen mode, val accuracy).

Protocol (the fairness rules):
- Tasks: procedural 32x32 10-class ImageFolder data sets ("shapes", "textures",
  benchmarks/quality_tasks.py; 4400 train / 1000 test images), read through
  `--data.dataset imagefolder` so users' ImageFolder augmentation applies, and the bundled
  digits upsampled to 16x16 ("digits16").
- One FP model per (task, model, seed), pretrained with `lr_quant.quickstart.pretrain_fp`
  (default 15 epochs) on the training split minus the validation split that the
  fine-tuning runs of that seed carve out (`--train.seed` seeds that split), so the
  teacher never saw the images the learning rate is chosen on. Every method of that seed
  starts from the same FP file.
- Methods use the packaged recipes (recipes/*.yaml, read at run time, so recipe changes
  are picked up): lr_w1 = resnet_w1 (depthwise-separable nets: mobilenet_w1), lr_w2 =
  resnet_w2, lr_w1a1 = resnet_w1a1_stochastic (the all-LR W1A1 recipe; the packaged W1A1
  default resnet_w1a1 is its STE twin, which measured better). The STE baseline of each is
  the *same* recipe with every LR quantizer replaced by Brevitas' STE quantizer of the same
  precision (lr_binary* -> brevitas_binary, lr_ternary* -> brevitas_ternary,
  stochastic_sign -> ste_sign, stochastic_ternary -> ste_ternary) through `--set`: same
  epochs, optimizer, schedule, distillation, data and learning-rate sweep. A cached run
  is named by its multiplier, not by the rates: after a recipe's rates change (resnet_w1a1
  params_lr 1e-3 -> 3e-3 and resnet_w2 likewise on 2026-12-01) the lab refuses the cache
  (its runs' recorded rates differ) until the older runs are moved away.
- Learning rate: the same sweep for every method: multipliers (default 0.3, 1, 3) applied
  to both train.logits_lr and train.params_lr of the method's recipe. For every (task,
  model, method, budget, seed) the multiplier with the best `frozen_val_accuracy` (a
  validation split carved from the training data) is kept and that run's
  `final_test_accuracy` (the deployed network) is reported. Ties go to the multiplier
  closest to 1 (the recipe's own value) on a log scale, then to the smaller. The test split
  never takes part in a choice.
- Budgets: fine-tuning epochs (default 1, 4, 8, 16); seeds 0, 1, 2. Training seconds are
  the sum of history.json's per-epoch `seconds` at one thread per run: training steps plus
  the per-epoch validation `lr-quant train` does (for LR a frozen copy with BatchNorm
  re-estimated, for STE a plain evaluation, so LR's epochs carry a little extra). On a
  shared machine they are noisy: read them as ratios.

Run it from the repository root (2 CPU cores: `--jobs 2` at most, one thread per run):

    python -m benchmarks.quality --dry-run                      # the run list and a time estimate
    python -m benchmarks.quality --tasks shapes textures --models resnet10t \\
        --methods lr_w2 ste_w2 lr_w1a1 ste_w1a1 --budgets 4 8 --seeds 0 1 2 \\
        --lr-mults 0.3 1 3 --jobs 2
    python -m benchmarks.quality --report-only                  # rebuild the report from the cache

Runs are cached under `--cache` (default ~/.cache/lr_quant/lab):
runs/<task>/<model>/<method>/lr<mult>/e<epochs>_s<seed>/ holds what `lr-quant train`
wrote (metrics.json, history.json, recipe.yaml, train.log; the .safetensors checkpoints
are deleted unless `--keep-checkpoints`). A folder with metrics.json is never rerun, so
the grid can be extended incrementally; a failed run leaves failed.json (exit code, stderr
tail), is reported as failed and is tried again by the next invocation. Cheap runs go
first (small budgets, then cheaper methods). `--set KEY=VALUE` passes a recipe override
to every run (and data.* ones to FP pretraining); the cache records the settings that
its runs depend on but its paths do not name (lab.json) and refuses to mix others.
The report goes to benchmarks/results/quality.{json,md,png} (`--out`); the exit status is 1
if any run of the grid failed.

How long (measured on the 2 shared cores here, load ~5, one thread per run): a run costs
~20 s of start-up, conversion and final evaluation plus its epochs; on shapes / textures
(3960 training images, batch 64, 32x32) a resnet10t LR W1 epoch takes ~50 s (LR W2 ~1.2x,
LR W1A1 ~1.3x, STE ~0.5x; mobilenetv2_050 ~0.6x resnet10t; digits16 ~0.1x), FP
pretraining ~12 s per epoch. The tiny test setting (digits16, 20 % train, batch 32,
resnet10t, LR W1, 1 epoch, FP 1 epoch) takes ~11 s per run, ~30 s with the pretraining.
The default grid is 3 tasks x 2 models x 6 methods x 4 budgets (29 epochs) x 3 seeds x
3 multipliers = 1296 runs, ~70 CPU-hours; shapes + textures with both models ~63 CPU-hours
(~32 h at --jobs 2); the example above (144 runs) ~12 CPU-hours. `--dry-run` prints the
estimate for any grid, from the cached runs' measured seconds per epoch once there are some.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .common import Stat, median

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("~/.cache/lr_quant/lab").expanduser()
DEFAULT_OUT = ROOT / "benchmarks" / "results"
GENERATED_TASKS = ("shapes", "textures")
TASKS = {  # task -> `lr-quant train` data flags (imagefolder root filled in per cache)
    "shapes": dict(dataset="imagefolder", image_size=32),
    "textures": dict(dataset="imagefolder", image_size=32),
    "digits16": dict(dataset="digits", image_size=16),
}
MODELS = ["resnet10t", "mobilenetv2_050"]
DEPTHWISE_FAMILIES = ("mobilenet", "efficientnet", "mixnet", "ghostnet")
# method -> label, precision, packaged recipe (and the one for depthwise-separable nets),
# whether it is the STE baseline of that recipe, and a relative cost per epoch (seconds per
# epoch / LR W1's, measured on shapes; only orders the work and estimates time)
METHODS = {
    "lr_w1": dict(label="LR W1", precision="W1", recipe="resnet_w1", depthwise="mobilenet_w1",
                  ste=False, cost=1.0),
    "lr_w2": dict(label="LR W2", precision="W2", recipe="resnet_w2", ste=False, cost=1.2),
    "lr_w1a1": dict(label="LR W1A1", precision="W1A1", recipe="resnet_w1a1_stochastic",
                    ste=False, cost=1.3),
    "ste_w1": dict(label="STE W1", precision="W1", recipe="resnet_w1",
                   depthwise="mobilenet_w1", ste=True, cost=0.5),
    "ste_w2": dict(label="STE W2", precision="W2", recipe="resnet_w2", ste=True, cost=0.5),
    "ste_w1a1": dict(label="STE W1A1", precision="W1A1", recipe="resnet_w1a1_stochastic",
                     ste=True, cost=0.5),
}
STE_OF = {"lr_binary": "brevitas_binary", "lr_binary_per_channel": "brevitas_binary",
          "lr_ternary": "brevitas_ternary", "lr_ternary_per_channel": "brevitas_ternary",
          "stochastic_sign": "ste_sign", "stochastic_ternary": "ste_ternary"}
# time estimates (2 shared cores, load ~5): resnet10t LR W1 epoch on shapes (3960 images,
# 32x32, 1 thread), per-run start-up + conversion + final evaluation, FP pretraining epoch;
# scaled per task and model
REF_EPOCH_S, RUN_OVERHEAD_S, FP_EPOCH_S = 50.0, 20.0, 12.0
SCALE = {"digits16": 0.1, "mobilenetv2_050": 0.6}
DEFAULTS = dict(tasks=["shapes", "textures", "digits16"], models=MODELS, methods=list(METHODS),
                budgets=[1, 4, 8, 16], seeds=[0, 1, 2], lr_mults=[0.3, 1.0, 3.0])
CHECKPOINTS = ("checkpoint.safetensors", "final.safetensors")


# -- what one run is ---------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    task: str
    model: str
    method: str
    lr_mult: float
    epochs: int
    seed: int

    def path(self, cache: Path) -> Path:
        return (cache / "runs" / self.task / self.model / self.method / f"lr{self.lr_mult:g}"
                / f"e{self.epochs}_s{self.seed}")

    def cost(self) -> float:
        return self.epochs * METHODS[self.method]["cost"]


def recipe_name(method: str, model: str) -> str:
    spec = METHODS[method]
    if model.startswith(DEPTHWISE_FAMILIES) and "depthwise" in spec:
        return spec["depthwise"]
    return spec["recipe"]


def _quant_name(spec) -> Optional[str]:
    return spec["name"] if isinstance(spec, dict) else spec


def method_args(method: str, model: str, lr_mult: float) -> List[str]:
    """`lr-quant train` flags of a method: its packaged recipe, the swept learning rates
    (read from the recipe now) and, for STE, the recipe's LR quantizers swapped for STE."""
    from lr_quant.recipe import load_recipe

    name = recipe_name(method, model)
    recipe = load_recipe(name)
    args = ["-c", name, "--train.logits_lr", f"{recipe.train.logits_lr * lr_mult:.6g}",
            "--train.params_lr", f"{recipe.train.params_lr * lr_mult:.6g}"]
    if not METHODS[method]["ste"]:
        return args
    d = recipe.to_dict()
    if any(o.get("weights") or o.get("activation") for o in (d.get("overrides") or {}).values()):
        raise ValueError(f"recipe {name!r} sets per-layer quantizers: no automatic STE analogue")
    keys = [(f"weights.{k}", d["weights"][k]) for k in ("conv", "depthwise", "linear")]
    keys.append(("activations.quantizer", d["activations"]["quantizer"]))
    for key, spec in keys:
        q = _quant_name(spec)
        if q is None:
            continue
        if q not in STE_OF:
            raise ValueError(f"recipe {name!r}: {key}={q} has no STE analogue")
        args += ["--set", f"{key}={STE_OF[q]}"]
    return args


def data_args(task: str, cache: Path) -> Dict[str, str]:
    spec = dict(TASKS[task])
    if task in GENERATED_TASKS:
        spec["root"] = str(cache / "data" / task)
    return {k: str(v) for k, v in spec.items()}


def fp_path(cache: Path, task: str, model: str, epochs: int, seed: int) -> Path:
    return cache / "fp" / f"{model}_{task}_e{epochs}_s{seed}.safetensors"


def train_command(run: Run, cache: Path, fp: Path, sets: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "lr_quant.cli", "train"]
    cmd += method_args(run.method, run.model, run.lr_mult)
    cmd += ["--output", str(run.path(cache)), "--no-progress", "--model.name", run.model,
            "--model.checkpoint", str(fp), "--model.num_classes", "10",
            "--train.epochs", str(run.epochs), "--train.seed", str(run.seed)]
    for k, v in data_args(run.task, cache).items():
        cmd += [f"--data.{k}", v]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run_logged(cmd: List[str], folder: Path, stem: str) -> Dict:
    """Run `cmd`, stdout/stderr to folder/<stem>.log / .err; rc, wall seconds, error tail."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(folder / f"{stem}.log", "w") as out, open(folder / f"{stem}.err", "w") as err:
        rc = subprocess.run(cmd, stdout=out, stderr=err, env=_env(), cwd=ROOT).returncode
    lines = [ln for ln in (folder / f"{stem}.err").read_text(errors="replace").splitlines()
             if ln.strip()]
    return dict(rc=rc, wall_s=time.time() - t0, error=lines[-1] if lines else f"exit code {rc}",
                stderr_tail="\n".join(lines[-25:]), command=cmd)


# -- FP pretraining (a subprocess: python -m benchmarks.quality --pretrain-fp SPEC) --------
def fp_data_config(task: str, cache: Path, sets: List[str]):
    from lr_quant.recipe_overrides import parse_value
    from lr_quant.train_config import DataConfig

    kw = {k: parse_value(v) for k, v in data_args(task, cache).items()}
    kw.update({k.split("=", 1)[0][5:]: parse_value(k.split("=", 1)[1])
               for k in sets if k.startswith("data.")})
    return DataConfig(**kw)


def _val_fraction(sets: List[str]) -> float:
    from lr_quant.recipe_overrides import parse_value
    from lr_quant.train_config import TrainConfig

    given = [parse_value(s.split("=", 1)[1]) for s in sets if s.startswith("train.val_fraction=")]
    return float(given[-1]) if given else TrainConfig().val_fraction


def pretrain_main(spec: dict) -> int:
    """Pretrain (unless the weights exist) and evaluate one FP model; writes <fp>.json."""
    import torch

    from lr_quant.data import build_datasets, open_source
    from lr_quant.models import create_model
    from lr_quant.quickstart import pretrain_fp
    from lr_quant.train import evaluate

    torch.set_num_threads(1)
    cache, path = Path(spec["cache"]), Path(spec["path"])
    # the validation split of the fine-tuning runs of this seed (carved with train.seed)
    config = fp_data_config(spec["task"], cache, spec["sets"])
    source = open_source(config)
    # prepared with the model's data config, as the fine-tuning runs are (lr-quant train)
    resolver = create_model(spec["model"], source.num_classes, pretrained=False)
    data = build_datasets(config, _val_fraction(spec["sets"]), spec["seed"], model=resolver,
                          source=source)
    t0 = time.time()
    if not path.exists():
        pretrain_fp(spec["model"], data, spec["epochs"], path, spec["seed"], progress=False)
    model = create_model(spec["model"], data.num_classes, pretrained=str(path)).eval()
    result = {**spec, "seconds": time.time() - t0,
              "val_accuracy": evaluate(model, data.val)["accuracy"],
              "test_accuracy": evaluate(model, data.test)["accuracy"]}
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return 0


# -- running the grid ----------------------------------------------------------------------
def grid(args) -> List[Run]:
    runs = [Run(t, m, me, float(lr), b, s) for t in args.tasks for m in args.models
            for me in args.methods for lr in args.lr_mults for b in args.budgets
            for s in args.seeds]
    return sorted(runs, key=lambda r: (r.cost(), r.seed, r.task, r.model, r.method, r.lr_mult))


_RATE_FLAGS = ("--train.logits_lr", "--train.params_lr")


def _rates(command: List[str]) -> Dict[str, str]:
    return {flag: command[i + 1] for i, flag in enumerate(command[:-1]) if flag in _RATE_FLAGS}


def run_state(run: Run, cache: Path) -> str:
    """"done", "failed", "todo", or "stale": done with other learning rates than the
    method's recipe gives at this multiplier now (the recipe's rates changed since)."""
    folder = run.path(cache)
    if (folder / "metrics.json").exists():
        lab_json = folder / "lab.json"
        if lab_json.exists():
            ran = _rates(json.loads(lab_json.read_text()).get("command", []))
            now = _rates(method_args(run.method, run.model, run.lr_mult))
            if ran and ran != now:
                return "stale"
        return "done"
    return "failed" if (folder / "failed.json").exists() else "todo"


def check_rates(runs: List[Run], cache: Path) -> None:
    """Refuse a cache whose runs were made with other rates than their path's multiplier
    gives now: a multiplier names a rate relative to the recipe, which may have changed."""
    stale = [r for r in runs if run_state(r, cache) == "stale"]
    if stale:
        r = stale[0]
        ran = _rates(json.loads((r.path(cache) / "lab.json").read_text())["command"])
        now = _rates(method_args(r.method, r.model, r.lr_mult))
        raise SystemExit(
            f"error: {len(stale)} cached run(s) were trained with other learning rates than "
            f"their recipe gives at their multiplier now, e.g. {r.path(cache)}: {ran}, now "
            f"{now} (the recipe changed): move them away or use another --cache")


def check_settings(cache: Path, settings: dict) -> None:
    """The cache's runs depend on fp_epochs and --set values that their paths do not name."""
    path = cache / "lab.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            raise SystemExit(f"error: {cache} holds runs made with {old}, not {settings}: pass "
                             f"the same --fp-epochs / --set or use another --cache")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


class Lab:
    def __init__(self, args):
        self.args, self.cache = args, args.cache
        self.fp_locks: Dict[tuple, threading.Lock] = {}
        self.fp_errors: Dict[tuple, str] = {}
        self.lock = threading.Lock()
        self.done = 0

    def ensure_fp(self, task: str, model: str, seed: int) -> Path:
        a = self.args
        path = fp_path(self.cache, task, model, a.fp_epochs, seed)
        key = (task, model, seed)
        with self.lock:
            lock = self.fp_locks.setdefault(key, threading.Lock())
        with lock:
            if key in self.fp_errors:
                raise RuntimeError(self.fp_errors[key])
            if not path.with_suffix(".json").exists():
                what = "evaluating" if path.exists() else f"pretraining ({a.fp_epochs} epochs)"
                self.log(f"FP {model} on {task}, seed {seed}: {what}")
                spec = dict(task=task, model=model, seed=seed, epochs=a.fp_epochs,
                            path=str(path), cache=str(self.cache), sets=a.set)
                res = _run_logged([sys.executable, "-m", "benchmarks.quality", "--pretrain-fp",
                                   json.dumps(spec)], path.parent, path.stem)
                if res["rc"] != 0:
                    self.fp_errors[key] = f"FP pretraining failed: {res['error']}"
                    raise RuntimeError(self.fp_errors[key])
        return path

    def log(self, msg: str) -> None:
        with self.lock:
            print(msg, flush=True)

    def train(self, run: Run, total: int) -> None:
        folder = run.path(self.cache)
        if folder.exists():   # a failed or interrupted earlier try
            shutil.rmtree(folder)
        try:
            fp = self.ensure_fp(run.task, run.model, run.seed)
            cmd = train_command(run, self.cache, fp, self.args.set)
        except (RuntimeError, ValueError) as e:
            res = dict(rc=None, wall_s=0.0, error=str(e), stderr_tail=str(e), command=None)
        else:
            res = _run_logged(cmd, folder, "train")
            if res["rc"] == 0 and not (folder / "metrics.json").exists():
                res["error"] = "exit code 0 but no metrics.json"
        ok = res["rc"] == 0 and (folder / "metrics.json").exists()
        folder.mkdir(parents=True, exist_ok=True)
        if ok:   # warnings on stderr are no error
            res = {k: res[k] for k in ("rc", "wall_s", "command")}
        (folder / ("lab.json" if ok else "failed.json")).write_text(json.dumps(res, indent=2))
        if ok and not self.args.keep_checkpoints:
            for name in CHECKPOINTS:
                (folder / name).unlink(missing_ok=True)
        with self.lock:
            self.done += 1
            n = self.done
        if ok:
            test = json.loads((folder / "metrics.json").read_text())["final_test_accuracy"]
        what = f"test {test:.3f}" if ok else f"FAILED: {res['error'][:160]}"
        self.log(f"[{n}/{total}] {run.task} {run.model} {run.method} lr x{run.lr_mult:g} "
                 f"{run.epochs} ep seed {run.seed}: {what} ({res['wall_s']:.0f} s)")

    def execute(self, runs: List[Run]) -> None:
        from .quality_tasks import write_imagefolder

        for task in sorted({r.task for r in runs} & set(GENERATED_TASKS)):
            write_imagefolder(task, self.cache / "data" / task)
        todo = [r for r in runs if run_state(r, self.cache) != "done"]
        self.log(f"{len(runs) - len(todo)} of {len(runs)} runs cached; running {len(todo)} "
                 f"with {self.args.jobs} job(s)")
        pool = ThreadPoolExecutor(self.args.jobs)   # FIFO: cheap runs first
        futures = [pool.submit(self.train, r, len(todo)) for r in todo]
        try:
            for f in futures:
                f.result()
        finally:   # Ctrl-C (the runs in flight get it too) or a bug: start nothing more
            pool.shutdown(wait=True, cancel_futures=True)


def estimate_seconds(runs: List[Run], cache: Path) -> float:
    """Per-run seconds: cached runs' median seconds per epoch of the same (task, model,
    method) where there are some, else the reference figure scaled by method cost."""
    measured: Dict[tuple, List[float]] = {}
    for r in runs:
        h = r.path(cache) / "history.json"
        if (r.path(cache) / "metrics.json").exists() and h.exists():
            measured.setdefault((r.task, r.model, r.method), []).extend(
                row["seconds"] for row in json.loads(h.read_text()))
    total = 0.0
    for r in runs:
        per = measured.get((r.task, r.model, r.method))
        epoch_s = median(per) if per else (REF_EPOCH_S * METHODS[r.method]["cost"]
                                           * SCALE.get(r.task, 1) * SCALE.get(r.model, 1))
        total += RUN_OVERHEAD_S + r.epochs * epoch_s
    return total


# -- collecting and aggregating --------------------------------------------------------------
def collect(runs: List[Run], cache: Path) -> List[dict]:
    """One record per run of the grid that was tried (done or failed)."""
    records = []
    for r in runs:
        folder = r.path(cache)
        rec = dict(task=r.task, model=r.model, method=r.method, lr_mult=r.lr_mult,
                   epochs=r.epochs, seed=r.seed, path=str(folder))
        state = run_state(r, cache)
        if state == "todo":
            continue
        if state == "failed":
            fail = json.loads((folder / "failed.json").read_text())
            records.append({**rec, "status": "failed", "error": fail["error"],
                            "stderr_tail": fail.get("stderr_tail", "")})
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        if "frozen_val_accuracy" not in metrics or "final_test_accuracy" not in metrics:
            records.append({**rec, "status": "failed",
                            "error": "metrics.json lacks frozen_val_accuracy or "
                                     "final_test_accuracy"})
            continue
        hist_path = folder / "history.json"
        history = json.loads(hist_path.read_text()) if hist_path.exists() else []
        records.append({**rec, "status": "done", "metrics": metrics,
                        "val": metrics["frozen_val_accuracy"],
                        "test": metrics["final_test_accuracy"],
                        "train_seconds": sum(h["seconds"] for h in history),
                        "epoch_seconds": [h["seconds"] for h in history],
                        "last_train_accuracy": history[-1]["train_accuracy"] if history else None})
    return records


def select(records: List[dict]) -> Dict[tuple, dict]:
    """(task, model, method, epochs, seed) -> the done run with the best frozen val
    accuracy over the lr multipliers (ties: the multiplier closest to 1 on a log scale, then
    the smaller)."""
    best: Dict[tuple, dict] = {}
    for r in records:
        if r["status"] != "done":
            continue
        key = (r["task"], r["model"], r["method"], r["epochs"], r["seed"])
        rank = (r["val"], -abs(math.log(r["lr_mult"])), -r["lr_mult"])
        if key not in best or rank > best[key][0]:
            best[key] = (rank, r)
    return {k: v[1] for k, v in best.items()}


def _stat(values) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    s = Stat.of(values)
    return dict(mean=s.mean, std=s.std, values=s.values)


def verdict(diff_points: float) -> str:
    return "win" if diff_points >= 0.5 else "loss" if diff_points <= -0.5 else "tie"


def aggregate(records: List[dict], args, cache: Path) -> List[dict]:
    """Per (task, model): FP reference, seconds per epoch, per (method, budget) cells."""
    chosen = select(records)
    table = []
    for task in args.tasks:
        for model in args.models:
            fp = [fp_path(cache, task, model, args.fp_epochs, s).with_suffix(".json")
                  for s in args.seeds]
            entry = dict(task=task, model=model, fp=_stat(
                [json.loads(p.read_text())["test_accuracy"] for p in fp if p.exists()]),
                methods={}, sec_per_epoch={}, comparisons=[])
            for method in args.methods:
                mine = [r for r in records if (r["task"], r["model"], r["method"]) ==
                        (task, model, method)]
                if not mine:
                    continue
                secs = [s for r in mine if r["status"] == "done" for s in r["epoch_seconds"]]
                entry["sec_per_epoch"][method] = median(secs) if secs else None
                cells = {}
                for b in args.budgets:
                    sel = [chosen[k] for s in args.seeds
                           if (k := (task, model, method, b, s)) in chosen]
                    runs_b = [r for r in mine if r["epochs"] == b]
                    if not runs_b:
                        continue
                    cells[str(b)] = dict(
                        test=_stat([r["test"] for r in sel]),
                        val=_stat([r["val"] for r in sel]),
                        train_seconds=_stat([r["train_seconds"] for r in sel]),
                        stochastic_train=_stat([r["last_train_accuracy"] for r in sel]),
                        lr_mults=[r["lr_mult"] for r in sel], seeds=[r["seed"] for r in sel],
                        runs=len(runs_b), expected=len(args.seeds) * len(args.lr_mults),
                        failed=sum(r["status"] == "failed" for r in runs_b))
                entry["methods"][method] = cells
            entry["comparisons"] = compare(entry, args.budgets)
            if entry["methods"]:
                table.append(entry)
    return table


def compare(entry: dict, budgets: List[int]) -> List[dict]:
    """LR vs STE per precision: at equal epochs, and at equal wall-clock (STE at the largest
    budget whose mean training time fits in LR's)."""
    out = []
    for lr, spec in METHODS.items():
        ste = f"ste_{lr[3:]}"
        if spec["ste"] or lr not in entry["methods"] or ste not in entry["methods"]:
            continue
        L, S = entry["methods"][lr], entry["methods"][ste]
        for b in map(str, budgets):
            if not (b in L and L[b]["test"]):
                continue
            row = dict(precision=spec["precision"], budget=int(b), lr=L[b]["test"]["mean"])
            if b in S and S[b]["test"]:
                row["equal_epochs"] = _versus(row["lr"], S[b]["test"]["mean"], b)
            fits = [c for c in S if S[c]["test"] and S[c]["train_seconds"]
                    and S[c]["train_seconds"]["mean"] <= L[b]["train_seconds"]["mean"]]
            if fits:
                c = max(fits, key=int)
                row["equal_time"] = _versus(row["lr"], S[c]["test"]["mean"], c)
            out.append(row)
    return out


def _versus(lr: float, ste: float, ste_budget: str) -> dict:
    d = 100 * (lr - ste)
    return dict(ste=ste, ste_budget=int(ste_budget), diff_points=d, verdict=verdict(d))


# -- report --------------------------------------------------------------------------------
def _pct(s: Optional[dict]) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "-"


def _cell(c: Optional[dict]) -> str:
    if not c:
        return ""
    if not c["test"]:
        return f"failed ({c['failed']}/{c['runs']})"
    mark = "" if c["runs"] == c["expected"] and not c["failed"] else \
        f" ({c['runs'] - c['failed']}/{c['expected']})"
    return _pct(c["test"]) + mark


def markdown(results: dict) -> str:
    meta = results["meta"]
    lab = meta["settings"]
    lines = ["# Quality lab: FP vs LR vs STE through `lr-quant train`", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['platform']}); "
             f"{meta['runs_done']} runs done, {meta['runs_failed']} failed, "
             f"{meta['run_hours']:.1f} hours of (one-thread) training runs. Protocol: "
             "benchmarks/quality.py docstring. Test accuracy % of the deployed (frozen) "
             "network, mean ± std over seeds "
             f"{meta['seeds']}; learning-rate multipliers {meta['lr_mults']} on each "
             "recipe's logits_lr / params_lr, picked per run on the validation split; FP "
             f"pretrained {lab['fp_epochs']} epochs"
             + (f"; overrides {lab['set']}" if lab["set"] else "") + ". "
             "(k/n): only k of the n runs of a cell succeeded (or were run).", "",
             "![test accuracy vs training time](quality.png)", ""]
    for e in results["table"]:
        budgets = [b for b in map(str, meta["budgets"])
                   if any(b in cells for cells in e["methods"].values())]
        head = "| method | " + " | ".join(f"{b} ep" for b in budgets)
        rule = "| --- |" + " ---: |" * len(budgets)
        lines += [f"## {e['task']} / {e['model']}", "",
                  f"FP reference (pretrained FP test accuracy): {_pct(e['fp'])} %", "",
                  head + " | s / epoch |", rule + " ---: |"]
        for m, cells in e["methods"].items():
            spe = e["sec_per_epoch"].get(m)
            lines.append(f"| {METHODS[m]['label']} | "
                         + " | ".join(_cell(cells.get(b)) for b in budgets)
                         + (f" | {spe:.1f} |" if spe else " | - |"))
        lines += ["", "Equal wall-clock: test accuracy % @ mean training seconds", "",
                  head + " |", rule]
        for m, cells in e["methods"].items():
            lines.append(f"| {METHODS[m]['label']} | " + " | ".join(
                f"{100 * c['test']['mean']:.1f} @ {c['train_seconds']['mean']:.0f} s"
                if (c := cells.get(b)) and c["test"] else "-" for b in budgets) + " |")
        lines.append("")
        for prec in dict.fromkeys(c["precision"] for c in e["comparisons"]):
            rows = [c for c in e["comparisons"] if c["precision"] == prec]
            for key, what in (("equal_epochs", "equal epochs"),
                              ("equal_time", "equal wall-clock, STE at the largest budget "
                                             "within LR's time")):
                parts = [f"{c['budget']} ep {c[key]['verdict']} ({c[key]['diff_points']:+.1f}"
                         + (f" vs STE {c[key]['ste_budget']} ep)" if key == "equal_time" else ")")
                         for c in rows if key in c]
                if parts:
                    lines.append(f"- LR vs STE {prec} ({what}): " + ", ".join(parts))
        gap = [(m, b, c) for m, cells in e["methods"].items() if not METHODS[m]["ste"]
               for b, c in cells.items() if c["test"]]
        if gap:
            lines += ["", "Stochastic vs deployed (LR): final-epoch train accuracy % of the "
                      "stochastic network (on its training batches) vs frozen val accuracy %",
                      "", "| method | budget | stochastic train | frozen val | gap |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            for m, b, c in gap:
                st, fv = c["stochastic_train"], c["val"]
                lines.append(f"| {METHODS[m]['label']} | {b} | {_pct(st)} | {_pct(fv)} | "
                             + (f"{100 * (st['mean'] - fv['mean']):+.1f} |" if st else "- |"))
        lines.append("")
    failures: Dict[tuple, int] = {}
    for r in results["runs"]:
        if r["status"] == "failed":
            k = (r["task"], r["model"], r["method"], r["error"][:300])
            failures[k] = failures.get(k, 0) + 1
    if failures:
        lines += ["## Failed runs", "", "| task | model | method | runs | error |",
                  "| --- | --- | --- | ---: | --- |"]
        lines += [f"| {t} | {mo} | {me} | {n} | {err.replace('|', '/')} |"
                  for (t, mo, me, err), n in failures.items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"] or [dict(task="no runs", model="", fp=None, methods={})]
    fig, axes = plt.subplots(1, len(table), figsize=(4.6 * len(table), 3.8), squeeze=False)
    colours = {"W1": "C0", "W2": "C1", "W1A1": "C2"}
    for ax, e in zip(axes[0], table):
        for m, cells in e["methods"].items():
            pts = sorted((c["train_seconds"]["mean"], c["test"], int(b))
                         for b, c in cells.items() if c["test"])
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [100 * p[1]["mean"] for p in pts],
                        yerr=[100 * p[1]["std"] for p in pts], marker="o", ms=3, capsize=2,
                        color=colours.get(METHODS[m]["precision"]), label=METHODS[m]["label"],
                        ls="--" if METHODS[m]["ste"] else "-")
        if e["fp"]:
            ax.axhline(100 * e["fp"]["mean"], color="k", lw=0.8, ls=":", label="FP")
        ax.set_xscale("log")
        ax.set_title(f"{e['task']} / {e['model']}", fontsize=9)
        ax.set_xlabel("training seconds (log)")
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(args, runs: List[Run], settings: dict) -> dict:
    records = collect(runs, args.cache)
    done = [r for r in records if r["status"] == "done"]
    meta = dict(command="python -m benchmarks.quality " + " ".join(args.argv),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                platform=f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread per run",
                cache=str(args.cache), settings=settings, tasks=args.tasks, models=args.models,
                methods=args.methods, budgets=args.budgets, seeds=args.seeds,
                lr_mults=args.lr_mults, runs_done=len(done),
                runs_failed=len(records) - len(done),
                run_hours=sum(json.loads((Path(r["path"]) / "lab.json").read_text())["wall_s"]
                              if (Path(r["path"]) / "lab.json").exists() else 0.0
                              for r in done) / 3600)
    results = dict(meta=meta, table=aggregate(records, args, args.cache), runs=records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    (out / "quality.md").write_text(markdown(results))
    plot(results, out / "quality.png")
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {out / 'quality.png'}")
    return results


# -- command line ----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                                description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=DEFAULTS["tasks"])
    p.add_argument("--models", nargs="+", default=DEFAULTS["models"], help="timm names")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULTS["methods"])
    p.add_argument("--budgets", nargs="+", type=int, default=DEFAULTS["budgets"],
                   help="fine-tuning epochs")
    p.add_argument("--seeds", nargs="+", type=int, default=DEFAULTS["seeds"])
    p.add_argument("--lr-mults", nargs="+", type=float, default=DEFAULTS["lr_mults"],
                   help="multipliers of the recipe's logits_lr and params_lr")
    p.add_argument("--fp-epochs", type=int, default=15, help="FP pretraining epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run (data.* also for FP pretraining), "
                        "e.g. data.train_fraction=0.2")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="report folder")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's .safetensors (deleted by default: ~tens of MB each)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cache")
    p.add_argument("--dry-run", action="store_true", help="print the runs and a time estimate")
    p.add_argument("--pretrain-fp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.cache = args.cache.expanduser().resolve()
    for s in args.set:
        if "=" not in s:
            p.error(f"--set expects KEY=VALUE, got {s!r}")
    if args.jobs < 1 or any(m <= 0 for m in args.lr_mults) or any(b < 1 for b in args.budgets):
        p.error("--jobs, --lr-mults and --budgets must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pretrain_fp:
        return pretrain_main(json.loads(args.pretrain_fp))
    runs = grid(args)
    # runs made with the hand-written transforms before the data pipeline moved to timm's
    # (model-resolved mean / std / interpolation / crop) are not comparable: refuse to mix them
    settings = dict(fp_epochs=args.fp_epochs, set=sorted(args.set), data_pipeline="timm")
    if args.dry_run:
        states = {r: run_state(r, args.cache) for r in runs}
        for r in runs:
            print(f"{states[r]:6s} {r.task} {r.model} {r.method} lr x{r.lr_mult:g} "
                  f"{r.epochs} ep seed {r.seed}")
        todo = [r for r in runs if states[r] != "done"]
        fps = {(r.task, r.model, r.seed) for r in todo}
        est = estimate_seconds(todo, args.cache) + sum(
            20 + FP_EPOCH_S * args.fp_epochs * SCALE.get(t, 1) * SCALE.get(m, 1)
            for t, m, _ in fps)
        print(f"{len(runs)} runs: {len(runs) - len(todo)} cached, {len(todo)} to run "
              f"(+ up to {len(fps)} FP pretrainings); estimated {est / 3600:.1f} CPU-hours, "
              f"~{est / 3600 / args.jobs:.1f} h at --jobs {args.jobs}")
        return 0
    check_rates(runs, args.cache)
    if args.report_only:
        lab_json = args.cache / "lab.json"
        if lab_json.exists():
            settings = json.loads(lab_json.read_text())
            args.fp_epochs = settings["fp_epochs"]
    else:
        check_settings(args.cache, settings)
        Lab(args).execute(runs)
    results = report(args, runs, settings)
    return 0 if not results["meta"]["runs_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
