"""FINN checks for exported QONNX models: the frontend, and the build steps to hardware.

FINN's frontend (``ConvertQONNXtoFINN`` then ``Streamline``) comes from the PyPI package
``finn-plus``, which pins onnx / protobuf / brevitas versions that conflict with
lr_quant's, so it lives in its own virtual environment and only ever reads the exported
``.onnx`` file. This package (main environment; it imports nothing from finn) builds that
environment on first use (:mod:`.env`) and runs ``frontend_check.py`` (and, for the hardware
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
  The first build downloads about 150 MB of wheels (about 600 MB installed).
- :func:`check_with_finn` (:mod:`.check`) runs the check and returns its JSON result (see
  ``frontend_check.py`` and ``hardware_steps.py`` for the steps and the fields).
- :func:`finn_hardware_check` (:mod:`.model_check`) exports a PyTorch model and returns
  FINN's verdict on it (``lr-quant export --finn``, ``lr-quant summary --finn``).
"""

from __future__ import annotations

from .check import FRONTEND_CHECK, FinnCheckError, check_with_finn
from .env import REQUIREMENTS, FinnEnvError, ensure_finn_env, finn_env_dir
from .model_check import FinnVerdict, finn_hardware_check, verdict_of

__all__ = [
    "FRONTEND_CHECK",
    "REQUIREMENTS",
    "FinnCheckError",
    "FinnEnvError",
    "FinnVerdict",
    "check_with_finn",
    "ensure_finn_env",
    "finn_env_dir",
    "finn_hardware_check",
    "verdict_of",
]
