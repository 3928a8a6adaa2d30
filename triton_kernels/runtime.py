"""Where kernels run: compiled for the GPU, or in the Triton interpreter on CPU tensors.

``@triton.jit`` decides at *decoration* time (Triton 3.x reads
``triton.knobs.runtime.interpret``, i.e. ``TRITON_INTERPRET``) whether a function becomes
a compiled ``JITFunction`` or an ``InterpretedFunction``. Setting the environment
variable globally would switch every Triton kernel of the process (Inductor's too), so
:func:`load_kernels` instead executes a private copy of :mod:`triton_kernels.kernels`
with the knob set only for the duration of that import and restored afterwards. The
normally imported module is reused when it is already in the requested mode (e.g. the
user exported ``TRITON_INTERPRET=1``). Triton's own ``@jit`` standard library is decided
once, when triton is imported: the kernels therefore call only builtins, and a compiled
copy needs a process that imported triton without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

__all__ = ["triton_available", "load_kernels", "is_interpreted"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` imports (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs in the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def load_kernels(interpret: bool) -> ModuleType:
    """The kernel module with every ``@triton.jit`` function interpreted or compiled.

    Args:
        interpret: True for the Triton interpreter (CPU tensors), False for the compiler.
    """
    if not triton_available():
        raise RuntimeError("triton is not installed: only the torch reference can run")
    import triton

    from . import kernels

    if is_interpreted(kernels.xnor_gemm_kernel) == interpret:
        return kernels
    name = f"{kernels.__name__}__{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec.loader.exec_module(module)
    return module
