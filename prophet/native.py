"""Prophet's small C kernels, compiled on first use into ``prophet.envs.cache_dir()`` and called through ctypes.

At batch 1 the host's per-layer bookkeeping is a few dozen tiny array operations, and each numpy call costs
about half a microsecond whatever its size; one C call does them all. ctypes releases the GIL while a kernel
runs. The sources ship with the package (``prophet/<name>.c``); the compiled library's file name carries a hash
of the source and flags, so an edited source is rebuilt and processes sharing the cache never load a stale or
half-written one. Where there is no C compiler, compiling fails, or ``PROPHET_NATIVE=0``, `library` returns
None (the reason logged once) and callers keep their numpy or torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from prophet import envs

logger = logging.getLogger(__name__)

# No fused multiply-adds: the kernels round where the numpy code they replace rounds.
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")


def compile_source(source: str, target: Path, name: str, flags: tuple[str, ...] = ()) -> None:
    """Compile C ``source`` into the shared library ``target``, atomically (written aside, then renamed)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / target.name
        src.write_text(source)
        cmd = [compiler, *BASE_FLAGS, *flags, str(src), "-o", str(out), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent processes never load a half-written library


def library(name: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled ``prophet/<name>.c``, or None when native kernels are off or cannot be built here (the
    reason logged once per library). Callers set the functions' argtypes."""
    if not envs.native_kernels():
        return None
    return _load(name, tuple(flags))


@functools.cache
def _load(name: str, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    source = resources.files("prophet").joinpath(f"{name}.c").read_text()
    digest = hashlib.sha256("\0".join((source, *BASE_FLAGS, *flags)).encode()).hexdigest()[:16]
    target = envs.cache_dir() / f"{name}-{digest}.so"
    try:
        if not target.exists():
            compile_source(source, target, name, flags)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("native kernel %s off (%s); its fallback path runs instead", name, exc)
        return None
