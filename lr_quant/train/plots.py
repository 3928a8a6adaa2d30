"""Training history on disk: history.json, history.csv and curves.png (loss and accuracy
per epoch, train vs validation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional

from ..checkpoint import atomic_write_text, replacing

__all__ = ["plot_history", "write_history"]


def write_history(history: List[Dict[str, float]], output_dir,
                  train_label: str = "train (LR sample)") -> None:
    """history.json, history.csv and curves.png in `output_dir` (each replaced atomically)."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / "history.json", json.dumps(history, indent=2))
    with replacing(output_dir / "history.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_history(history, output_dir / "curves.png", train_label)


def plot_history(history: List[Dict[str, float]], path,
                 train_label: str = "train (LR sample)") -> Optional[Path]:
    """Loss and accuracy curves (train vs validation) per epoch, as a PNG (matplotlib Agg);
    None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:   # matplotlib is a dev extra: the logs are still written
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label=train_label)
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    ax_loss.set_xlabel("epoch"); ax_loss.set_ylabel("loss"); ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label=train_label)
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "s-", label="val")
    ax_acc.set_xlabel("epoch"); ax_acc.set_ylabel("accuracy"); ax_acc.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        with replacing(path, path.stem + ".tmp.png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return path
