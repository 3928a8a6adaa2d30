"""Training checkpoints: one safetensors file, written atomically, no pickle.

A checkpoint holds every tensor (model state, optimizer and scheduler tensors, RNG
states) as safetensors entries, and the rest (epoch, step, architecture, metrics, the
optimizer's param groups, the resolved recipe) as JSON in the safetensors metadata. Nested
states are flattened: a tensor inside a dict or list becomes the entry ``<prefix>/<path>``
and a ``{"__tensor__": name}`` placeholder in the JSON. Loading executes no code (no
pickle), so a checkpoint from an untrusted source cannot run anything.

Writes go to ``<path>.tmp`` and are renamed with ``os.replace``: a crash mid-write leaves
the previous checkpoint intact, and any exception (KeyboardInterrupt too) removes the
``.tmp`` file. What a SIGKILL leaves (``*.tmp``, ``*.pending``, safetensors' own hidden
``.tmpXXXXXX``) is removed by `remove_stale_temp_files` when the next training run starts.
"""

from __future__ import annotations

import json
import os
import random
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_checkpoint_meta",
           "capture_rng_state", "restore_rng_state", "load_model_state", "full_state_dict",
           "describe_mismatch", "atomic_write_text", "replacing",
           "remove_stale_temp_files", "FORMAT"]

FORMAT = "lr_quant.checkpoint/1"
PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


@contextmanager
def replacing(path: PathLike, tmp_name: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; it then replaces `path`
    (``os.replace``), or is removed if the block raises anything (KeyboardInterrupt too).
    tmp_name: its file name (default ``<name>.tmp``)."""
    path = Path(path)
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


# What an interrupted write leaves: our `replacing` temporaries (``<name>.tmp``,
# ``curves.tmp.png``), a training checkpoint not yet confirmed (``<name>.pending``,
# lr_quant.train.trainer) and the hidden file recent safetensors (0.8) writes before renaming
# it onto ours (the Rust tempfile crate's ``.tmp`` + 6 alphanumerics).
STALE_TEMP_FILE = re.compile(r"(.+\.tmp|.+\.tmp\.png|.+\.pending|\.tmp[A-Za-z0-9]{6})")


def remove_stale_temp_files(folder: PathLike) -> List[str]:
    """Remove the temporary files an interrupted (killed) write left in `folder`
    (`STALE_TEMP_FILE`); returns their names. Call it only where no other writer is active
    (the start of a training run in its output folder)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if STALE_TEMP_FILE.fullmatch(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed


def _flatten(obj: Any, prefix: str, tensors: Dict[str, Tensor]) -> Any:
    """JSON-able structure of obj with tensors moved into `tensors`."""
    if isinstance(obj, Tensor):
        name = f"{prefix}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _flatten(torch.from_numpy(obj.copy()), prefix, tensors)}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int at {prefix}")
        # int keys (optimizer state) survive as {"__int_keys__": ...}
        items = {str(k): _flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        if any(isinstance(k, int) for k in obj):
            return {"__int_keys__": items}
        return items
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj: Any, tensors: Dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__ndarray__"}:
            return _unflatten(obj["__ndarray__"], tensors).numpy()
        if set(obj) == {"__tuple__"}:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__int_keys__"}:
            return {int(k): _unflatten(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def capture_rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32),
                         *numpy_state[2:]))
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, model: nn.Module, meta: Dict[str, Any],
                    training_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write model state + training state + JSON metadata to `path` atomically.

    meta: JSON-able (epoch, step, architecture, metrics, recipe ...).
    training_state: optimizer / scheduler state dicts, RNG states (any nesting of dicts,
        lists, tuples, tensors, numbers, strings).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model/{name}"] = value.detach().cpu().contiguous()
    state_json = _flatten(training_state or {}, "state", tensors)
    metadata = {"format": FORMAT, "meta": json.dumps(meta), "state": json.dumps(state_json)}
    with replacing(path) as tmp:
        # clones: safetensors refuses tensors that share storage (tied weights, views)
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


NOT_CHECKPOINTS = {".onnx": "an ONNX model (what lr-quant export writes)",
                   ".yaml": "a YAML file (a recipe?)", ".yml": "a YAML file (a recipe?)",
                   ".pth": "a PyTorch pickle file", ".pt": "a PyTorch pickle file",
                   ".bin": "a PyTorch pickle file", ".ckpt": "a PyTorch pickle file"}


def _open_checkpoint(path: PathLike, tensors: bool):
    """(metadata, tensors or None) of an lr_quant safetensors file, with readable errors."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(
            f"checkpoint {path} is a directory; give a checkpoint file, e.g. "
            f"{path / 'final.safetensors'} (frozen) or {path / 'checkpoint.safetensors'}"
            + (f" (it holds {', '.join(found)})" if found else " (it holds no .safetensors)"))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            values = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except Exception as e:  # safetensors raises its own error types on truncated files
        what = NOT_CHECKPOINTS.get(path.suffix.lower())
        if what or path.suffix.lower() != ".safetensors":
            raise CheckpointError(
                f"{path} is {what or 'not a safetensors file'}, not an lr_quant checkpoint; "
                f"expected a .safetensors file written by lr-quant train (final.safetensors "
                f"or checkpoint.safetensors)") from e
        raise _corrupt(path, e) from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lr_quant checkpoint "
                              f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    return metadata, values


def _corrupt(path: PathLike, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: "
                           f"{e}); resume from an older checkpoint or start again")


def load_checkpoint_meta(path: PathLike) -> Dict[str, Any]:
    """The JSON metadata of a checkpoint (epoch, recipe, ...) without reading its tensors."""
    metadata, _ = _open_checkpoint(path, tensors=False)
    try:
        return json.loads(metadata["meta"])
    except (KeyError, ValueError) as e:
        raise _corrupt(path, e) from e


def load_checkpoint(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, Any], Dict[str, Any]]:
    """(model_state, meta, training_state) of a checkpoint; CheckpointError if unreadable."""
    metadata, tensors = _open_checkpoint(path, tensors=True)
    try:
        meta = json.loads(metadata["meta"])
        state = _unflatten(json.loads(metadata["state"]), tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise _corrupt(path, e) from e
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    return model_state, meta, state


def load_model_state(model: nn.Module, state: Dict[str, Tensor], source: str = "checkpoint",
                     architecture: Optional[str] = None,
                     expected_architecture: Optional[str] = None) -> None:
    """Strictly load `state` into `model`, with a readable error when it does not fit."""
    if architecture and expected_architecture and architecture != expected_architecture:
        raise CheckpointError(
            f"{source} is for architecture {architecture!r}, the model is "
            f"{expected_architecture!r}")
    own = full_state_dict(model)
    # Brevitas leaves a runtime-statistics scale out of state_dict() until it is
    # initialized (ParameterFromRuntimeStatsScaling.state_dict); such keys may be absent
    # from a checkpoint saved before that (the module then collects statistics again).
    optional = set(own) - set(model.state_dict())
    problems = describe_mismatch({k: v.shape for k, v in own.items()},
                                 {k: v.shape for k, v in state.items()}, optional)
    if problems:
        raise CheckpointError(f"{source} does not fit this model (another architecture or "
                              f"recipe?): {problems}")
    result = model.load_state_dict(state, strict=False)
    left = sorted(set(result.missing_keys) - optional) + sorted(result.unexpected_keys)
    if left:  # the key sets were checked above; this would be a loader inconsistency
        raise CheckpointError(f"{source}: keys not loaded {', '.join(left[:5])}")


def describe_mismatch(own: Dict[str, Any], theirs: Dict[str, Any], optional=()) -> str:
    """"missing keys ...; unexpected keys ...; shape mismatches ..." of two {key: shape}
    maps (`own`: the model's; keys in `optional` may be absent); "" when they fit."""
    missing = sorted(set(own) - set(theirs) - set(optional))
    unexpected = sorted(set(theirs) - set(own))
    mismatched = [f"{k}: {tuple(theirs[k])} vs {tuple(own[k])}"
                  for k in own if k in theirs and tuple(theirs[k]) != tuple(own[k])]

    def head(items):
        return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
    return "; ".join(f"{label} {head(items)}" for label, items in
                     (("missing keys", missing), ("unexpected keys", unexpected),
                      ("shape mismatches", mismatched)) if items)


def full_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """model.state_dict() including the scales Brevitas omits while uninitialized."""
    from brevitas import config

    saved = config._FULL_STATE_DICT
    config._FULL_STATE_DICT = True
    try:
        return model.state_dict()
    finally:
        config._FULL_STATE_DICT = saved
