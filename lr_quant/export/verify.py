"""Verification: a QONNX file against the PyTorch model, on the example and on random
inputs of its shape; a mismatch names the first diverging node (see `diagnose`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .diagnose import try_diagnose
from .modules import eval_mode
from .results import QONNXMismatchError
from .run import (DEFAULT_ATOL, DEFAULT_RTOL, PathLike, check_input_shape, execute, load,
                  max_abs, tolerance, torch_reference)

__all__ = ["verify_qonnx", "verify_with_boundary_flips", "make_check_inputs"]

log = logging.getLogger(__name__)


def verify_qonnx(
        path: PathLike,
        model: nn.Module,
        inputs: Sequence[torch.Tensor],
        atol: float = DEFAULT_ATOL,
        rtol: float = DEFAULT_RTOL,
        diagnose: bool = True) -> float:
    """Check that the QONNX file reproduces `model` (eval mode) on every input.

    An output matches when max |qonnx - PyTorch| <= atol + rtol * max |PyTorch|. Returns
    the max absolute error; raises QONNXMismatchError (with the first diverging node,
    see `diagnose_qonnx`, when `diagnose`) otherwise.
    """
    return verify_with_boundary_flips(path, model, inputs, atol, rtol, diagnose,
                                      max_boundary_flips=0)[0]


def verify_with_boundary_flips(path, model, inputs, atol, rtol, diagnose, max_boundary_flips
                               ) -> Tuple[float, List[int]]:
    """`verify_qonnx`, skipping up to `max_boundary_flips` inputs whose only mismatch is a
    quantizer input on a decision boundary (`Divergence.boundary`); returns (max error over
    the other inputs, indices of the skipped ones)."""
    worst, flipped = 0.0, []
    wrapper = load(path)
    with eval_mode(model):
        for i, x in enumerate(inputs):
            reference = torch_reference(model, x)
            xs = x.detach().cpu().float().numpy()
            input_name, output_name = check_input_shape(wrapper, path, xs)
            got = execute(wrapper, path, {input_name: xs})[output_name]
            if got.shape != reference.shape:
                divergence = try_diagnose(path, model, x, atol, rtol) if diagnose else None
                where = f"; {divergence.describe()}" if divergence is not None else ""
                raise QONNXMismatchError(
                    f"input {i}: QONNX output shape {got.shape} != PyTorch {reference.shape}"
                    f"{where}", divergence=divergence, path=Path(path))
            err = max_abs(got, reference)
            tol = tolerance(reference, atol, rtol)
            if not err <= tol:
                divergence = None
                if diagnose or max_boundary_flips:
                    divergence = try_diagnose(path, model, x, atol, rtol)
                if divergence is not None and divergence.boundary and \
                        len(flipped) < max_boundary_flips:
                    log.warning("%s: input %d skipped: %s", path, i, divergence.describe())
                    flipped.append(i)
                    continue
                where = divergence.describe() if divergence is not None else \
                    "no intermediate tensor differs beyond tolerance"
                raise QONNXMismatchError(
                    f"input {i} of {len(inputs)}: QONNX output differs from PyTorch by up to "
                    f"{err:.3g} (tolerance {tol:.3g} = atol {atol:g} + rtol {rtol:g} * "
                    f"max |output|) in {path}; {where}",
                    max_abs_error=err, divergence=divergence, path=Path(path))
            worst = max(worst, err)
    return worst, flipped


def make_check_inputs(example: torch.Tensor, num_checks: int, seed: int
                      ) -> List[torch.Tensor]:
    """The example and num_checks - 1 random inputs with its shape, mean and spread."""
    g = torch.Generator().manual_seed(seed)
    x = example.detach()
    mean = float(x.float().mean()) if x.numel() else 0.0
    std = float(x.float().std()) if x.numel() > 1 else 0.0
    std = std if np.isfinite(std) and std > 0 else 1.0
    out = [x]
    for _ in range(max(num_checks, 1) - 1):
        r = torch.randn(x.shape, generator=g, dtype=torch.float32) * std + mean
        out.append(r.to(device=x.device, dtype=x.dtype))
    return out[:num_checks] if num_checks > 0 else []
