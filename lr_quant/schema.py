"""Strict conversion between plain data (YAML, dicts) and typed dataclasses.

:func:`from_dict` reads a dataclass' type hints and recurses through Optional / Union /
List / Tuple / Dict / Literal / nested dataclasses (and types with a ``_from_recipe``
classmethod); an unknown key, a wrong type or a failing ``__post_init__`` raises
:class:`RecipeError` naming the dotted key path and the valid choices. :func:`to_dict`
inverts it. Used by :mod:`lr_quant.recipe` for every recipe section.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Dict, List, Literal, Mapping, Tuple, Union

__all__ = ["RecipeError", "from_dict", "to_dict", "join_path", "did_you_mean"]


class RecipeError(ValueError):
    """A recipe that does not validate; ``path`` is the dotted key path of the problem."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path or '<recipe>'}: {message}")


def join_path(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls, data, path: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type against the type
    hints (recursively); raises RecipeError naming the key path."""
    return _convert(data, cls, path)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value, tp, path: str):
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(path, f"null is not allowed; expected {_type_name(tp)}")
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _convert(value, alt, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(path, f"{value!r} matches none of {_type_name(tp)}: "
                                f"{'; '.join(str(e) for e in errors)}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(path, f"{value!r} is not one of {list(args)}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = args or (Any,)
        return [_convert(v, item, join_path(path, i)) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], join_path(path, i)) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise RecipeError(path, f"expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, join_path(path, i)) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise RecipeError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_convert(k, key_tp, join_path(path, k)): _convert(v, val_tp, join_path(path, k))
                for k, v in value.items()}
    if isinstance(tp, type) and hasattr(tp, "_from_recipe"):
        return tp._from_recipe(value, path)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(path, f"expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise RecipeError(path, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{path}: the recipe validator does not support type {tp!r}")


def _convert_dataclass(value, cls, path: str):
    if isinstance(value, cls):
        value = to_dict(value)
    if not isinstance(value, Mapping):
        raise RecipeError(path, f"expected a mapping (section {cls.__name__}), got "
                                f"{type(value).__name__} {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        key = unknown[0]
        raise RecipeError(join_path(path, key), f"unknown key {key!r}; valid keys: "
                                            f"{list(fields)}{did_you_mean(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(value[name], hints[name], join_path(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(join_path(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except RecipeError as e:
        if path and not e.path.startswith(path):
            raise RecipeError(join_path(path, e.path), str(e).split(": ", 1)[1]) from None
        raise
    except (ValueError, TypeError) as e:
        # __post_init__ checks (e.g. TrainConfig): name the field when the message does
        message = str(e)
        field_name = next((n for n in fields if re.match(rf"^{re.escape(n)}\b", message)), None)
        raise RecipeError(join_path(path, field_name) if field_name else path, message) from None


def to_dict(obj) -> Any:
    """Plain-data (YAML-safe) form of a recipe dataclass; `from_dict` inverts it."""
    if hasattr(obj, "_to_recipe"):
        return obj._to_recipe()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
