"""The trace: one eval forward of the float model recording who reads what.

Module hooks and a ``TorchFunctionMode`` find the layers that read the network input (they
get ``activations.input_quantizer``), every reader of each monotone activation module's
output (:data:`.handlers.DROPPABLE_ACTIVATIONS`: dropped when all readers are sign inputs)
the readers of each layer's output (its bias folds into a BatchNorm that is the only
reader) and the max-pools between an activation and the layers reading the pool (a sign
can move in front of such a pool). It also finds layers whose weight is read outside the
layer's own forward (BEiT's ``F.linear(x, self.qkv.weight, bias)``): converting those would
swap in logits that nothing reads. :func:`default_example_input` is the batch used when the
caller gives none.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..recipe import Recipe
from .handlers import DROPPABLE_ACTIVATIONS

__all__ = ["default_example_input"]

_METADATA_FUNCS = {
    "__get__", "size", "dim", "numel", "__len__", "is_contiguous", "is_floating_point",
    "element_size", "stride", "ndimension", "nelement", "data_ptr", "is_complex",
    "storage_offset", "__format__", "__repr__", "get_device", "__hash__", "__eq__"}
#: tensor attributes (``__get__``) that hand on the values: ``w.T`` reads w like a function
_VALUE_GETTERS = {"T", "mT", "H", "mH", "data"}


def _getter_name(func) -> Optional[str]:
    """'T' for ``Tensor.T.__get__`` (an attribute read), else None."""
    if getattr(func, "__name__", None) != "__get__":
        return None
    return getattr(getattr(func, "__self__", None), "__name__", None)


def _func_name(func) -> str:
    """How the source spells `func`: ``F.linear``, ``Tensor.T``, ``torch.matmul``."""
    name = getattr(func, "__name__", repr(func))
    attr = _getter_name(func)
    if attr is not None:
        return f"Tensor.{attr}"
    if getattr(F, name, None) is func:
        return f"F.{name}"
    return f"Tensor.{name}" if getattr(Tensor, name, None) is func else f"torch.{name}"


class _ConsumerMode(TorchFunctionMode):
    """Records every torch function (outside the watched layers) that reads a watched
    tensor: such a reader is not a sign input, so the activation must stay."""

    def __init__(self):
        super().__init__()
        self.watched: Dict[int, Tuple[str, str]] = {}    # id(tensor) -> (kind, name)
        self.depth = 0
        self.other: Dict[Tuple[str, str], set] = defaultdict(set)
        # direct weight reads: id(weight) -> [(id(layer), layer name)] (a tied weight has
        # several owners), the modules whose forward is running (innermost last), and
        # layer name -> {"F.linear in blocks.0.attn", ...}
        self.weights: Dict[int, List[Tuple[int, str]]] = {}
        self.running: List[Tuple[int, str]] = []
        self.direct: Dict[str, set] = defaultdict(set)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", repr(func))
        reads = fname not in _METADATA_FUNCS or _getter_name(func) in _VALUE_GETTERS
        if reads and (self.weights or (self.depth == 0 and self.watched)):
            for t in tree_flatten((args, kwargs))[0]:
                if not isinstance(t, Tensor):
                    continue
                if self.depth == 0 and id(t) in self.watched:
                    self.other[self.watched[id(t)]].add(fname)
                for owner, layer in self.weights.get(id(t), ()):
                    if all(owner != i for i, _ in self.running):
                        where = self.running[-1][1] if self.running else ""
                        self.direct[layer].add(f"{_func_name(func)} in {where or 'the model'}")
        return func(*args, **kwargs)


@dataclass
class _Trace:
    """Who reads what in the traced forward (modules by name)."""
    reads_input: set                    # layer names reading the network input
    act_consumers: Dict[str, set]       # activation module name -> layer names reading it
    act_other: Dict[str, set]           # activation module name -> other readers
    act_calls: Dict[str, int]
    norm_after: Dict[str, set]          # layer name -> BatchNorm names reading its output
    layer_out_other: Dict[str, set]     # layer name -> other readers of its output
    pools_after_act: Dict[str, set]     # activation module name -> max-pools reading it
    pool_consumers: Dict[str, set]      # max-pool name -> layer names reading its output
    pool_other: Dict[str, set]          # max-pool name -> other readers of its output
    direct_reads: Dict[str, set]        # layer name -> reads of its weight outside its forward


_NORMS = nn.modules.batchnorm._BatchNorm
#: Pools a sign may move in front of: sign(max(x) - t) = max(sign(x - t)) (sign is monotone).
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


@torch.no_grad()
def _trace(model: nn.Module, example_input: Tensor, layer_names: Dict[int, str]) -> _Trace:
    """One eval forward recording who reads what: the network input, the outputs of
    monotone activation modules, the outputs of the layers (for bias folding) and the
    layers' weights outside their own forward."""
    names = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    mode = _ConsumerMode()
    keep_alive = []
    reads_input, consumers, calls = set(), defaultdict(set), defaultdict(int)
    norm_after, pools_after_act = defaultdict(set), defaultdict(set)
    handles = []

    def watch(t, key):
        if isinstance(t, Tensor):
            keep_alive.append(t)
            mode.watched[id(t)] = key

    def reader_pre(module, args):
        name = names[id(module)]
        x = args[0] if args else None
        key = mode.watched.get(id(x)) if isinstance(x, Tensor) else None
        if id(module) in layer_names:
            if x is example_input:
                reads_input.add(layer_names[id(module)])
            if key is not None and key[0] in ("act", "pool"):
                consumers[key].add(layer_names[id(module)])
            elif key is not None:
                mode.other[key].add(name)
        elif key is not None and key[0] == "layer" and isinstance(module, _NORMS):
            norm_after[key[1]].add(name)
        elif key is not None:
            mode.other[key].add(name)  # a pool reading an activation stays "other" too
            if key[0] == "act" and isinstance(module, MAX_POOLS):
                pools_after_act[key[1]].add(name)
        mode.depth += 1

    def reader_post(module, args, out):
        mode.depth -= 1
        if id(module) in layer_names:
            watch(out, ("layer", layer_names[id(module)]))
        elif isinstance(module, MAX_POOLS):
            watch(out, ("pool", names[id(module)]))

    def act_post(module, args, out):
        name = names[id(module)]
        calls[name] += 1
        watch(out, ("act", name))

    def enter(module, args):
        mode.running.append((id(module), names[id(module)]))

    def leave(module, args, out):
        mode.running.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
        weight = getattr(module, "weight", None)
        if id(module) in layer_names and isinstance(weight, Tensor):
            mode.weights.setdefault(id(weight), []).append((id(module), layer_names[id(module)]))
        if id(module) in layer_names or isinstance(module, (_NORMS,) + MAX_POOLS):
            handles.append(module.register_forward_pre_hook(reader_pre))
            handles.append(module.register_forward_hook(reader_post))
        elif isinstance(module, DROPPABLE_ACTIVATIONS):
            handles.append(module.register_forward_hook(act_post))
    training = model.training
    model.eval()
    try:
        with mode:
            out = model(example_input)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and id(t) in mode.watched:
                mode.other[mode.watched[id(t)]].add("model output")
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    def of_kind(table, kind):
        return {k[1]: v for k, v in table.items() if k[0] == kind}

    return _Trace(reads_input, of_kind(consumers, "act"), of_kind(mode.other, "act"),
                  dict(calls), dict(norm_after), of_kind(mode.other, "layer"),
                  dict(pools_after_act), of_kind(consumers, "pool"),
                  of_kind(mode.other, "pool"), dict(mode.direct))


def default_example_input(model: nn.Module, recipe: Recipe, batch: int = 2,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """A random batch of `batch` inputs of the model's size: channels from the recipe's
    ``model.in_chans`` (else timm's ``pretrained_cfg`` input size, else 3), height and width
    from a timm ViT's fixed ``img_size``, else the recipe's ``data.image_size``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = recipe.model.in_chans or (cfg.get("input_size") or (3,))[0]
    size = recipe.data.image_size
    patch = getattr(model, "patch_embed", None)
    img_size = getattr(patch, "img_size", None)
    if img_size is not None and getattr(patch, "strict_img_size", True):
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    else:
        h = w = size
    return torch.randn(batch, chans, h, w, generator=generator)
