"""`lr-quant` command line: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import List, Optional

from .distributions import available_distributions

__all__ = ["main", "build_parser"]


def _add_demo(subparsers) -> None:
    from .demo import DemoConfig

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="end-to-end LR run on the offline digits: pretrain, convert, fine-tune, "
        "freeze, export QONNX, verify",
        description="Pretrain a small full-precision MLP on scikit-learn's bundled 8x8 "
        "digits, rebuild its Linear layers as LR layers from the pretrained weights, "
        "fine-tune the weight distributions, freeze to the discrete network, export QONNX "
        "and verify the file with qonnx. Runs offline on a CPU in under a minute.")
    p.add_argument("--distribution", default=defaults.distribution,
                   choices=[d for d in available_distributions() if d != "categorical"],
                   help="weight distribution (default: %(default)s)")
    p.add_argument("--per-channel-scale", action="store_true",
                   help="learn a per-output-channel weight scale")
    p.add_argument("--fp-epochs", type=int, default=defaults.fp_epochs)
    p.add_argument("--lr-epochs", type=int, default=defaults.lr_epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--output-dir", default=defaults.output_dir,
                   help="where the .onnx and results.json go (default: %(default)s)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    for name in ("fp_epochs", "lr_epochs"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    known = {f.name for f in fields(DemoConfig)}
    config = DemoConfig(**{k: v for k, v in vars(args).items() if k in known})
    run_demo(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lr-quant",
        description="Train binary / ternary networks with LR-nets on Brevitas, export QONNX.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
