"""Exact-size page-locked host memory for the expert store.

torch's pinned allocator rounds every allocation up to a power of two, so one Mixtral-8x7B layer of experts
(2.82 GB in bf16) takes 4 GiB of locked RAM, and the whole model 128 GiB instead of 90: more than a 128 GiB host
can lock. Large buffers are therefore allocated as ordinary (pageable) tensors and registered with the CUDA
driver (``cudaHostRegister``), which locks exactly their pages. The owner unregisters them before it lets them
go (`unregister`); a buffer the driver refuses to register falls back to torch's allocator.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Sequence

import torch

from prophet.errors import CapacityError

EXACT_MIN_BYTES = 64 << 20  # below this the rounding wastes little; torch's cached allocator is faster to reuse


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``(tensor, registered)``: uninitialised page-locked host memory of exactly ``shape``; ``registered`` says
    the caller must `unregister` the tensor before dropping it."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= EXACT_MIN_BYTES:
        t = torch.empty(tuple(shape), dtype=dtype)  # pageable; its pages are first touched by the registration
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0))  # 0: cudaHostRegisterDefault
        if err == 0:
            return t, True
        del t  # do not hold the pageable copy while torch's allocator makes the pinned one
        _clear_cuda_error(err)
        warnings.warn(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed (cudaError {err}); using torch's pinned "
                      "allocator, which rounds the size up to a power of two", RuntimeWarning, stacklevel=2)
    try:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True), False
    except RuntimeError as exc:
        raise CapacityError(
            f"cannot lock {nbytes / 2**30:.2f} GiB of host memory for experts ({exc}); free host RAM, raise the "
            "locked-memory limit (ulimit -l), or pass config=ProphetConfig(pin_memory=False)"
        ) from exc


def unregister(t: torch.Tensor) -> None:
    """Unlock a tensor that `pinned_empty` registered (its memory stays valid, now pageable)."""
    err = int(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))
    if err != 0:
        _clear_cuda_error(err)
        warnings.warn(f"cudaHostUnregister failed (cudaError {err})", RuntimeWarning, stacklevel=2)


def _clear_cuda_error(err: int) -> None:
    """Reset the CUDA runtime's last error after a failed call, or torch would report it at an unrelated kernel.

    torch's bindings do not expose ``cudaGetLastError``; the process's own libcudart does (found in its maps).
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line and not line.rstrip().endswith("(deleted)")}
    except OSError:
        paths = set()
    cleared = False
    for path in sorted(paths):  # every runtime loaded: which one torch uses is not known here
        try:
            ctypes.CDLL(path).cudaGetLastError()
            cleared = True
        except (OSError, AttributeError):
            continue
    if cleared:
        return
    raise CapacityError(f"a CUDA host-memory call failed (cudaError {err}) and the error could not be cleared; "
                        "pass config=ProphetConfig(pin_memory=False) to keep experts in pageable memory")
