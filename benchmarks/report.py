"""results.json -> results.md + PNG plots (and the README "Results" block)."""

from __future__ import annotations

from pathlib import Path

MB = 2 ** 20
# (label, method, against, bound, kind, image sizes it applies to (None: all));
# issue 8's targets, with issue 14's step targets per input size
TARGETS = [
    ("LR W1 step <= 2.5x FP", "lr_w1", "fp", 2.5, "time", {32}),
    ("LR W1A1 step <= 3.0x FP", "lr_w1a1", "fp", 3.0, "time", {32}),
    ("LR W1 step <= 2.0x FP", "lr_w1", "fp", 2.0, "time", {112}),
    ("LR W1A1 step <= 2.5x FP", "lr_w1a1", "fp", 2.5, "time", {112}),
    ("LR W1 step <= 1.5x Brevitas STE W1", "lr_w1", "ste_w1", 1.5, "time", None),
    ("LR W1 training memory <= 2x FP", "lr_w1", "fp", 2.0, "memory", None),
    ("LR W2 training memory <= 2x FP", "lr_w2", "fp", 2.0, "memory", None),
    ("LR W1A1 training memory <= 2x FP", "lr_w1a1", "fp", 2.0, "memory", None),
]


def _pct(x):
    return f"{100 * x:.1f}"


def case(res: dict) -> str:
    """'resnet18 112x112 b16' (older results: the model name)."""
    return res.get("case", res["model"])


def target_rows(speed: list) -> list:
    """One row per (case, target, variant): the eager method and, where measured, its
    compiled variant (``<method>_compiled``)."""
    rows = []
    for res in speed:
        times, mem = res["times"], res["memory"]
        for label, method, ref, bound, kind, sizes in TARGETS:
            if sizes is not None and res["image_size"] not in sizes:
                continue
            for m in (method, method + "_compiled"):
                if m != method and m not in times:
                    continue
                # "LR W1 step <= ..." -> "LR W1 compiled step <= ..."
                name = label if m == method else \
                    label.replace(res["labels"][method], res["labels"][m], 1)
                if m not in times or ref not in times:
                    rows.append(dict(model=case(res), target=name, value=None, met=None))
                    continue
                if kind == "time":
                    value = times[m]["median_s"] / times[ref]["median_s"]
                else:
                    value = mem[m]["total_bytes"] / mem[ref]["total_bytes"]
                rows.append(dict(model=case(res), target=name, value=value, bound=bound,
                                 met=value <= bound))
    return rows


def speed_tables(results: dict) -> list:
    out = []
    for res in results.get("speed", []):
        t, m, lab = res["times"], res["memory"], res["labels"]
        ste = t.get("ste_w1", {}).get("median_s")
        out += [f"#### {res['model']}, batch {res['batch']}, {res['image_size']}x"
                f"{res['image_size']}, {res['threads']} thread(s), {res['rounds']} alternating "
                f"rounds (compiled variants: after their compilation)", "",
                "| method | step (median ms) | x FP | x FP (per-round median) | x STE W1 | "
                "saved activations (MiB) | params+grads+momentum (MiB) | train memory x FP |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k in t:
            out.append(
                f"| {lab[k]} | {1e3 * t[k]['median_s']:.0f} | {t[k]['ratio_fp']:.2f} | "
                f"{t[k].get('ratio_fp_per_round_median', float('nan')):.2f} | "
                f"{t[k]['median_s'] / ste:.2f} | {m[k]['saved_bytes'] / MB:.1f} | "
                f"{3 * m[k]['param_bytes'] / MB:.1f} | {m[k]['ratio_fp']:.2f} |"
                if ste else f"| {lab[k]} | {1e3 * t[k]['median_s']:.0f} | {t[k]['ratio_fp']:.2f} |")
        for k, e in res.get("errors", {}).items():
            out.append(f"| {lab.get(k, k)} | failed: {e[:120]} | | | | | | |")
        out.append("")
    return out


def target_table(results: dict) -> list:
    rows = target_rows(results.get("speed", []))
    out = ["| model | target | measured | met |", "| --- | --- | ---: | --- |"]
    for r in rows:
        if r["value"] is None:
            out.append(f"| {r['model']} | {r['target']} | n/a | n/a |")
        else:
            miss = "" if r["met"] else f" (missed by {100 * (r['value'] / r['bound'] - 1):.0f}%)"
            out.append(f"| {r['model']} | {r['target']} | {r['value']:.2f}x | "
                       f"{'yes' if r['met'] else 'NO' + miss} |")
    return out


def profile_tables(results: dict, top: int = 8) -> list:
    out = []
    for res in results.get("speed", []):
        for method, p in res.get("profiles", {}).items():
            out += [f"**{case(res)} {res['labels'][method]}**: {p['total_self_ms_per_step']:.0f}"
                    f" ms self CPU per step, of which convolution / GEMM ops "
                    f"{p['conv_gemm_ms_per_step']:.0f} ms", "",
                    "| op | self ms / step | calls / step | share |",
                    "| --- | ---: | ---: | ---: |"]
            for r in p["top"][:top]:
                out.append(f"| `{r['op']}` | {r['self_ms_per_step']:.1f} | "
                           f"{r['calls_per_step']:.0f} | {_pct(r['share'])}% |")
            out.append("")
    return out


def micro_table(results: dict) -> list:
    out = []
    for mb in results.get("conv_microbench", []):
        s = mb["shape"]
        out += [f"One 3x3 conv, {s['channels']}->{s['channels']} channels, {s['hw']}x{s['hw']}, "
                f"batch {s['batch']}, forward + backward, {mb['threads']} thread(s), medians "
                f"of alternating rounds:", "",
                "| variant | ms | x FP conv |", "| --- | ---: | ---: |"]
        for k, v in mb["variants"].items():
            out.append(f"| {k} | {v['median_ms']:.2f} | {v['ratio_fp']:.2f} |")
        out.append("")
    return out


def accuracy_tables(results: dict) -> list:
    out = []
    for task in results.get("accuracy", []):
        b = [str(x) for x in task["budgets"]]
        out += [f"#### {task['title']}", "",
                f"train {task['n_train']} / val {task['n_val']} / test {task['n_test']}; FP "
                f"pretrained {task['fp_epochs']} epochs; seeds {task['seeds']}; lr sweep "
                f"{task['lrs']} (picked on val per method, budget and seed). Test accuracy %, "
                f"mean ± std over seeds, by fine-tuning epochs after conversion:", "",
                "| method | " + " | ".join(f"{x} ep" for x in b) + " |",
                "| --- | " + " | ".join("---:" for _ in b) + " |"]
        for m, per in task["summary"].items():
            cells = [f"{_pct(per[x]['mean'])} ± {_pct(per[x]['std'])}" if x in per else "-"
                     for x in b]
            out.append(f"| {task['labels'][m]} | " + " | ".join(cells) + " |")
        for m, e in task.get("errors", {}).items():
            out.append(f"| {task['labels'].get(m, m)} | failed: {e[:100]} |")
        out.append("")
    return out


def export_table(results: dict) -> list:
    rows = results.get("export", [])
    if not rows:
        return []
    out = ["| model | method | export s | .onnx KiB | verified | FP32 state KiB | packed state "
           "KiB | whole-model x | packed layers x | same argmax |",
           "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['method']} | failed: {r['error'][:100]} |")
            continue
        out.append(
            f"| {r['model']} | {r['method']} | {r.get('export_s', float('nan')):.1f} | "
            f"{r.get('onnx_bytes', 0) / 1024:.0f} | {r.get('export_verified', '-')} | "
            f"{r['fp32_state_bytes'] / 1024:.0f} | {r['packed_state_bytes'] / 1024:.0f} | "
            f"{r['whole_model_compression']:.1f} | {r['packed_layer_compression']:.1f} | "
            f"{r['packed_same_argmax']} |")
    return out


def plots(results: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    speed = results.get("speed", [])
    if speed:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key, title in ((axes[0], "time", "training step time / FP"),
                               (axes[1], "memory", "training memory / FP")):
            width = 0.8 / len(speed)
            for i, res in enumerate(speed):
                methods = list(res["times"])
                vals = [res["times"][m]["ratio_fp"] if key == "time" else
                        res["memory"][m]["ratio_fp"] for m in methods]
                xs = [j + i * width for j in range(len(methods))]
                ax.bar(xs, vals, width, label=case(res))
                ax.set_xticks([j + width * (len(speed) - 1) / 2 for j in range(len(methods))])
                ax.set_xticklabels([res["labels"][m] for m in methods], rotation=30, ha="right",
                                   fontsize=8)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "speed_memory.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(path.name)
    acc = results.get("accuracy", [])
    if acc:
        fig, axes = plt.subplots(1, len(acc), figsize=(4.2 * len(acc), 3.6), squeeze=False)
        for ax, task in zip(axes[0], acc):
            for m, per in task["summary"].items():
                b = [x for x in task["budgets"] if str(x) in per]
                mean = [100 * per[str(x)]["mean"] for x in b]
                std = [100 * per[str(x)]["std"] for x in b]
                ax.errorbar(b, mean, yerr=std, marker="o", ms=3, capsize=2,
                            label=task["labels"][m],
                            ls="-" if m.startswith("lr") or m == "fp" else "--")
            ax.set_title(task["task"], fontsize=9)
            ax.set_xlabel("fine-tuning epochs after conversion")
            ax.set_ylabel("test accuracy %")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "accuracy.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(path.name)
    return files


def markdown(results: dict, plot_files: list) -> str:
    meta = results["meta"]
    lines = ["# lr_quant benchmarks", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['platform']}, torch "
             f"{meta['torch']}, brevitas {meta['brevitas']}, {meta['cpus']} CPUs; total "
             f"{meta['total_s'] / 60:.1f} min). Timing on a shared machine is noisy: every "
             f"number is a median over rounds that alternate the configurations within one "
             f"process, and the ratios are what to read.", ""]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    if "speed_memory.png" in plot_files:
        lines += ["![speed and memory](speed_memory.png)", ""]
    lines += ["## Targets (issue 8)", ""] + target_table(results) + [""]
    lines += ["## Training step time and memory", ""] + speed_tables(results)
    lines += ["## Where the time goes", ""] + micro_table(results) + profile_tables(results)
    if results.get("accuracy"):
        lines += ["## Accuracy", ""]
        if "accuracy.png" in plot_files:
            lines += ["![accuracy](accuracy.png)", ""]
        lines += [results.get("accuracy_protocol", ""), ""] + accuracy_tables(results)
    if results.get("export"):
        lines += ["## Export and packed size", "",
                  "Frozen LR models (mode), `lr_quant.export.export_qonnx` (verified against "
                  "PyTorch with qonnx) and `lr_quant.deploy.pack` (1 bit per binary weight, "
                  "2 per ternary; float first/last layers and BatchNorms stay float32):", ""]
        lines += export_table(results) + [""]
    return "\n".join(lines) + "\n"
