"""Run FINN's frontend (and optionally its build steps) on an exported QONNX file, in the
FINN environment, and compare the outputs with the caller's reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from .env import ensure_finn_env, tail

__all__ = ["FRONTEND_CHECK", "FinnCheckError", "check_with_finn"]

FRONTEND_CHECK = Path(__file__).with_name("frontend_check.py")


class FinnCheckError(RuntimeError):
    """FINN's frontend rejected the model or changed its outputs.

    ``result`` is the check's JSON result (None when the script wrote none) and
    ``stderr`` the script's standard error.
    """

    def __init__(self, message: str, result: dict | None = None, stderr: str = ""):
        super().__init__(message)
        self.result = result
        self.stderr = stderr


def check_with_finn(onnx_path: str | os.PathLike, inputs: np.ndarray, expected: np.ndarray,
                    atol: float = 1e-4, *, work_dir: str | os.PathLike | None = None,
                    allow_quant_nodes: bool = False, dataflow: bool = False,
                    python: str | os.PathLike | None = None,
                    timeout: float | None = 1800) -> dict:
    """Check that FINN's frontend takes ``onnx_path`` and keeps its outputs.

    ``inputs`` are stacked on the exported model's batch axis (any multiple of the
    exported batch size); ``expected`` are the reference outputs (e.g. PyTorch's). The
    model goes through qonnx cleanup, ``ConvertQONNXtoFINN`` + tidy-up and FINN's BNN
    streamlining, each stage executed by ``finn.core.onnx_exec.execute_onnx`` and
    compared with ``expected`` (max abs error <= ``atol``). The transformed models go
    to ``work_dir`` (default ``<model stem>_finn/`` beside the model).

    With ``dataflow=True`` finn-plus' build steps then run up to the estimate reports
    (``hardware_steps.py``): the result's ``dataflow`` holds ``partitions``, ``outside``
    (ops outside the partition), ``partition_op_types``, ``stages`` (outputs after
    streamlining and partitioning) and ``estimates`` (LUT / BRAM / DSP per layer); more
    than one partition or a compute op outside it fails the check.

    Returns the result dict (``stages`` -> ``qonnx`` / ``converted`` / ``streamlined``
    with ``max_abs_err``, ``op_types``, ``model_path``; ``streamlined_model``). Raises
    :class:`FinnCheckError` when FINN raises, an output changes, or QONNX quantizer
    nodes are left after conversion (unless ``allow_quant_nodes``).
    """
    onnx_path = Path(onnx_path).resolve()
    if not onnx_path.is_file():
        raise FileNotFoundError(onnx_path)
    inputs = np.asarray(inputs, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    if inputs.ndim == 0 or expected.ndim == 0 or inputs.shape[0] != expected.shape[0]:
        raise ValueError(
            f"inputs {inputs.shape} and expected {expected.shape} need the same number "
            "of samples on axis 0")
    python = Path(python) if python is not None else ensure_finn_env()
    work = Path(work_dir) if work_dir is not None else onnx_path.with_name(
        onnx_path.stem + "_finn")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "io.npz"
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    np.savez(data, inputs=inputs, expected=expected)
    cmd = [str(python), str(FRONTEND_CHECK), str(onnx_path), str(data), str(result_path),
           "--out-dir", str(work), "--atol", repr(float(atol))]
    if allow_quant_nodes:
        cmd.append("--allow-quant-nodes")
    if dataflow:
        cmd.append("--dataflow")
    # The FINN env must see only its own packages, never the caller's path settings.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise FinnCheckError(f"FINN frontend check of {onnx_path} timed out after "
                             f"{timeout} s", stderr=str(exc.stderr or "")) from exc
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if proc.returncode != 0 or result is None or not result.get("ok"):
        if result and result.get("error"):
            reason = f"FINN raised in stage '{result.get('failed_stage', '?')}': " \
                     f"{result['error']}"
        elif result and result.get("problems"):
            reason = "; ".join(result["problems"])
        else:
            reason = f"frontend_check.py exited with status {proc.returncode}"
        raise FinnCheckError(
            f"FINN frontend check failed for {onnx_path.name}: {reason}\n"
            f"--- frontend_check.py stderr (tail) ---\n{tail(proc.stderr, 25)}",
            result=result, stderr=proc.stderr)
    result["result_path"] = str(result_path)
    return result
