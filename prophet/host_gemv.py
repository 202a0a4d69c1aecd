"""The host's GEMV kernels (``host_gemv.c``: bf16, int8/int4 group-quantized, fp8 e4m3 and mxfp4 weights), compiled on
first use and called through ctypes.

torch's own bf16 matrix-vector product reaches about 0.55 of the host's read bandwidth on CPUs without native
bf16 instructions, and converting tiles to fp32 first is slower still; the small AVX2 kernel widens bf16 to fp32
in registers and streams weights at the read bandwidth (`experiments/host_experts_bench.py`). ctypes releases
the GIL during the call, so host threads run beside the Python thread that drives the GPU.

`available()` is False (and callers use torch) where there is no C compiler, no AVX2/FMA, or compiling failed;
the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from prophet import native

logger = logging.getLogger(__name__)

_P, _L = ctypes.c_void_p, ctypes.c_long
FLAGS = ("-mavx2", "-mfma", "-mf16c")  # every AVX2 CPU has FMA and F16C; built by `prophet.native`


def _cpu_has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged once) when it cannot be built here; then host experts use
    torch's bf16 matmul, about 0.55 of the read bandwidth."""
    if not _cpu_has_avx2():
        logger.info("host GEMV kernel off: the CPU lacks AVX2/FMA; host experts use torch")
        return None
    lib = native.library("host_gemv", FLAGS)
    if lib is None:
        return None
    lib.prophet_gemv_bf16.argtypes = [_P, _L, _P, _L, _P, _L, _L, _L, _L, _L]
    lib.prophet_gemv_bf16.restype = None
    lib.prophet_widen_bf16.argtypes = [_P, _P, _L]
    lib.prophet_widen_bf16.restype = None
    lib.prophet_gemv_int.argtypes = [_P, _L, _P, _L, _L, ctypes.c_int, _P, _L, _P, _L, _L, _L, _L, _L]
    lib.prophet_gemv_int.restype = ctypes.c_int
    lib.prophet_gemv_fp8.argtypes = [_P, _L, _P, _L, _L, _L, _P, _L, _P, _L, _L, _L, _L, _L]
    lib.prophet_gemv_fp8.restype = None
    lib.prophet_gemv_mxfp4.argtypes = [_P, _L, _P, _L, _P, _L, _P, _L, _L, _L, _L, _L]
    lib.prophet_gemv_mxfp4.restype = ctypes.c_int
    lib.prophet_read_f32.argtypes = [_P, _L]
    lib.prophet_read_f32.restype = ctypes.c_double
    return lib


def available() -> bool:
    return library() is not None


def gemv_rows(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n0: int, n1: int) -> None:
    """``y[:, n0:n1] = x @ w[n0:n1].T`` for bf16 ``w [N, K]`` (rows contiguous), fp32 ``x [B, K]``, fp32
    ``y [B, N]`` (both with contiguous rows). Releases the GIL while it runs."""
    lib = library()
    assert lib is not None, "call available() first"
    lib.prophet_gemv_bf16(w.data_ptr(), w.stride(0), x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                          x.shape[0], w.shape[1], n0, n1)


def gemv_int_rows(values: torch.Tensor, scales: torch.Tensor, group: int, bits: int, x: torch.Tensor,
                  y: torch.Tensor, n0: int, n1: int) -> None:
    """``y[:, n0:n1] = x @ w[n0:n1].T`` for group-quantized ``w [N, K]`` (`prophet.formats` int8/int4: ``values``
    int8 ``[N, K]`` or packed uint8 ``[N, ceil(K/2)]``, fp16 ``scales [N, ceil(K/group)]``, rows contiguous),
    ``w`` as `prophet.formats.dequantize` gives it (fp32, not rounded to a compute dtype); fp32 ``x [B, K]``,
    ``y [B, N]``. Releases the GIL while it runs."""
    lib = library()
    assert lib is not None, "call available() first"
    k = x.shape[1]
    if not lib.prophet_gemv_int(values.data_ptr(), values.stride(0), scales.data_ptr(), scales.stride(0), group,
                                bits, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[0], k, n0, n1):
        raise MemoryError(f"host int{bits} kernel: no memory for {x.shape[0]} tokens of {k} values")


def gemv_fp8_rows(values: torch.Tensor, scales: torch.Tensor, block_rows: int, group: int, x: torch.Tensor,
                  y: torch.Tensor, n0: int, n1: int) -> None:
    """``y[:, n0:n1] = x @ w[n0:n1].T`` for fp8 ``w [N, K]`` (`prophet.formats` fp8: e4m3fn ``values [N, K]``,
    fp32 ``scales`` one per ``block_rows x group`` block, rows contiguous), ``w`` as `prophet.formats.dequantize`
    gives it; fp32 ``x [B, K]``, ``y [B, N]``. Releases the GIL while it runs."""
    lib = library()
    assert lib is not None, "call available() first"
    lib.prophet_gemv_fp8(values.data_ptr(), values.stride(0), scales.data_ptr(), scales.stride(0), block_rows, group,
                         x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[0], x.shape[1], n0, n1)


def gemv_mxfp4_rows(values: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n0: int,
                    n1: int) -> None:
    """``y[:, n0:n1] = x @ w[n0:n1].T`` for mxfp4 ``w [N, K]`` (`prophet.formats` mxfp4: packed e2m1 ``values
    [N, ceil(K/2)]``, uint8 e8m0 ``scales [N, ceil(K/32)]``, rows contiguous), ``w`` as
    `prophet.formats.dequantize` gives it; fp32 ``x [B, K]``, ``y [B, N]``. Releases the GIL while it runs."""
    lib = library()
    assert lib is not None, "call available() first"
    k = x.shape[1]
    if not lib.prophet_gemv_mxfp4(values.data_ptr(), values.stride(0), scales.data_ptr(), scales.stride(0),
                                  x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[0], k, n0, n1):
        raise MemoryError(f"host mxfp4 kernel: no memory for {x.shape[0]} tokens of {k} values")


def widen(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)`` for contiguous bf16 ``src`` and fp32 ``dst`` of the same size (exact), in AVX2."""
    lib = library()
    assert lib is not None, "call available() first"
    lib.prophet_widen_bf16(src.data_ptr(), dst.data_ptr(), src.numel())


def read_f32(t: torch.Tensor) -> float:
    """Sum of a contiguous fp32 tensor by the kernel's streaming reader (a read-bandwidth probe)."""
    lib = library()
    assert lib is not None, "call available() first"
    return lib.prophet_read_f32(t.data_ptr(), t.numel())
