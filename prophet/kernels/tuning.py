"""Launch settings of the MoE kernels: data files keyed by shape, dtype, device and Triton version.

A file ``configs/moe_H{H}_I{I}_{dtype}_{device}_triton-{version}.json`` (written by
``experiments/gpu/tune_grouped_gemm.py``) maps a bucket of T*k (token, expert) pairs to one `MoEConfig`;
a call takes the smallest bucket at or above its own pair count. ``PROPHET_KERNEL_CONFIGS`` names an extra folder that
is searched first. A file tuned under another Triton version still applies (the closest version, logged); without
any file for the shape the heuristic `default_config` is used and a warning says so, once per shape.
No Triton is needed here.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prophet.envs import kernel_config_dir
from prophet.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FORMAT_VERSION = 1
PATHS = ("decode", "prefill")
# The decode path holds every pair of the batch in one tile of BLOCK_M rows: past 64 its operand tiles
# outgrow a Hopper SM's shared memory at bandwidth-friendly BLOCK_K, and the prefill path wins anyway.
DECODE_MAX_PAIRS = 64


@dataclass(frozen=True)
class GemmConfig:
    """Tile and pipelining of one GEMM kernel."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ConfigError(f"{name}={value}: use a power of two >= 16 (tl.dot needs it)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ConfigError(f"num_warps={self.num_warps}: use 1, 2, 4, 8 or 16")
        if self.num_stages < 1:
            raise ConfigError(f"num_stages={self.num_stages}: use 1 or more")


@dataclass(frozen=True)
class MoEConfig:
    """Launch settings of one `moe_experts_triton` call.

    ``path`` "decode" skips the align step and needs T*k <= DECODE_MAX_PAIRS (larger batches take the
    prefill path with this config's GEMM tiles); ``block_m`` is the prefill group block (rows per program).
    ``split_k`` splits the down GEMM's reduction over programs, for parallelism when few slots are active.
    """

    path: str
    gate_up: GemmConfig
    down: GemmConfig
    block_m: int = 64
    split_k: int = 1

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ConfigError(f"path={self.path!r}: use one of {', '.join(PATHS)}")
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ConfigError(f"block_m={self.block_m}: use a power of two >= 16")
        if self.split_k < 1:
            raise ConfigError(f"split_k={self.split_k}: use 1 or more")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return cls(
            path=data["path"],
            gate_up=GemmConfig(**data["gate_up"]),
            down=GemmConfig(**data["down"]),
            block_m=data.get("block_m", 64),
            split_k=data.get("split_k", 1),
        )


def default_config(num_pairs: int) -> MoEConfig:
    """Heuristic settings, modest in shared memory (< 100 KB) so they launch on any recent NVIDIA GPU."""
    if num_pairs <= 32:
        gemm = GemmConfig(block_n=64, block_k=64, num_warps=4, num_stages=4)
        return MoEConfig(path="decode", gate_up=gemm, down=gemm)
    gemm = GemmConfig(block_n=64, block_k=64, num_warps=4, num_stages=3)
    return MoEConfig(path="prefill", gate_up=gemm, down=gemm, block_m=16 if num_pairs <= 256 else 64)


@functools.cache
def device_name(device: torch.device) -> str:
    """File-name-safe device name: the CUDA device's name ("NVIDIA_H100_80GB_HBM3"), else the device type."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def triton_version() -> str:
    import triton

    return triton.__version__


def config_file_name(hidden_size: int, intermediate_size: int, dtype: torch.dtype, device: str, version: str) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"moe_H{hidden_size}_I{intermediate_size}_{dtype_name}_{device}_triton-{version}.json"


def _version_key(version: str) -> tuple[int, ...]:
    """``"3.6.0"`` -> ``(3, 6, 0)``; local or pre-release suffixes ("3.7.0+git1a2b") are ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _closest_version(available: list[str], version: str) -> str:
    """The tuned Triton version to use under ``version``: itself, else the newest older one (settings rarely
    regress across releases), else the oldest newer one."""
    if version in available:
        return version
    want = _version_key(version)
    older = [v for v in available if _version_key(v) <= want]
    if older:
        return max(older, key=_version_key)
    return min(available, key=_version_key)


@functools.cache
def load_configs(
    hidden_size: int, intermediate_size: int, dtype: torch.dtype, device: str, version: str
) -> dict[int, MoEConfig]:
    """The tuned table {pairs bucket: config} for this shape, dtype and device, or {} (warned once) when no file
    has it. Files tuned under another Triton version still apply: the closest version wins (`_closest_version`)
    and the substitution is logged."""
    pattern = config_file_name(hidden_size, intermediate_size, dtype, device, "*")
    extra = kernel_config_dir()
    folders = ([Path(extra)] if extra else []) + [CONFIG_DIR]
    for folder in folders:
        found = {path.name.removesuffix(".json").rsplit("_triton-", 1)[1]: path for path in folder.glob(pattern)}
        if not found:
            continue
        chosen = _closest_version(list(found), version)
        path = found[chosen]
        if chosen != version:
            logger.info("tuned MoE launch settings %s were tuned under Triton %s; using them under %s",
                        path.name, chosen, version)
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{path}: format_version={data.get('format_version')!r}, expected {FORMAT_VERSION}; "
                "re-run experiments/gpu/tune_grouped_gemm.py to regenerate it"
            )
        return {int(bucket): MoEConfig.from_dict(cfg) for bucket, cfg in data["configs"].items()}
    logger.warning(
        "no tuned MoE launch settings for H=%d I=%d %s on %s (any Triton version) in %s; using the default: 64x64 "
        "tiles, decode path up to 32 pairs, else prefill with 16-row (<= 256 pairs) or 64-row groups. Tune this "
        "shape with experiments/gpu/tune_grouped_gemm.py",
        hidden_size, intermediate_size, str(dtype).removeprefix("torch."), device,
        ", ".join(str(f) for f in folders),
    )
    return {}


def get_config(
    hidden_size: int, intermediate_size: int, num_pairs: int, dtype: torch.dtype, device: torch.device
) -> MoEConfig:
    """Settings for one call: the smallest tuned bucket >= ``num_pairs`` (else the largest), else the default.

    Rounding up keeps a decode config within the shared memory it was tuned with: its BLOCK_M is the next
    power of two of the pair count, never larger than at the bucket it was measured at.
    """
    version = triton_version() if device.type == "cuda" else "interpreter"
    table = load_configs(hidden_size, intermediate_size, dtype, device_name(device), version)
    if not table:
        return default_config(num_pairs)
    above = [b for b in table if b >= num_pairs]
    return table[min(above) if above else max(table)]


def write_configs(path: Path, table: dict[int, MoEConfig], meta: dict[str, Any]) -> None:
    """Write a tuned table in the format `load_configs` reads (used by the tuner)."""
    data = {
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "configs": {str(bucket): table[bucket].to_dict() for bucket in sorted(table)},
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
