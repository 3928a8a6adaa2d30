"""Ahead-of-time compilation of the kernels for a CUDA target, without a GPU.

``compile_kernel("xnor", arch=90)`` runs ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``: Triton lowers to PTX and calls ``ptxas`` from the
Triton wheel, so the cubin exists even without a driver. :func:`sass` disassembles it with
the wheel's ``cuobjdump``; :func:`ptxas_spills` re-runs ``ptxas -v`` on the PTX and
parses its register / spill report. Used by the tests to check instruction selection
(POPC, IGMMA, HGMMA) and the absence of spills, and by anyone targeting a GPU they lack.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .configs import AUTOTUNE, BlockConfig
from .runtime import load_kernels

__all__ = ["KERNEL_VARIANTS", "compile_kernel", "sass", "ptxas_spills", "SpillReport"]

_INTS = ("M", "N", "K", "KW", "stride_xm", "stride_wn", "stride_om")

# variant -> (kernel function name, config family, pointer types, extra constexprs)
KERNEL_VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    "xnor": ("xnor_gemm_kernel", "xnor",
             {"x_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*i32"}, {}),
    "w1a1_int8": ("binary_int8_gemm_kernel", "int8",
                  {"x_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*i32"}, {"X_PACKED": True}),
    "w1a8": ("binary_int8_gemm_kernel", "int8",
             {"x_ptr": "*i8", "w_ptr": "*i32", "out_ptr": "*i32"}, {"X_PACKED": False}),
    "w1a16_fp16": ("packed_fp_gemm_kernel", "fp",
                   {"x_ptr": "*fp16", "w_ptr": "*i32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*fp16"},
                   {"TERNARY": False, "HAS_BIAS": True, "DOT_FP32": False}),
    "w1a16_bf16": ("packed_fp_gemm_kernel", "fp",
                   {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16"},
                   {"TERNARY": False, "HAS_BIAS": True, "DOT_FP32": False}),
    "w2a16_fp16": ("packed_fp_gemm_kernel", "fp",
                   {"x_ptr": "*fp16", "w_ptr": "*i32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*fp16"},
                   {"TERNARY": True, "HAS_BIAS": True, "DOT_FP32": False}),
    "w2a16_bf16": ("packed_fp_gemm_kernel", "fp",
                   {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16"},
                   {"TERNARY": True, "HAS_BIAS": True, "DOT_FP32": False}),
}


def compile_kernel(variant: str, arch: int = 90, config: BlockConfig | None = None):
    """Compile one kernel variant for ``sm_<arch>``; returns triton's ``CompiledKernel``.

    Pointers and strides get the 16-divisibility hint the JIT would infer for aligned
    tensors. ``config`` defaults to the first autotune candidate of the kernel family.
    """
    if variant not in KERNEL_VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; choose from {sorted(KERNEL_VARIANTS)}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn_name, family, pointers, flags = KERNEL_VARIANTS[variant]
    fn = getattr(load_kernels(interpret=False), fn_name)
    config = config or AUTOTUNE[family][0]
    constexprs = {**flags, **config.meta(family)}
    signature = {}
    for name in fn.arg_names:
        if name in pointers:
            signature[name] = pointers[name]
        elif name in _INTS:
            signature[name] = "i32"
        elif name in constexprs:
            signature[name] = "constexpr"
        else:  # pragma: no cover - a kernel argument this table does not know
            raise KeyError(f"no type for argument {name!r} of {fn_name}")
    aligned = [n for n in fn.arg_names if n in pointers or n.startswith("stride")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def sass(compiled) -> str:
    """SASS text of a compiled kernel (``cuobjdump -sass`` shipped with the Triton wheel)."""
    from triton.tools.disasm import get_sass

    return get_sass(compiled.asm["cubin"])


@dataclass(frozen=True)
class SpillReport:
    """Parsed ``ptxas -v`` summary."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    log: str


def ptxas_spills(compiled) -> SpillReport:
    """Re-assemble the kernel's PTX with ``ptxas -v`` and parse registers and spill bytes."""
    from triton import knobs

    arch = compiled.metadata.target.arch
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    tool = knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run([tool.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"unexpected ptxas -v output (no {pattern!r}):\n{log}")
        return int(m.group(1))

    return SpillReport(
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack_frame=grab(r"(\d+) bytes stack frame"),
        log=log,
    )
