"""Ahead-of-time compilation for sm_90 without a GPU: instruction selection and spills.

Uses ptxas / cuobjdump shipped in the Triton wheel (no CUDA toolkit, no driver needed).
"""

import re

import pytest

from triton_kernels.aot import KERNEL_VARIANTS, compile_kernel, ptxas_spills, sass
from triton_kernels.configs import AUTOTUNE

# variant -> (PTX instruction, SASS opcode) expected with the first (BLOCK_M >= 64) config.
EXPECTED = {
    "xnor": (r"popc\.b32", r"\bPOPC\b"),
    "w1a1_int8": (r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", r"\bIGMMA\.64x\d+x32\.S8\.S8"),
    "w1a8": (r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", r"\bIGMMA\.64x\d+x32\.S8\.S8"),
    "w1a16_fp16": (r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16", r"\bHGMMA\.64x\d+x16\.F32\b(?!\.BF16)"),
    "w1a16_bf16": (r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", r"\bHGMMA\.64x\d+x16\.F32\.BF16"),
    "w2a16_fp16": (r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16", r"\bHGMMA\.64x\d+x16\.F32\b(?!\.BF16)"),
    "w2a16_bf16": (r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", r"\bHGMMA\.64x\d+x16\.F32\.BF16"),
}


def test_every_variant_has_an_expectation():
    assert set(EXPECTED) == set(KERNEL_VARIANTS)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_sm90_instructions_and_no_spills(variant):
    compiled = compile_kernel(variant, arch=90)
    ptx_re, sass_re = EXPECTED[variant]
    assert re.search(ptx_re, compiled.asm["ptx"]), f"{variant}: no {ptx_re} in PTX"
    code = sass(compiled)
    assert re.search(sass_re, code), f"{variant}: no {sass_re} in SASS"
    assert not re.search(r"\b(LDL|STL)\b", code), f"{variant}: local-memory traffic in SASS"
    report = ptxas_spills(compiled)
    assert (report.spill_stores, report.spill_loads, report.stack_frame) == (0, 0, 0), report.log
    assert report.registers <= 255


# Every autotune candidate must compile without spills and use the intended unit:
# wgmma for BLOCK_M >= 64 (one warp group), mma.sync (IMMA / HMMA) below.
@pytest.mark.parametrize("variant", ["xnor", "w1a1_int8", "w2a16_bf16"])
def test_autotune_configs_compile_cleanly(variant):
    family = KERNEL_VARIANTS[variant][1]
    for config in AUTOTUNE[family]:
        compiled = compile_kernel(variant, arch=90, config=config)
        report = ptxas_spills(compiled)
        assert (report.spill_stores, report.spill_loads) == (0, 0), (config, report.log)
        code = sass(compiled)
        if family == "xnor":
            expected = r"\bPOPC\b"
        elif config.block_m >= 64:
            expected = r"\bIGMMA\b" if family == "int8" else r"\bHGMMA\b"
        else:
            expected = r"\bIMMA\b" if family == "int8" else r"\bHMMA\b"
        assert re.search(expected, code), (config, expected)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown kernel variant"):
        compile_kernel("w4a4")
