"""Packed GEMM operators: validate operands, pick a backend, launch a kernel.

Every op computes ``out[M, N] = x[M, K] @ w[N, K]^T`` with ``w`` packed along K
(:mod:`triton_kernels.packing`); ``k`` is the true reduction length: it must need exactly
the operands' word count, and equal the K they were packed from where they record it.

Backends (``backend=``):
  ``"auto"``      Triton on CUDA tensors, the torch reference otherwise;
  ``"torch"``     :mod:`triton_kernels.reference` (any device);
  ``"triton"``    compiled kernels (CUDA tensors; autotuned unless ``config`` is given);
  ``"interpret"`` the same kernels in the Triton interpreter on CPU tensors (tests).
"""

from __future__ import annotations

import functools

import torch

from . import reference
from .configs import AUTOTUNE, AUTOTUNE_KEY, INTERPRET, BlockConfig
from .packing import num_words, packed_k
from .runtime import load_kernels, triton_available

__all__ = ["BACKENDS", "resolve_backend", "xnor_gemm", "w1a1_int8_gemm", "w1a8_gemm", "w1a16_gemm", "w2a16_gemm"]

BACKENDS = ("auto", "torch", "triton", "interpret")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend (``torch`` / ``triton`` / ``interpret``) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cuda = device.type == "cuda"
    if backend == "auto":
        return "triton" if cuda and triton_available() else "torch"
    if backend == "triton" and not cuda:
        raise ValueError("backend='triton' needs CUDA tensors; use 'interpret' for CPU tensors")
    if backend == "interpret" and device.type != "cpu":
        raise ValueError("backend='interpret' runs on CPU tensors only")
    return backend


# ----------------------------------------------------------------------------- checks


def _check(t, name: str, dtypes: tuple, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last (K) axis; call .contiguous()")


def _check_packed_weight(w: torch.Tensor, k: int, ternary: bool) -> tuple[int, int]:
    name = "w_packed (ternary)" if ternary else "w_packed"
    _check(w, name, (torch.int32,), 3 if ternary else 2)
    if ternary and w.shape[1] != 2:
        raise ValueError(f"ternary w_packed must have shape [N, 2, KW], got {tuple(w.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    kw = num_words(k)
    if w.shape[-1] != kw:
        raise ValueError(f"K alignment: k={k} needs ceil(k/32)={kw} words per row, w_packed has {w.shape[-1]}")
    _check_packed_k(w, k, "w_packed")
    if not w.is_contiguous():
        raise ValueError("w_packed must be contiguous; call .contiguous()")
    return w.shape[0], kw


def _check_packed_k(t: torch.Tensor, k: int, name: str) -> None:
    """The words do not bound K from above (70 and 90 both take 3): where the tensor
    records the K it was packed from, any other k counts padding bits as matches."""
    true_k = packed_k(t)
    if true_k is not None and true_k != k:
        raise ValueError(f"k={k} but {name} was packed from K={true_k} values per row "
                         f"(its padding bits would count as data)")


def _check_packed_x(x: torch.Tensor, k: int, kw: int) -> None:
    _check(x, "x_packed", (torch.int32,), 2)
    if x.shape[1] != kw:
        raise ValueError(f"K alignment: x_packed has {x.shape[1]} words per row, expected {kw} for k={k}")
    _check_packed_k(x, k, "x_packed")
    _check_rows(x, "x_packed")


def _check_same_device(*named) -> None:
    devices = {t.device for _, t in named if t is not None}
    if len(devices) > 1:
        raise ValueError("operands on different devices: " + ", ".join(f"{n}={t.device}" for n, t in named if t is not None))


def _check_channel_vector(v, name: str, n: int) -> None:
    if v is None:
        return
    _check(v, name, (torch.float32, torch.float16, torch.bfloat16, torch.float64), 1)
    if v.shape[0] != n:
        raise ValueError(f"{name} must have N={n} entries (one per output channel), got {v.shape[0]}")


# ----------------------------------------------------------------------------- launching


@functools.lru_cache(maxsize=None)
def _autotuned(kernel_name: str, family: str, interpret: bool = False):
    import triton

    configs = [triton.Config(c.meta(family), num_warps=c.num_warps, num_stages=c.num_stages) for c in AUTOTUNE[family]]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(getattr(load_kernels(interpret), kernel_name))


def _run_autotuned(kernel_name: str, family: str, interpret: bool, m: int, n: int, args, consts) -> None:
    """Launch through ``triton.autotune`` over ``AUTOTUNE[family]`` (timed once per M, N, K)."""
    import triton

    kernel = _autotuned(kernel_name, family, interpret)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](*args, **consts)


def _launch(kernel_name: str, family: str, backend: str, config: BlockConfig | None, m: int, n: int, args, consts):
    import triton

    if backend == "triton" and config is None:
        _run_autotuned(kernel_name, family, False, m, n, args, consts)
        return
    config = config or INTERPRET[family]
    if family != "xnor" and config.block_k % 32:
        raise ValueError(f"block_k must be a multiple of 32, got {config.block_k}")
    kernel = getattr(load_kernels(backend == "interpret"), kernel_name)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    kernel[grid](*args, **consts, **config.meta(family), num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------- ops


def xnor_gemm(x_packed: torch.Tensor, w_packed: torch.Tensor, k: int, *, backend: str = "auto",
              config: BlockConfig | None = None) -> torch.Tensor:
    """W1A1 by XNOR-popcount: ``out[m, n] = K - 2 popcount(x_m xor w_n)``, int32 ``[M, N]``.

    Args:
        x_packed: int32 ``[M, ceil(K/32)]`` packed ±1 activations.
        w_packed: int32 ``[N, ceil(K/32)]`` packed ±1 weights.
        k: true reduction length K.
    """
    n, kw = _check_packed_weight(w_packed, k, ternary=False)
    _check_packed_x(x_packed, k, kw)
    _check_same_device(("x_packed", x_packed), ("w_packed", w_packed))
    backend = resolve_backend(backend, x_packed.device)
    if backend == "torch":
        return reference.xnor_gemm_ref(x_packed, w_packed, k)
    m = x_packed.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=x_packed.device)
    if m and n:
        _launch("xnor_gemm_kernel", "xnor", backend, config, m, n,
                (x_packed, w_packed, out, m, n, k, kw, x_packed.stride(0), w_packed.stride(0), out.stride(0)), {})
    return out


def _int8_gemm(x, x_packed: bool, w_packed, k, backend, config):
    n, kw = _check_packed_weight(w_packed, k, ternary=False)
    _check_same_device(("x", x), ("w_packed", w_packed))
    backend = resolve_backend(backend, x.device)
    if backend == "torch":
        return reference.xnor_gemm_ref(x, w_packed, k) if x_packed else reference.w1a8_gemm_ref(x, w_packed, k)
    m = x.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=x.device)
    if m and n:
        _launch("binary_int8_gemm_kernel", "int8", backend, config, m, n,
                (x, w_packed, out, m, n, k, kw, x.stride(0), w_packed.stride(0), out.stride(0)),
                {"X_PACKED": x_packed})
    return out


def w1a1_int8_gemm(x_packed: torch.Tensor, w_packed: torch.Tensor, k: int, *, backend: str = "auto",
                   config: BlockConfig | None = None) -> torch.Tensor:
    """W1A1 on int8 tensor cores: both operands unpacked to ±1 int8, exact int32 ``[M, N]``."""
    _, kw = _check_packed_weight(w_packed, k, ternary=False)
    _check_packed_x(x_packed, k, kw)
    return _int8_gemm(x_packed, True, w_packed, k, backend, config)


def w1a8_gemm(x: torch.Tensor, w_packed: torch.Tensor, k: int, *, backend: str = "auto",
              config: BlockConfig | None = None) -> torch.Tensor:
    """W1A8: int8 ``x[M, K]`` times packed ±1 weights, exact int32 ``[M, N]``."""
    _check(x, "x", (torch.int8,), 2)
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} columns but k={k}")
    _check_rows(x, "x")
    return _int8_gemm(x, False, w_packed, k, backend, config)


def _fp_gemm(x, w_packed, k, scale, bias, ternary, backend, config):
    _check(x, "x", FLOAT_DTYPES, 2)
    n, kw = _check_packed_weight(w_packed, k, ternary)
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} columns but k={k}")
    _check_rows(x, "x")
    _check_channel_vector(scale, "scale", n)
    if scale is None:
        raise ValueError("scale is required (use torch.ones(N) for an unscaled weight)")
    _check_channel_vector(bias, "bias", n)
    _check_same_device(("x", x), ("w_packed", w_packed), ("scale", scale), ("bias", bias))
    backend = resolve_backend(backend, x.device)
    ref = reference.w2a16_gemm_ref if ternary else reference.w1a16_gemm_ref
    if backend == "torch":
        return ref(x, w_packed, k, scale, bias)
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        scale32 = scale.to(torch.float32).contiguous()
        bias32 = bias.to(torch.float32).contiguous() if bias is not None else scale32
        dot_fp32 = x.dtype == torch.float32 or (backend == "interpret" and x.dtype == torch.bfloat16)
        stride_wn = w_packed.stride(0)
        _launch("packed_fp_gemm_kernel", "fp", backend, config, m, n,
                (x, w_packed, scale32, bias32, out, m, n, k, kw, x.stride(0), stride_wn, out.stride(0)),
                {"TERNARY": ternary, "HAS_BIAS": bias is not None, "DOT_FP32": dot_fp32})
    return out


def w1a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, k: int, scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, backend: str = "auto",
               config: BlockConfig | None = None) -> torch.Tensor:
    """W1A16: ``out = (x @ w^T) * scale[n] + bias[n]`` with w in {-1,+1}; out has x's dtype.

    Args:
        x: fp16 / bf16 / fp32 ``[M, K]``.
        w_packed: int32 ``[N, ceil(K/32)]``.
        scale, bias: per-output-channel ``[N]`` (bias optional).
    """
    return _fp_gemm(x, w_packed, k, scale, bias, False, backend, config)


def w2a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, k: int, scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, backend: str = "auto",
               config: BlockConfig | None = None) -> torch.Tensor:
    """Ternary W2A16: like :func:`w1a16_gemm` with w in {-1,0,+1} packed as ``[N, 2, KW]``."""
    return _fp_gemm(x, w_packed, k, scale, bias, True, backend, config)
