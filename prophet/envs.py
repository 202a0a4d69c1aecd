"""The one place Prophet reads environment variables.

Every other module asks this one, so the variables a user can set are listed here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET")


def kernel_backend() -> str:
    """``PROPHET_KERNELS``: ``auto`` (Triton on CUDA, reference elsewhere), ``triton`` or ``reference``."""
    value = os.environ.get("PROPHET_KERNELS", "auto").strip().lower()
    if value not in ("auto", "triton", "reference"):
        from prophet.errors import ConfigError

        raise ConfigError(f"PROPHET_KERNELS={value!r}: use one of auto, triton, reference")
    return value


def kernel_config_dir() -> str | None:
    """``PROPHET_KERNEL_CONFIGS``: an extra folder of tuned kernel launch settings (JSON)."""
    return os.environ.get("PROPHET_KERNEL_CONFIGS") or None


def shared_traces_dir() -> Path:
    """``PROPHET_SHARED_TRACES``, else ``shared/traces`` beside the checkout: the real router traces that tests
    and experiments read (never copied into the repository)."""
    value = os.environ.get("PROPHET_SHARED_TRACES")
    return Path(value) if value else Path(__file__).resolve().parents[2] / "shared" / "traces"


def host_threads() -> int | None:
    """``PROPHET_HOST_THREADS``: CPU threads computing missed experts on the host (default: detected)."""
    value = os.environ.get("PROPHET_HOST_THREADS")
    if not value:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        from prophet.errors import ConfigError

        raise ConfigError(f"PROPHET_HOST_THREADS={value!r}: use a positive integer")
    return int(value)


def native_kernels() -> bool:
    """``PROPHET_NATIVE``: compile and use Prophet's small C kernels (`prophet.native`; default on). ``0``
    keeps every numpy path, e.g. to compare against them."""
    return _flag("PROPHET_NATIVE", default=True)


def cache_dir() -> Path:
    """``PROPHET_CACHE_DIR``, else ``~/.cache/prophet``: where the host kernels are compiled to."""
    value = os.environ.get("PROPHET_CACHE_DIR")
    return Path(value) if value else Path.home() / ".cache" / "prophet"
