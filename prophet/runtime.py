"""The per-model runtime shared by every `OffloadedExperts` layer: store, cache, prefetcher, predictor, stats."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from prophet.cache import ExpertCache, LayerStats
from prophet.layer import unique_experts
from prophet.models.adapter import ExpertFormat, MoELayer
from prophet.predict.base import Predictor
from prophet.prefetch import Prefetcher
from prophet.store import HostStore

if TYPE_CHECKING:
    from prophet.plan import Plan
    from prophet.sources import ExpertSource


class Runtime:
    """Runs MoE layer steps over the expert cache; one instance per wrapped model."""

    def __init__(
        self,
        layers: list[MoELayer],
        store: HostStore,
        cache: ExpertCache,
        prefetcher: Prefetcher,
        predictor: Predictor | None,
        kernels: str,
        device: torch.device,
    ) -> None:
        self.layers = layers
        self.store = store
        self.cache = cache
        self.prefetcher = prefetcher
        self.predictor = predictor
        self.kernels = kernels
        self.device = device
        self.fmt: ExpertFormat = store.fmt
        self.num_experts = store.num_experts
        self.expert_shapes: list[dict[str, torch.Size]] = []  # original parameter shapes, for unwrap
        self.plan: Plan | None = None  # the memory plan, when wrap was given max_context
        self.source: ExpertSource | None = None  # where already-quantized experts came from (unwrap writes back)
        self.kv_cache: Any = None  # the transformers cache that plan sized, to pass to generate()
        self._last_layer: tuple[int, float, bool] | None = None  # (layer, start time, waited for no copy)
        self._resident: list[torch.Tensor] | None = None  # per layer [E] expert -> slot, when all are resident
        self._resident_hits: torch.Tensor | None = None  # [L] distinct experts used, counted on the device

    def settle(self) -> None:
        """When the cache holds every expert, load them all now and run layers without the host: the slot of
        each expert never changes, so ids map to slots on the device, with no sync, no eviction and no
        prefetch (the predictor is not consulted). Otherwise layers go through the cache step by step."""
        self._resident = self._resident_hits = None
        if not self.cache.holds_everything():
            return
        slots = self.cache.preload()
        self._resident = [torch.tensor(row, dtype=torch.int32, device=self.device) for row in slots]
        self._resident_hits = torch.zeros(len(slots), dtype=torch.int64, device=self.device)

    def run_layer(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """One step of MoE layer ``layer``: ``hidden [T,H]``, ``top_k_index [T,k]``, ``top_k_weights [T,k]`` -> ``[T,H]``."""
        if self._resident is not None:
            return self._run_resident(layer, hidden, top_k_index, top_k_weights)
        ids, has_invalid = unique_experts(top_k_index, self.num_experts)  # syncs: earlier device work is done
        start = time.perf_counter()
        self._time_previous_layer(layer, start, hidden.shape[0])
        waits = self.cache.waits  # before advance: copies it issues fall inside this step's interval
        self.prefetcher.advance(layer)
        if not ids:
            return torch.zeros_like(hidden)
        if has_invalid:
            valid = (top_k_index >= 0) & (top_k_index < self.num_experts)
            top_k_index = torch.where(valid, top_k_index, ids[0])
            top_k_weights = top_k_weights * valid
        capacity = self.cache.capacity(layer)
        if len(ids) <= capacity:
            out = self._step(layer, hidden, top_k_index, top_k_weights, ids)
        else:
            out = self._waves(layer, hidden, top_k_index, top_k_weights, ids, capacity)
        if self.predictor is not None and not _capturing():
            self.predictor.observe(layer, top_k_index, top_k_weights, hidden)
            self.prefetcher.submit(self.predictor.predict(), layer)
        self._last_layer = (layer, start, self.cache.waits == waits)
        return out

    def _time_previous_layer(self, layer: int, now: float, tokens: int) -> None:
        """Feed the prefetcher's link budget the previous layer step's time when it waited for no copy.

        Each layer's dedup syncs with the device, so the host interval between two consecutive layers' syncs is
        one layer step of device time (its experts, the next attention and router)."""
        if self._last_layer is None or _capturing():
            return
        previous, started, clean = self._last_layer
        if clean and layer == previous + 1:
            self.prefetcher.observe_layer(now - started, tokens)

    def _run_resident(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """Every expert resident: remap on the device; ids outside ``[0, E)`` (no expert) get weight 0."""
        E = self.num_experts
        valid = (top_k_index >= 0) & (top_k_index < E)  # [T,k]
        ids = torch.where(valid, top_k_index, E)  # E: a spare bin for "no expert"
        used = torch.zeros(E + 1, dtype=torch.bool, device=ids.device).scatter_(0, ids.flatten(), True)
        self._resident_hits[layer] += used[:E].sum()
        slot_ids = self._resident[layer][ids.clamp(max=E - 1)]  # [T,k]
        return self._experts(layer, hidden, slot_ids, top_k_weights * valid)

    def _lut(self, ids: list[int], slots: list[int], fill: int) -> torch.Tensor:
        """Expert id -> slot id table ``[E]`` on the device (one small host->device copy)."""
        table = [fill] * self.num_experts
        for e, s in zip(ids, slots, strict=True):
            table[e] = s
        return torch.tensor(table, dtype=torch.int32, device=self.device)

    def _experts(self, layer: int, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from prophet.kernels.moe import Quant, moe_experts

        views = self.cache.views(layer)
        wf = self.store.weights  # quantized slots carry their scales: the kernels dequantize from the slot bytes
        quant = Quant(wf, views["w1_scale"], views["w2_scale"]) if wf.quantized else None
        return moe_experts(
            hidden, slot_ids, weights, views["w1"], views["w2"], self.fmt, views.get("b1"), views.get("b2"), quant,
            backend=self.kernels,
        )

    def _step(self, layer: int, hidden, top_k_index, top_k_weights, ids: list[int]) -> torch.Tensor:
        slots = self.cache.acquire(layer, ids)
        slot_ids = self._lut(ids, slots, fill=0)[top_k_index]  # [T,k] remapped on the device
        out = self._experts(layer, hidden, slot_ids, top_k_weights)
        self.cache.release(layer, slots)
        return out

    def _waves(self, layer: int, hidden, top_k_index, top_k_weights, ids: list[int], capacity: int) -> torch.Tensor:
        """Experts in groups of ``capacity``: each wave computes only the (token, k) pairs of its experts."""
        out = torch.zeros_like(hidden)
        for start in range(0, len(ids), capacity):
            wave = ids[start : start + capacity]
            slots = self.cache.acquire(layer, wave)
            slot_ids = self._lut(wave, slots, fill=-1)[top_k_index]  # [T,k], -1 outside this wave
            in_wave = slot_ids >= 0
            rows = in_wave.any(dim=1).nonzero().squeeze(1)
            sub_in = in_wave[rows]
            sub_slots = torch.where(sub_in, slot_ids[rows], slots[0])  # pairs of other waves: weight 0 below
            sub_weights = top_k_weights[rows] * sub_in
            out[rows] += self._experts(layer, hidden[rows], sub_slots, sub_weights)  # rows are distinct
            self.cache.release(layer, slots)
            self.cache.stats[layer].waves += 1
        return out

    def stats(self) -> RuntimeStats:
        layers = [LayerStats(**asdict(s)) for s in self.cache.stats]
        if self._resident_hits is not None:
            for s, hits in zip(layers, self._resident_hits.tolist(), strict=True):
                s.hits += hits
        return RuntimeStats(
            layers=layers,
            stall_seconds=self.cache.engine.stall_seconds(),
            slots=self.cache.num_slots,
            slot_bytes=self.store.slab_bytes,
            total_experts=self.store.num_layers * self.store.num_experts,
        )


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class RuntimeStats:
    """What `prophet.stats(model)` returns: per-layer counters, their total, and the stall time."""

    layers: list[LayerStats]
    stall_seconds: float
    slots: int
    slot_bytes: int
    total_experts: int

    @property
    def total(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers:
            total.add(s)
        return total

    @property
    def hit_rate(self) -> float:
        return self.total.hit_rate

    def to_dict(self) -> dict:
        total = self.total
        return {
            "total": {**asdict(total), "hit_rate": total.hit_rate},
            "layers": [{**asdict(s), "hit_rate": s.hit_rate} for s in self.layers],
            "stall_seconds": self.stall_seconds,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "total_experts": self.total_experts,
        }

    def table(self) -> str:
        """A fixed-width table, one row per MoE layer and a total row."""
        head = f"{'layer':>5} {'hits':>8} {'misses':>8} {'hit rate':>8} {'pf hits':>8} {'pf wasted':>9} {'MB h2d':>9}"
        rows = [head]
        for i, s in enumerate([*self.layers, self.total]):
            name = "all" if i == len(self.layers) else str(i)
            rows.append(
                f"{name:>5} {s.hits:>8} {s.misses:>8} {s.hit_rate:>8.3f} {s.prefetch_hits:>8} "
                f"{s.wasted_prefetches:>9} {s.bytes_h2d / 1e6:>9.1f}"
            )
        rows.append(
            f"slots {self.slots} of {self.total_experts} experts ({self.slots * self.slot_bytes / 2**30:.2f} GiB); "
            f"stall {self.stall_seconds * 1e3:.1f} ms"
        )
        return "\n".join(rows)
