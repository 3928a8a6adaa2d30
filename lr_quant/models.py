"""Models: timm backbones with pretrained weights from the hub or from a local file.

``create_model(name, num_classes, pretrained=...)``:
- ``pretrained=True``: timm's hub weights (needs a network; the classifier is re-initialized
  when ``num_classes`` differs from the hub model's).
- ``pretrained="path/to/weights.safetensors"`` (or .pth/.bin): a local file through timm's
  ``pretrained_cfg_overlay=dict(file=...)``, the path tests and the quick start use. The
  file's classifier is kept when its shape fits ``num_classes``.
- ``pretrained=False``: random initialization.

``save_weights`` writes a float model's state dict as safetensors (atomically), so it can be
loaded back with ``create_model(name, pretrained=path)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["create_model", "save_weights", "ModelError", "architecture_of"]


class ModelError(RuntimeError):
    """A model name or a weight file is unusable (the message says why)."""


def _file_num_classes(path: Path, name: str) -> Optional[int]:
    """Number of classes of the classifier stored in a weight file (None if unknown)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    classifier = getattr(cfg, "classifier", None) or "fc"
    key = f"{classifier}.weight"
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
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ModelError(f"unknown timm model {name!r}" + (f"; similar: {close}" if close else ""))
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
    overlay = dict(file=str(path))
    if file_classes is not None:
        # keep the file's classifier when it fits; timm drops it when the cfg's differ
        overlay["num_classes"] = file_classes
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # size mismatch / missing keys from load_state_dict
        raise ModelError(f"weights in {path} do not fit {name!r} with {num_classes} classes: "
                         f"{str(e).splitlines()[0]}") from e
    _check_loaded(model, path, name)
    return model


def _file_keys(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state))
    return set(state)


def _check_loaded(model: nn.Module, path: Path, name: str) -> None:
    """timm loads non-strictly in places (it warns): refuse files that do not fit."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    own = {k for k in model.state_dict() if not k.startswith(classifier + ".")}
    keys = {k for k in _file_keys(path) if not k.startswith(classifier + ".")}
    missing, unexpected = sorted(own - keys), sorted(keys - own)
    if missing or unexpected:
        raise ModelError(f"weights in {path} do not fit {name!r}: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")


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
