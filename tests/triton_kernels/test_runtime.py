"""Interpreted and compiled kernel copies coexist without touching global Triton state."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from triton_kernels.runtime import is_interpreted, load_kernels

REPO = Path(__file__).resolve().parents[2]


def test_both_copies_without_leaking_the_knob():
    env_before = os.environ.get("TRITON_INTERPRET")
    knob_before = triton.knobs.runtime.interpret
    interp, compiled = load_kernels(True), load_kernels(False)
    for name in ("xnor_gemm_kernel", "binary_int8_gemm_kernel", "packed_fp_gemm_kernel", "popcount32"):
        assert isinstance(getattr(interp, name), InterpretedFunction)
        assert isinstance(getattr(compiled, name), JITFunction)
        assert is_interpreted(getattr(interp, name)) and not is_interpreted(getattr(compiled, name))
    assert os.environ.get("TRITON_INTERPRET") == env_before
    assert triton.knobs.runtime.interpret == knob_before

    @triton.jit
    def decorated_afterwards(x):  # other code in the process is still compiled
        return x

    assert isinstance(decorated_afterwards, JITFunction) == (not knob_before)


def test_global_triton_interpret_env_is_supported():
    # A user who exports TRITON_INTERPRET=1 gets the normally imported module for "interpret".
    code = textwrap.dedent("""
        import torch
        import triton_kernels.kernels as k
        from triton_kernels import ops
        from triton_kernels.packing import pack_binary
        from triton_kernels.runtime import load_kernels
        assert load_kernels(True) is k
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 2, (3, 45), generator=g) * 2 - 1
        w = torch.randint(0, 2, (5, 45), generator=g) * 2 - 1
        out = ops.xnor_gemm(pack_binary(x), pack_binary(w), 45, backend="interpret")
        assert torch.equal(out, (x.double() @ w.double().T).int())
        print("ok")
    """)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
