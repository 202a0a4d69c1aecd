"""Hardware profiles: the numbers the planner and the simulator's cost model need, kept as data and replaceable
by measurements.

Built-in profiles live in ``hardware_profiles.json`` beside this module (datasheet values for the GPU, practical
pinned host->device numbers for the link; each profile says which is which in ``notes``). A calibration file written
on a real GPU overrides what it measured: `HardwareProfile.calibrated` reads either Prophet's calibration format
(``{"profile": NAME, "h2d_gb_s": ..., ...}``, any subset of the fields) or the raw outputs of
``experiments/gpu/offload_check.py`` (pinned copy timings, fitted as fixed cost + bytes / bandwidth) and
``experiments/gpu/bench_grouped_gemm.py`` (measured HBM copy bandwidth).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from prophet.errors import ConfigError

# GPU name fragments (as torch.cuda.get_device_name reports them) -> built-in profile, for raw measurement files.
_GPU_NAMES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb"), ("4090", "rtx-4090"), ("L4", "l4"))


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU and its host. Rates are per second; ``flops`` is dense bf16 tensor throughput."""

    name: str
    hbm_bytes: float  # device memory
    hbm_gb_s: float  # device memory bandwidth, GB/s (1e9)
    flops: float  # dense bf16 FLOP/s
    h2d_gb_s: float  # pinned host->device bandwidth of one large copy, GB/s
    copy_fixed_us: float  # fixed cost of one host->device copy, microseconds
    host_gb_s: float  # host DRAM bandwidth, for CPU execution of missed experts
    cpu_flops: float  # host CPU FLOP/s, for CPU execution of missed experts
    pcie: str = ""
    notes: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        for f in ("hbm_bytes", "hbm_gb_s", "flops", "h2d_gb_s", "host_gb_s", "cpu_flops"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"hardware profile {self.name}: {f}={getattr(self, f)} must be positive")
        if self.copy_fixed_us < 0:
            raise ConfigError(f"hardware profile {self.name}: copy_fixed_us must be >= 0")

    def copy_seconds(self, nbytes: float) -> float:
        """Link time of one host->device copy of ``nbytes``: fixed cost + bytes / bandwidth."""
        return self.copy_fixed_us * 1e-6 + nbytes / (self.h2d_gb_s * 1e9)

    def replace(self, **changes: Any) -> HardwareProfile:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def calibrated(cls, path: str | os.PathLike[str], base: HardwareProfile | str | None = None) -> HardwareProfile:
        """``base`` (or the profile the file names, or the one matching its GPU name) with measured values.

        Accepted files: Prophet's calibration format, any subset of this class's fields plus ``profile``;
        an offload-check result (``copy.rows`` of pinned copy timings: least-squares fit of
        ``ms = fixed + MB / bandwidth``); a grouped-GEMM benchmark result (``hbm_copy_GBps``); a host-experts
        benchmark result (``read_gb_s``: the host's measured read bandwidth replaces ``host_gb_s``; it names no
        GPU, so pass ``base=``).
        """
        data = json.loads(Path(path).read_text())
        if base is None:
            base = data.get("profile") or _profile_for_gpu(str(data.get("gpu") or data.get("device") or ""), path)
        profile = get_profile(base) if isinstance(base, str) else base
        changes: dict[str, Any] = {k: data[k] for k in _FIELDS if k in data and k != "name"}
        measured = []
        rows = [r for r in data.get("copy", {}).get("rows", []) if r.get("pinned")]
        if len(rows) >= 2:
            fixed_s, gb_s = fit_copy_cost([r["mb"] * 1e6 for r in rows], [r["ms"] * 1e-3 for r in rows])
            changes.update(h2d_gb_s=round(gb_s, 2), copy_fixed_us=round(fixed_s * 1e6, 2))
            measured.append("h2d_gb_s, copy_fixed_us")
        if "hbm_copy_GBps" in data:
            changes["hbm_gb_s"] = round(float(data["hbm_copy_GBps"]), 1)
            measured.append("hbm_gb_s (copy)")
        if "read_gb_s" in data:  # experiments/host_experts_bench.py: the host's read bandwidth per thread count
            reads = [r["median"] for per_threads in data["read_gb_s"].values() for r in per_threads.values()]
            changes["host_gb_s"] = round(max(reads), 2)
            measured.append("host_gb_s (read)")
        if not changes:
            raise ConfigError(
                f"{path}: no calibration values found; expected profile fields, copy.rows, hbm_copy_GBps or read_gb_s"
            )
        what = ", ".join(measured) or ", ".join(sorted(changes))
        notes = f"{profile.notes}; calibrated from {Path(path).name}: {what}"
        return profile.replace(**changes, name=f"{profile.name}+cal", notes=notes)


_FIELDS = tuple(f.name for f in dataclasses.fields(HardwareProfile))


def fit_copy_cost(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + nbytes / bandwidth`` in relative error; returns ``(fixed seconds, GB/s)``.

    Relative error, because in absolute error the largest copy alone decides the fit and the fixed cost,
    which only small copies show, comes out as noise.
    """
    t = np.asarray(seconds, float)
    a = np.stack([np.ones(len(nbytes)), np.asarray(nbytes, float)], axis=1) / t[:, None]  # [n, 2]
    fixed, per_byte = np.linalg.lstsq(a, np.ones_like(t), rcond=None)[0]
    if per_byte <= 0:
        raise ConfigError("copy timings do not grow with size; cannot fit a bandwidth")
    return max(float(fixed), 0.0), float(1.0 / per_byte / 1e9)


def _profile_for_gpu(gpu: str, path: str | os.PathLike[str]) -> str:
    for fragment, name in _GPU_NAMES:
        if fragment in gpu:
            return name
    raise ConfigError(f"{path}: cannot tell which profile GPU {gpu!r} is; pass base= or add \"profile\" to the file")


@cache
def _profiles() -> dict[str, HardwareProfile]:
    raw = json.loads(resources.files("prophet").joinpath("hardware_profiles.json").read_text())
    return {name: HardwareProfile(name=name, **v) for name, v in raw.items() if not name.startswith("_")}


def list_profiles() -> tuple[str, ...]:
    return tuple(_profiles())


def get_profile(name: str | HardwareProfile) -> HardwareProfile:
    """A built-in profile by name (``h100-sxm``, ``h200``, ``a100-80gb``, ``rtx-4090``, ``l4``), or a calibration
    file's path (see `HardwareProfile.calibrated`)."""
    if isinstance(name, HardwareProfile):
        return name
    profiles = _profiles()
    key = name.lower().replace("_", "-")
    if key in profiles:
        return profiles[key]
    if key in ("h100", "h100-80gb"):
        return profiles["h100-sxm"]
    if name.endswith(".json") and Path(name).exists():
        return HardwareProfile.calibrated(name)
    raise ConfigError(f"unknown GPU profile {name!r}: use one of {', '.join(profiles)} or a calibration JSON path")
