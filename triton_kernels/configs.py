"""Block-size configurations: autotune candidates for GPUs, one small tile for the interpreter.

A config is ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``; BLOCK_K counts
elements (a multiple of 32, i.e. ``BLOCK_K // 32`` packed words), except for the XNOR
kernel where the third entry is BLOCK_KW (words). Tensor-core kernels on sm_90 use wgmma
(IGMMA / HGMMA, one 4-warp group per 64 rows) when BLOCK_M >= 64, mma.sync (IMMA / HMMA)
below; tests/triton_kernels/test_aot.py checks this for every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlockConfig", "AUTOTUNE", "INTERPRET", "AUTOTUNE_KEY"]


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of one launch (``block_k`` is in words for the XNOR kernel)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")

    def meta(self, kernel: str) -> dict:
        """Block-size constexprs of the kernel family ``kernel`` (``xnor`` / ``int8`` / ``fp``)."""
        third = "BLOCK_KW" if kernel == "xnor" else "BLOCK_K"
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, third: self.block_k}


AUTOTUNE_KEY = ["M", "N", "K"]

# Candidates per kernel family; triton.autotune times them once per (M, N, K) bucket.
AUTOTUNE: dict[str, list[BlockConfig]] = {
    # Popcount pays at small M: small BLOCK_M, wide N, a few words per step.
    "xnor": [
        BlockConfig(16, 64, 4, 4, 2),
        BlockConfig(8, 128, 4, 4, 2),
        BlockConfig(16, 128, 2, 8, 2),
        BlockConfig(32, 64, 2, 4, 2),
    ],
    "int8": [
        BlockConfig(128, 128, 128, 8, 3),
        BlockConfig(128, 64, 128, 4, 4),
        BlockConfig(64, 128, 128, 4, 4),
        BlockConfig(64, 64, 256, 4, 3),
        BlockConfig(16, 64, 256, 4, 3),
    ],
    "fp": [
        BlockConfig(128, 128, 64, 8, 3),
        BlockConfig(128, 64, 64, 4, 4),
        BlockConfig(64, 128, 64, 4, 4),
        BlockConfig(64, 64, 128, 4, 3),
        BlockConfig(16, 64, 128, 4, 3),
    ],
}

# The interpreter runs every program in Python: smallest legal tiles.
INTERPRET: dict[str, BlockConfig] = {
    "xnor": BlockConfig(8, 8, 2),
    "int8": BlockConfig(16, 16, 32),
    "fp": BlockConfig(16, 16, 32),
}
