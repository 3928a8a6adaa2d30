"""FINN frontend checks for exported QONNX models.

FINN's frontend (``ConvertQONNXtoFINN`` then ``Streamline``) comes from the PyPI package
``finn-plus``, which pins onnx / protobuf / brevitas versions that conflict with
lr_quant's, so it lives in its own virtual environment and only ever reads the exported
``.onnx`` file. This module (main environment; it imports nothing from finn) builds that
environment on first use and runs ``frontend_check.py`` (and, for the hardware
mapping, ``hardware_steps.py``) in it::

    from lr_quant.finn import check_with_finn
    result = check_with_finn("model.onnx", inputs, expected)   # raises FinnCheckError
    result["stages"]["streamlined"]["op_types"]                 # {"MultiThreshold": 5, ...}
    check_with_finn(path, inputs, expected, dataflow=True)["dataflow"]["partitions"]  # 1

- :func:`ensure_finn_env` returns the FINN environment's python: the interpreter named
  by ``$LR_QUANT_FINN_PYTHON`` if set, else ``<cache>/finn-venv-<key>/bin/python`` with
  ``<cache> = $LR_QUANT_CACHE or ~/.cache/lr_quant`` and ``<key>`` a hash of
  ``requirements.txt``, the build recipe and the Python version. The venv is built when
  its ``.complete`` marker is missing (the marker is written last, so a failed build is
  retried), under a file lock, and superseded ``finn-venv-*`` directories are removed.
  The first build downloads about 60 MB of wheels (about 290 MB installed).
- :func:`check_with_finn` runs the check and returns its JSON result (see
  ``frontend_check.py`` for the transformation sequence and the fields).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = [
    "FRONTEND_CHECK",
    "REQUIREMENTS",
    "FinnCheckError",
    "FinnEnvError",
    "check_with_finn",
    "ensure_finn_env",
    "finn_env_dir",
]

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
FRONTEND_CHECK = Path(__file__).with_name("frontend_check.py")
PYTHON_ENV_VAR = "LR_QUANT_FINN_PYTHON"
CACHE_ENV_VAR = "LR_QUANT_CACHE"
#: finn-plus 1.6.1 requires Python >= 3.11.
MIN_PYTHON = (3, 11)
_MARKER = ".complete"
_PREFIX = "finn-venv-"
#: The build recipe; part of the venv key, so changing it rebuilds the venv.
_PIP_ARGS = ("install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "-r")
_SMOKE = ("import onnx, onnxruntime, qonnx.util.cleanup, "
          "finn.transformation.qonnx.convert_qonnx_to_finn, "
          "finn.transformation.streamline, finn.core.onnx_exec, "
          "finn.builder.build_dataflow_config, pandas, sklearn, scipy, mip, psutil")
_RECIPE = repr(("venv", _PIP_ARGS, _SMOKE, 1))


class FinnEnvError(RuntimeError):
    """The FINN environment could not be built or found."""


class FinnCheckError(RuntimeError):
    """FINN's frontend rejected the model or changed its outputs.

    ``result`` is the check's JSON result (None when the script wrote none) and
    ``stderr`` the script's standard error.
    """

    def __init__(self, message: str, result: dict | None = None, stderr: str = ""):
        super().__init__(message)
        self.result = result
        self.stderr = stderr


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "lr_quant"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _python_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60, check=True).stdout
        major, minor = map(int, out.split())
        return major, minor
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _base_python() -> tuple[str, tuple[int, int]]:
    """An interpreter >= 3.11 to create the venv from: this one, else one on PATH."""
    if sys.version_info[:2] >= MIN_PYTHON:
        return sys.executable, tuple(sys.version_info[:2])
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        path = shutil.which(name)
        version = _python_version(path) if path else None
        if version and version >= MIN_PYTHON:
            return path, version
    raise FinnEnvError(
        f"finn-plus needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}; this is "
        f"{sys.version.split()[0]} and none was found on PATH. Install one, or point "
        f"${PYTHON_ENV_VAR} at the python of a ready FINN environment.")


def finn_env_dir(cache_dir: str | os.PathLike | None = None,
                 python_version: tuple[int, int] | None = None) -> Path:
    """Where :func:`ensure_finn_env` keeps the venv for the current requirements."""
    if python_version is None:
        python_version = _base_python()[1]
    h = hashlib.sha256()
    h.update(REQUIREMENTS.read_bytes())
    h.update(_RECIPE.encode())
    h.update(("%d.%d" % tuple(python_version)).encode())
    return _cache_root(cache_dir) / f"{_PREFIX}{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (two test workers must not build the venv twice)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_step(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FinnEnvError(
            f"building the FINN environment failed at {what} (exit {proc.returncode}):\n"
            f"$ {' '.join(map(str, cmd))}\n{_tail(proc.stdout + proc.stderr)}")


def _build(venv: Path, base_python: str) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    start = time.monotonic()
    try:
        _run_step([base_python, "-m", "venv", str(venv)], "venv creation")
        python = str(_venv_python(venv))
        _run_step([python, "-m", "pip", *_PIP_ARGS, str(REQUIREMENTS)], "pip install")
        _run_step([python, "-c", _SMOKE], "the import check")
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    info = {"requirements_sha256": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest(),
            "recipe": _RECIPE, "base_python": base_python,
            "build_seconds": round(time.monotonic() - start, 1)}
    # Written last: a venv without it is incomplete and gets rebuilt.
    (venv / _MARKER).write_text(json.dumps(info, indent=2))


def ensure_finn_env(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the python of the FINN environment, building the venv if needed.

    ``$LR_QUANT_FINN_PYTHON`` (an existing interpreter with finn-plus installed) wins;
    otherwise the venv lives in ``finn_env_dir(cache_dir)``. Building takes about a
    minute with a warm pip cache; afterwards the call only checks the marker file.
    """
    override = os.environ.get(PYTHON_ENV_VAR)
    if override:
        python = Path(override)
        if not python.is_file():
            raise FinnEnvError(f"${PYTHON_ENV_VAR}={override} is not an existing file")
        return python
    base_python, version = _base_python()
    venv = finn_env_dir(cache_dir, version)
    root = venv.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "finn-venv.lock"):
        if not (venv / _MARKER).is_file():
            _build(venv, base_python)
        for old in root.glob(f"{_PREFIX}*"):
            if old != venv and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return _venv_python(venv)


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
            f"--- frontend_check.py stderr (tail) ---\n{_tail(proc.stderr, 25)}",
            result=result, stderr=proc.stderr)
    result["result_path"] = str(result_path)
    return result
