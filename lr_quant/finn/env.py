"""The FINN virtual environment: finn-plus and the closure of what the checks import
(``requirements.txt``), built on first use, cached under a key of what it installs.

- :func:`ensure_finn_env` returns its python: ``$LR_QUANT_FINN_PYTHON`` if set, else
  ``<cache>/finn-venv-<key>/bin/python`` with ``<cache> = $LR_QUANT_CACHE or
  ~/.cache/lr_quant`` and ``<key>`` a hash of ``requirements.txt``, the build recipe and
  the Python version. The venv is built when its ``.complete`` marker is missing (written
  last, so a failed build is retried), under a file lock; superseded ``finn-venv-*``
  directories are removed.
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

__all__ = ["REQUIREMENTS", "FinnEnvError", "ensure_finn_env", "finn_env_dir"]

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
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


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_step(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FinnEnvError(
            f"building the FINN environment failed at {what} (exit {proc.returncode}):\n"
            f"$ {' '.join(map(str, cmd))}\n{tail(proc.stdout + proc.stderr)}")


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
