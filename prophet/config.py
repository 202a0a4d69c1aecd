"""Frozen, validated configuration dataclasses with a JSON round trip.

Each component gets one config class; values are checked in ``__post_init__`` so a bad value fails where it
is written, with a message that names the field and what to use instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prophet.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")

POLICIES = ("lru", "lfu", "prophet", "belady", "fifo")
# What a step does with an expert that is not resident: decide by cost (`prophet.hybrid.decide`), always copy it
# to the device, or always compute it on the host CPU from the host store (`prophet.host_experts`).
ON_MISS = ("auto", "copy", "host")


class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``to_json``/``from_json`` for frozen dataclasses of plain values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class CacheConfig(JsonConfig):
    """How many device slots the expert cache has and how it evicts.

    Exactly one of ``cache_slots`` (one pool shared by all MoE layers), ``slots_per_layer`` (one pool per
    layer) or ``cache_bytes`` (a shared pool sized from a byte budget) may be set; none means every expert
    gets a slot (nothing is ever evicted).
    """

    cache_slots: int | None = None
    slots_per_layer: int | None = None
    cache_bytes: int | None = None
    policy: str = "lru"

    def __post_init__(self) -> None:
        given = [n for n in ("cache_slots", "slots_per_layer", "cache_bytes") if getattr(self, n) is not None]
        _check(len(given) <= 1, f"set only one of cache_slots, slots_per_layer, cache_bytes (got {given})")
        for name in given:
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name}={value!r}: must be a positive integer; a cache of zero slots cannot run any expert",
            )
        _check(self.policy in POLICIES, f"policy={self.policy!r}: use one of {', '.join(POLICIES)}")

    @property
    def shared(self) -> bool:
        """True when all layers share one pool of slots."""
        return self.slots_per_layer is None


@dataclass(frozen=True)
class PrefetchConfig(JsonConfig):
    """How aggressively predictions turn into host->device copies."""

    enabled: bool = True
    max_inflight: int = 8  # copies queued on the side stream at once
    min_score: float = 0.0  # predictions scoring below this are dropped
    # Link budget: with both set, a prediction d layer-steps ahead is copied only when its score is at least
    # copy / (copy + d * layer), the break-even of the compute the copy can hide against the link time it
    # wastes when wrong (see `Prefetcher.threshold`).
    copy_ms: float | None = None  # time to copy one expert host->device
    layer_ms: float | None = None  # compute time of one MoE layer step
    # Without fixed costs, measure them while running (`Prefetcher.observe_layer`, the copy engine's timings);
    # until both are known only min_score applies. `prophet.wrap`'s default; the simulator gives fixed costs.
    auto_budget: bool = False

    def __post_init__(self) -> None:
        _check(self.max_inflight >= 1, f"max_inflight={self.max_inflight}: must be at least 1")
        _check(0.0 <= self.min_score <= 1.0, f"min_score={self.min_score}: must lie in [0, 1]")
        for name in ("copy_ms", "layer_ms"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"{name}={value}: must be at least 0 (or None for no link budget)")
        _check((self.copy_ms is None) == (self.layer_ms is None), "give both copy_ms and layer_ms, or neither")


@dataclass(frozen=True)
class ProphetConfig(JsonConfig):
    """Everything `prophet.wrap` needs besides the model."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = field(default_factory=lambda: PrefetchConfig(auto_budget=True))
    kernels: str = "auto"  # auto | triton | reference
    pin_memory: bool = True  # pin the host store when CUDA is present
    on_miss: str = "copy"  # one of ON_MISS; "copy" until the runtime's step computes on the host
    host_threads: int | None = None  # CPU threads for host experts (None: `prophet.host_experts.default_threads`)

    def __post_init__(self) -> None:
        _check(self.kernels in ("auto", "triton", "reference"), f"kernels={self.kernels!r}: use auto, triton or reference")
        _check(self.on_miss in ON_MISS, f"on_miss={self.on_miss!r}: use one of {', '.join(ON_MISS)}")
        _check(
            self.host_threads is None or (isinstance(self.host_threads, int) and self.host_threads >= 1),
            f"host_threads={self.host_threads!r}: give a positive number of CPU threads, or None to detect",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProphetConfig:
        data = dict(data)
        if isinstance(data.get("cache"), dict):
            data["cache"] = CacheConfig.from_dict(data["cache"])
        if isinstance(data.get("prefetch"), dict):
            data["prefetch"] = PrefetchConfig.from_dict(data["prefetch"])
        return super().from_dict(data)  # type: ignore[return-value]
