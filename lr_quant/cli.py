"""`lr-quant` command line: parses arguments and calls the library.

    lr-quant quickstart                        # the whole product offline, in a minute or two
    lr-quant convert -c recipes/resnet_w1.yaml --output runs/r18-converted
    lr-quant train   -c recipes/resnet_w1.yaml --output runs/r18 --train.epochs 3
    lr-quant eval    runs/r18/final.safetensors
    lr-quant export  runs/r18/final.safetensors --output runs/r18/model.onnx
    lr-quant summary runs/r18/final.safetensors

Recipe values are set in this order (last wins): the recipe's defaults, the `-c` YAML file,
then flags named by their key path: `--train.epochs 3`, `--data.root /data/imagenette`,
`--model.checkpoint fp.safetensors`, or `--set weights.conv=lr_ternary_per_channel` for any
key. The resolved recipe is written as recipe.yaml beside the outputs. No command writes
onto one of its inputs; `train` / `convert` refuse an --output folder that holds a run
unless `--resume` (train) or `--force` (replace it), and lock it while they run.
Under torchrun the same `train` command runs data-parallel:
`torchrun --nproc_per_node 2 -m lr_quant.cli train -c recipe.yaml --output runs/x`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
import warnings
from typing import Any, Dict, List, Optional

from .recipe_overrides import (FIELD_HELP, OVERRIDE_SECTIONS, apply_overrides, parse_value,
                               scalar_fields)

__all__ = ["main", "build_parser", "resolve_recipe", "parse_value"]

EXAMPLES = """examples:
  lr-quant quickstart
  lr-quant train -c recipes/quickstart.yaml --output runs/q --train.epochs 2
  lr-quant train -c my.yaml --output runs/q --resume           # continue runs/q/checkpoint.safetensors
  lr-quant train -c my.yaml --output runs/q --force            # replace the run in runs/q
  lr-quant eval runs/q/final.safetensors --split val
  lr-quant export runs/q/final.safetensors --output runs/q/model.onnx
"""


def _add_recipe_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    from .recipe import RENAMED_IN_VERSION_2, Recipe

    p.add_argument("-c", "--config", metavar="RECIPE", required=required,
                   help="recipe: a YAML path or a packaged recipe name (e.g. quickstart)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any recipe key, e.g. --set weights.conv=lr_ternary_per_channel "
                        "(repeatable; VALUE is YAML)")
    hints = typing.get_type_hints(Recipe)
    for section in OVERRIDE_SECTIONS:
        group = p.add_argument_group(f"recipe {section}: section (overrides the -c file)")
        for path, tp, default in scalar_fields(hints[section], section):
            kind = {bool: "true|false", int: "INT", float: "FLOAT", str: "STR",
                    list: "YAML-LIST", dict: "YAML-MAPPING"}[tp]
            text = FIELD_HELP.get(path, "")
            group.add_argument(f"--{path}", dest=f"recipe:{path}", default=None, metavar=kind,
                               help=f"{text} (built-in default: {default})".strip())
    for old, new in RENAMED_IN_VERSION_2.items():   # hidden, with a deprecation note
        p.add_argument(f"--{old}", dest=f"recipe:{new}", default=None, action=_Renamed,
                       help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    """A flag renamed in recipe version 2: sets the new key and says so on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.dest[len("recipe:"):]
        print(f"lr-quant: {option_string} is deprecated, use --{new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def resolve_recipe(args) -> "Recipe":
    """The recipe of -c, with --section.key flags and --set KEY=VALUE applied, validated."""
    flags = {key[len("recipe:"):]: value for key, value in vars(args).items()
             if key.startswith("recipe:") and value is not None}
    return apply_overrides(args.config, flags, args.set)


# -- subcommands --------------------------------------------------------------------------
def _cmd_quickstart(args) -> int:
    from .quickstart import QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(output_dir=args.output, recipe=args.recipe,
                                    fp_epochs=args.fp_epochs, epochs=args.epochs, seed=args.seed,
                                    retrain_fp=args.retrain_fp, progress=not args.no_progress))
    return 0


def _recipe_inputs(args, recipe) -> Dict[str, Any]:
    """The input files of a recipe command, by flag."""
    return {"-c": args.config, "--model.checkpoint": recipe.model.checkpoint}


def _cmd_train(args) -> int:
    from pathlib import Path

    from .distributed import cleanup_distributed
    from .run_folder import RUN_FILES, check_not_input
    from .train import run_training

    recipe = resolve_recipe(args)
    resume = args.resume
    # resuming rewrites recipe.yaml and checkpoint.safetensors by design
    kept = () if args.force or resume is None else ("recipe.yaml", "checkpoint.safetensors")
    check_not_input([Path(args.output) / n for n in RUN_FILES if n not in kept],
                    {**_recipe_inputs(args, recipe),
                     "--resume": None if resume == "auto" else resume})
    try:
        run_training(recipe, args.output, resume=resume, progress=not args.no_progress,
                     stop_after_steps=args.stop_after_steps, force=args.force)
    finally:
        cleanup_distributed()
    return 0


def _cmd_convert(args) -> int:
    from contextlib import nullcontext
    from pathlib import Path

    from .checkpoint import atomic_write_text, save_checkpoint
    from .convert import convert_with_report
    from .run_folder import check_not_input, open_run_folder
    from .train import build_float_model, estimate_checkpoint_bytes

    recipe = resolve_recipe(args)
    num_classes = recipe.model.num_classes
    if num_classes is None:
        raise ValueError("convert needs model.num_classes (in the recipe or "
                         "--model.num_classes N)")
    out = Path(args.output) if args.output else None
    if out is not None:
        names = ("recipe.yaml", "conversion.txt", "converted.safetensors")
        check_not_input([out / n for n in names], _recipe_inputs(args, recipe))
    with (open_run_folder(out, force=args.force, resumable=False,
                          need_bytes=estimate_checkpoint_bytes(recipe))
          if out is not None else nullcontext()) as folder:
        model = build_float_model(recipe, num_classes)
        model, report = convert_with_report(model, recipe)
        print(report)
        if folder is not None:
            folder.clear()
            atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
            atomic_write_text(out / "conversion.txt", str(report) + "\n")
            path = save_checkpoint(out / "converted.safetensors", model,
                                   {"model": recipe.model.name, "num_classes": num_classes,
                                    "recipe": recipe.to_dict(), "stage": "converted"})
            print(f"wrote {path}, {out / 'recipe.yaml'}, {out / 'conversion.txt'}")
    return 0


def _cmd_eval(args) -> int:
    import json

    from .data import build_datasets
    from .train import evaluate, load_trained_model

    model, recipe, meta = load_trained_model(args.checkpoint)
    data = build_datasets(recipe.data if args.data_root is None else
                          dataclasses.replace(recipe.data, root=args.data_root),
                          recipe.train.val_fraction, recipe.train.seed, model=model)
    result = evaluate(model, getattr(data, args.split), recipe.train.eval_batch_size)
    print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split,
                      "network": _network_label(model, meta), **result}, indent=2))
    return 0


def _network_label(model, meta) -> str:
    """What a checkpoint holds: the final (deployed) network or a training checkpoint."""
    from .nn.lr_layers import lr_layers

    if lr_layers(model):
        return "frozen" if meta.get("frozen") else "not frozen: LR mode weights"
    return ("final: trained weights, BN re-estimated (no LR layers)" if meta.get("frozen")
            else "training checkpoint: BN statistics of training (no LR layers)")


def _example_input(model, recipe, batch: int):
    """A fixed (seeded) random batch of the model's input size."""
    import torch

    from .convert import default_example_input

    return default_example_input(model, recipe, batch, torch.Generator().manual_seed(0))


def _cmd_export(args) -> int:
    from pathlib import Path

    from .export import export_qonnx
    from .run_folder import RunFolderError, check_not_input, check_output_folder
    from .train import load_trained_model

    output = Path(args.output or Path(args.checkpoint).with_suffix(".onnx"))
    if output.is_dir():
        raise RunFolderError(f"--output {output} is a folder; give the .onnx file to write")
    check_not_input([output], {"checkpoint": args.checkpoint})
    check_output_folder(output.parent, Path(args.checkpoint).stat().st_size
                        if Path(args.checkpoint).is_file() else 0)
    model, recipe, meta = load_trained_model(args.checkpoint)
    if not meta.get("frozen"):
        raise ValueError(f"{args.checkpoint} is not a frozen network; export "
                         f"final.safetensors (written when training ends)")
    example = _example_input(model, recipe, args.batch_size)
    result = export_qonnx(model, example, output, require_frozen=True, num_checks=4)
    print(f"exported {result.path}; verified by qonnx on {result.num_checks} inputs: max abs "
          f"error {result.max_abs_error:.2e}")
    if args.finn:
        from .finn import finn_hardware_check

        work = output.with_name(output.stem + "_finn")
        verdict = finn_hardware_check(model, example, work, onnx_path=output)
        print(verdict.line)
        print(f"FINN's models, result.json and estimate reports: {work}")
        return 0 if verdict.mapped else 1
    return 0


def _cmd_summary(args) -> int:
    from .train import build_float_model, load_trained_model

    if args.checkpoint:
        model, recipe, meta = load_trained_model(args.checkpoint)
    else:
        from .convert import convert
        recipe = resolve_recipe(args)
        model, meta = convert(build_float_model(recipe, recipe.model.num_classes or 10, False),
                              recipe), {}
    example = _example_input(model, recipe, 1)
    verdict = None
    if args.finn:
        import tempfile

        from .finn import finn_hardware_check

        if not meta.get("frozen"):
            raise ValueError("--finn checks the deployed network: give final.safetensors "
                             "(written when training ends)")
        with tempfile.TemporaryDirectory(prefix="lr_quant_finn_") as work:
            verdict = finn_hardware_check(model, example, work)
    print(model_summary_table(model, example, verdict))
    return 0


def model_summary_table(model, example, finn=None) -> str:
    from .summary import model_summary
    return model_summary(model, example, finn).table()


# -- parser -------------------------------------------------------------------------------
def _paragraphs(*texts: str) -> str:
    import textwrap
    return "\n\n".join(textwrap.fill(t, 88) for t in texts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lr-quant", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune pretrained networks to binary / ternary weights with LR-nets "
                    "(Brevitas), freeze them and export QONNX.\nStart with `lr-quant "
                    "quickstart`; `lr-quant COMMAND --help` explains each command.",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "quickstart", help="offline end-to-end run on the bundled digits (a minute or two)",
        description="Pretrain (or reuse) a small full-precision timm ResNet on scikit-learn's "
                    "bundled digits, convert it with recipes/quickstart.yaml, fine-tune LR "
                    "binary weights from the FP weights, freeze, re-estimate BatchNorm, export "
                    "QONNX, verify it with qonnx, print the layer summary and accuracies. "
                    "No network, no GPU needed.")
    p.add_argument("--output", default="lr_quant_quickstart", help="output folder (default: %(default)s)")
    p.add_argument("--recipe", default="quickstart", help="recipe name or path (default: %(default)s)")
    p.add_argument("--fp-epochs", type=int, default=3, help="FP pretraining epochs (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="LR fine-tuning epochs (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain-fp", action="store_true", help="pretrain the FP model again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser(
        "train", help="fine-tune a recipe's model from its pretrained FP weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Build the recipe's timm model with its pretrained FP weights (model.checkpoint: "
            "a local file; model.pretrained: true for the hub), convert it, fine-tune the LR "
            "weight distributions (KD from the FP model), freeze, re-estimate BatchNorm, pick "
            "among sampled networks on a validation split of the training data. Writes "
            "recipe.yaml, checkpoint.safetensors (resumable), final.safetensors (frozen), "
            "history.csv/json, curves.png and metrics.json to --output.",
            "The --output folder is checked first (writable, free space for a checkpoint) and "
            "locked while the run lasts; a folder that holds a run is refused unless --resume "
            "or --force.",
            "--resume compares the recipe with the one in the checkpoint. It applies (and "
            "records) changed train: settings (epochs, logits_lr, params_lr, schedules, "
            "grad_clip, ...), data.root / num_workers / download, name and description. It "
            "refuses, writing nothing, changes to anything else: model, weights, activations, "
            "keep_fp, overrides, init, the data content and train.optimizer / batch_size / "
            "seed / val_fraction / extra."),
        epilog="Runs data-parallel under torchrun: torchrun --nproc_per_node N -m lr_quant.cli "
               "train -c RECIPE --output DIR")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: OUTPUT/checkpoint.safetensors, "
                        "which must exist)")
    p.add_argument("--force", action="store_true",
                   help="replace the run in --output (its files are removed when the new run "
                        "starts writing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("convert", help="convert a recipe's model and print what each layer became",
                       description="Build the recipe's model with its FP weights, convert it, "
                                   "print the conversion report; with --output also save the "
                                   "converted model, recipe.yaml and the report. The classifier "
                                   "of a weight file with another number of classes than "
                                   "model.num_classes is re-initialized (a warning says so).")
    p.add_argument("--output", default=None, help="output folder (optional)")
    p.add_argument("--force", action="store_true",
                   help="replace the run or conversion in --output")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("eval", help="accuracy of a trained checkpoint",
                       description="Accuracy and loss of a checkpoint written by `lr-quant "
                                   "train` on the test split (or val / train) of its recipe's "
                                   "data set.")
    p.add_argument("checkpoint", help="final.safetensors (frozen) or checkpoint.safetensors")
    p.add_argument("--split", choices=["test", "val", "train_eval"], default="test")
    p.add_argument("--data-root", default=None, help="override data.root of the recipe")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a frozen checkpoint to QONNX and verify it",
                       description="Export final.safetensors to QONNX (Brevitas) and check "
                                   "with qonnx's executor that the file reproduces PyTorch.")
    p.add_argument("checkpoint", help="final.safetensors written by `lr-quant train`")
    p.add_argument("--output", default=None, help=".onnx path (default: beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="static batch size of the exported graph (default: %(default)s)")
    p.add_argument("--finn", action="store_true",
                   help="also run finn-plus' build steps up to the estimate reports (in the "
                        "FINN environment, built on first use): one dataflow partition, "
                        "outputs equal; exit 1 when FINN cannot map the network")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("summary", help="per-layer precision / memory / MACs table",
                       description="larq-style table of a checkpoint, or of a recipe's "
                                   "converted model (-c): bits, params, memory, MACs, FINN.")
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--finn", action="store_true",
                   help="the FINN column from finn-plus' build steps on the export of a final "
                        "checkpoint (minutes) instead of the conservative rules")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_summary)
    return parser


def _show_own_warnings(command: str) -> None:
    """lr_quant's warnings (ClassifierReinitWarning) as one stderr line each."""
    from .models import ClassifierReinitWarning

    show = warnings.showwarning

    def one_line(message, category, *rest, **kw):
        if issubclass(category, ClassifierReinitWarning):
            print(f"lr-quant {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)
    warnings.simplefilter("always", ClassifierReinitWarning)
    warnings.showwarning = one_line


def main(argv: Optional[List[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .export import QONNXExportError, QONNXMismatchError
    from .models import ModelError
    from .run_folder import RunFolderError
    from .train import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            _show_own_warnings(args.command)
            return args.func(args)
    except (CheckpointError, DataError, ModelError, NonFiniteLossError, FileNotFoundError,
            QONNXExportError, QONNXMismatchError, RunFolderError, ValueError) as e:
        # user errors: one clear line, no traceback (RecipeError is a ValueError);
        # LR_QUANT_DEBUG=1 shows the traceback
        if os.environ.get("LR_QUANT_DEBUG"):
            raise
        print(f"lr-quant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the trainer has printed where the last checkpoint is and how to resume
        print(f"lr-quant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
