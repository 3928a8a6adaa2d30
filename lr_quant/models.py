"""Models: timm backbones with pretrained weights from the hub or from a local file.

``create_model(name, num_classes, pretrained=...)``:
- ``pretrained=True``: timm's hub weights (needs a network; the classifier is re-initialized
  when ``num_classes`` differs from the hub model's).
- ``pretrained="path/to/weights.safetensors"`` (or .pth/.bin): a local file through timm's
  ``pretrained_cfg_overlay=dict(file=...)``, the path tests and the quick start use. The
  file's classifier is kept when its shape fits ``num_classes``; otherwise it is
  re-initialized and a ``ClassifierReinitWarning`` says so.
- ``pretrained=False``: random initialization.

``save_weights`` writes a float model's state dict as safetensors (atomically), so it can be
loaded back with ``create_model(name, pretrained=path)``.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["create_model", "save_weights", "ModelError", "ClassifierReinitWarning",
           "architecture_of", "parameter_count"]


class ModelError(RuntimeError):
    """A model name or a weight file is unusable (the message says why)."""


class ClassifierReinitWarning(UserWarning):
    """A weight file's classifier has another number of classes: it was re-initialized."""


def _classifier(name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    return getattr(cfg, "classifier", None) or "fc"


def _file_num_classes(path: Path, name: str) -> Optional[int]:
    """Number of classes of the classifier stored in a weight file (None if unknown)."""
    key = f"{_classifier(name)}.weight"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                if key in f.keys():
                    return int(f.get_slice(key).get_shape()[0])
                return None
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        return int(state[key].shape[0]) if key in state else None
    except Exception as e:
        raise ModelError(f"cannot read pretrained weights {path}: {type(e).__name__}: {e}") from e


def create_model(name: str, num_classes: int, pretrained: Union[bool, str, os.PathLike] = False,
                 **kwargs) -> nn.Module:
    """A timm model `name` with `num_classes` outputs, optionally pretrained (see module doc)."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        raise ModelError(f"unknown timm model {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    if pretrained in (False, None, "", "none"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained is True or pretrained == "hub":
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:  # no network, no weights for this name
            raise ModelError(f"downloading pretrained weights for {name!r} failed ({e}); "
                             f"without a network pass a local file: --pretrained PATH") from e
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelError(f"pretrained weight file {path} does not exist")
    file_classes = _file_num_classes(path, name)
    # a recipe's own overlay (e.g. the statistics its weights were trained with) is kept
    overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": str(path)}
    if file_classes is not None:
        # keep the file's classifier when it fits; timm drops it when the cfg's differ
        overlay["num_classes"] = file_classes
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # size mismatch / missing keys from load_state_dict
        fresh = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        problems = _mismatch(fresh, path) or " ".join(str(e).split())
        raise ModelError(f"weights in {path} do not fit {name!r} with {num_classes} classes: "
                         f"{problems}") from e
    problems = _mismatch(model, path, shapes=False)   # timm adapts some shapes (in_chans)
    if problems:   # timm loads non-strictly in places (it warns): refuse files that do not fit
        raise ModelError(f"weights in {path} do not fit {name!r}: {problems}")
    if file_classes is not None and file_classes != num_classes:
        warnings.warn(f"the classifier of {path} has {file_classes} classes, the model "
                      f"{num_classes}: the classifier ({_classifier(name)}) is re-initialized "
                      f"randomly (train it)", ClassifierReinitWarning, stacklevel=2)
    return model


def _file_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state))
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _mismatch(model: nn.Module, path: Path, shapes: bool = True) -> str:
    """The keys (and shapes) of the weight file that do not fit `model`, classifier aside."""
    from .checkpoint import describe_mismatch

    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    own = {k: v.shape for k, v in model.state_dict().items()
           if not k.startswith(classifier + ".")}
    theirs = {k: own.get(k, v) if not shapes else v for k, v in _file_shapes(path).items()
              if not k.startswith(classifier + ".")}
    return describe_mismatch(own, theirs)


def save_weights(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Save a float model's state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
              str(tmp))
    os.replace(tmp, path)
    return path


def architecture_of(model: nn.Module) -> str:
    """A name for checks on load: timm's architecture name, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def parameter_count(name: str, num_classes: int = 1000, **kwargs) -> Optional[int]:
    """Parameters of timm model `name`, built on the meta device (no memory, no weights);
    None when it cannot be built there."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except Exception:   # unknown name, or a model that computes values while it is built
        return None
    return sum(p.numel() for p in model.parameters())
