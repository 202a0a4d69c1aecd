"""The per-model runtime shared by every `OffloadedExperts` layer: store, cache, prefetcher, predictor, stats.

It runs `prophet.step.Step` with real copies: the step's ids reach the host once per MoE layer (one
non_blocking copy into a pinned buffer, the only host sync), dedup and the predictor read that copy, and the
expert -> slot table is written into pinned staging and copied to the device without a sync. When every expert
is resident nothing reaches the host at all. Calls are serialized by a lock, so threads sharing one wrapped
model each get right answers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prophet.cache import ExpertCache, LayerStats
from prophet.host_experts import HostExperts, jobs_for
from prophet.hybrid import MissPlanner, RunningCosts, seed_costs
from prophet.kernels.moe import Quant, moe_experts_reference, moe_experts_triton, resolve_backend
from prophet.models.adapter import ExpertFormat, MoELayer
from prophet.predict.base import Predictor
from prophet.prefetch import Prefetcher
from prophet.step import Step, unique_experts
from prophet.store import HostStore

if TYPE_CHECKING:
    from prophet.plan import Plan
    from prophet.sources import ExpertSource


class HostIds:
    """The pinned host buffer a step's expert ids land in: one non_blocking copy and one event wait, the
    step's only host sync. The array it returns is reused by the next step: read it, never keep it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._buf: torch.Tensor | None = None  # [n] int64, pinned
        self._event = torch.cuda.Event() if self.cuda else None

    def fetch(self, ids: torch.Tensor) -> np.ndarray:
        """``ids [T,k]`` on the host as int64."""
        if not self.cuda:  # the host is the device: a view, no copy
            return ids.numpy() if ids.dtype == torch.int64 and not ids.requires_grad else ids.detach().long().numpy()
        n = ids.numel()
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
        view = self._buf[:n].view(ids.shape)
        view.copy_(ids, non_blocking=True)
        self._event.record()
        self._event.synchronize()
        return view.numpy()


class SlotTables:
    """Expert id -> slot id tables ``[E]`` on the device, one row per wave (at most E waves), written on the host
    into pinned staging and copied without a sync. A row is rewritten only after the next step's id copy has
    synchronized the stream, so its previous copy is done by then. Entries of experts a step does not use keep
    older slot ids, which are valid slots too: a step reads only its own experts' entries."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        staging = torch.zeros((num_experts, num_experts), dtype=torch.int32, pin_memory=self.cuda)  # [W, E]
        self._host = staging.numpy()
        self._staging = staging.unbind(0)  # row views, so a step indexes a list, not a tensor
        self._device = torch.zeros_like(staging, device=device).unbind(0) if self.cuda else self._staging

    def remap(self, rows: np.ndarray, experts: list[int], slots: list[int], ids: torch.Tensor,
              invalid: bool) -> torch.Tensor:
        """Slot ids ``[T,k]`` of ``ids [T,k]`` (``rows``: the same ids on the host; ``invalid``: some lie outside
        ``[0, E)``; their weight is 0, any valid slot does) when every expert of the step has a slot. A CPU device
        indexes the host table directly."""
        host = self._host[0]
        host[experts] = slots
        if self.cuda:
            table = self._device[0]
            table.copy_(self._staging[0], non_blocking=True)
            return table[ids]
        return torch.from_numpy(host[np.clip(rows, 0, len(host) - 1) if invalid else rows])

    def table(self, row: int, experts: list[int], slots: list[int], fill: int) -> torch.Tensor:
        """Row ``row`` of the tables on the device: ``experts`` -> ``slots``, every other expert -> ``fill``."""
        host = self._host[row]
        host.fill(fill)
        host[experts] = slots
        out = self._device[row]
        if self.cuda:
            out.copy_(self._staging[row], non_blocking=True)
        return out


class HostWork:
    """One layer step's host experts (`prophet.step.HostPath`): submitted to `HostExperts` before the device
    experts are issued, joined after them; the runtime adds their output to the device experts' in fp32."""

    def __init__(self, runtime: Runtime, layer: int, hidden: torch.Tensor, index: torch.Tensor,
                 weights: torch.Tensor) -> None:
        self.runtime, self.layer = runtime, layer
        self.hidden, self.index, self.weights = hidden, index, weights  # [T,H], [T,k], [T,k]
        self.experts: list[int] = []
        self.mask: torch.Tensor | None = None  # [T,k] 1 for pairs the device computes, 0 for host pairs
        self.result: torch.Tensor | None = None  # the host experts' output [T,H] fp32 on the device, once joined
        self._future: Any = None

    def submit(self, experts: list[int], tokens: dict[int, int]) -> None:
        self.experts = experts
        host_experts = self.runtime.host_experts()
        jobs = jobs_for(self.index, self.weights, experts)
        self._future = host_experts.submit(self.layer, self.hidden.detach().cpu(), jobs)
        chosen = torch.tensor(experts, dtype=self.index.dtype, device=self.index.device)
        self.mask = ~torch.isin(self.index, chosen)

    def device_weights(self) -> torch.Tensor:
        """Router weights ``[T,k]`` with the host pairs' zeroed."""
        return self.weights if self.mask is None else self.weights * self.mask

    def join(self) -> None:
        start = time.perf_counter()
        result = self._future.result()
        waited = time.perf_counter() - start
        self.result = result.out.to(self.hidden.device)  # [T,H] fp32
        stats = self.runtime.cache.stats[self.layer]
        stats.host_ms += sum(s for _, s in result.timings) * 1e3
        stats.host_wait_ms += waited * 1e3
        self.runtime.observe_costs(result.timings)


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
        on_miss: str = "copy",
        host_threads: int | None = None,
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
        self._lock = threading.Lock()
        self._ids = HostIds(device)
        self._tables = SlotTables(self.num_experts, device)
        self._kernel = moe_experts_reference
        self.sequence_hook: Any = None  # the model's forward pre-hook that calls begin_sequence (set by wrap)
        self.on_miss = on_miss
        self.host_threads = host_threads
        self._host: HostExperts | None = None  # started on the first host expert
        self.costs = RunningCosts(seed_costs(store.slab_bytes, store.fmt.params))
        self._misses: MissPlanner | None = None
        self.set_on_miss(on_miss)
        self.warm: list[tuple[int, int]] = []  # experts filling free slots where a sequence starts (`prophet.warm`)
        self._step = Step(cache, prefetcher, predictor, self._misses)

    def settle(self) -> None:
        """Bind the step to the current cache, prefetcher and predictor (`wrap` and `reconfigure` call this).

        When the cache holds every expert, load them all now and run layers without the host: the slot of
        each expert never changes, so ids map to slots on the device, with no sync, no eviction and no
        prefetch (the predictor is not consulted). Otherwise layers go through the cache step by step."""
        self._step = Step(self.cache, self.prefetcher, self.predictor, self._misses, self.warm)
        triton = resolve_backend(self.kernels, self.device) == "triton"
        self._kernel = moe_experts_triton if triton else moe_experts_reference
        self._last_layer = None
        self._resident = self._resident_hits = None
        if not self.cache.holds_everything():
            return
        slots = self.cache.preload()
        self._resident = [torch.tensor(row, dtype=torch.int32, device=self.device) for row in slots]
        self._resident_hits = torch.zeros(len(slots), dtype=torch.int64, device=self.device)

    def drop_cache(self) -> None:
        """Let go of the cache and everything that holds it (its slot pool's memory can be freed); `settle` after
        giving the runtime a new one."""
        self.cache = self.prefetcher = None
        self._step = None
        self._resident = self._resident_hits = None

    def begin_sequence(self) -> None:
        """A new sequence starts (a forward without past keys and values): predictors reset, queued
        next-token prefetches dropped. Cached experts stay, as a serving process's would."""
        with self._lock:
            self._step.begin_sequence()
            self._last_layer = None

    def run_layer(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """One step of MoE layer ``layer``: ``hidden [T,H]``, ``top_k_index [T,k]``, ``top_k_weights [T,k]`` -> ``[T,H]``."""
        with self._lock:
            if self._resident is not None:
                return self._run_resident(layer, hidden, top_k_index, top_k_weights)
            return self._run_cached(layer, hidden, top_k_index, top_k_weights)

    def _run_cached(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
        rows = self._ids.fetch(top_k_index)  # [T,k] on the host: the step's one sync
        ids, has_invalid = unique_experts(rows, self.num_experts)
        start = time.perf_counter()
        capturing = self._ids.cuda and _capturing()
        if not capturing:
            self._time_previous_layer(layer, start, hidden.shape[0])
        waits = self.cache.waits  # before the step: copies it issues fall inside this step's interval
        if has_invalid:
            valid = (top_k_index >= 0) & (top_k_index < self.num_experts)
            top_k_index = torch.where(valid, top_k_index, ids[0] if ids else 0)
            top_k_weights = top_k_weights * valid
        # a CUDA graph being captured cannot wait for the host: its steps copy every miss
        hybrid = self._misses is not None and not capturing
        work = HostWork(self, layer, hidden, top_k_index, top_k_weights) if hybrid else None

        def compute(wave: Any, slots: list[int], index: int) -> None:
            weights = top_k_weights if work is None else work.device_weights()  # host pairs weigh 0
            device = len(ids) - (len(work.experts) if work is not None else 0)
            if index == 0 and len(wave) == device:  # one wave holds every device expert
                slot_ids = self._tables.remap(rows, list(wave), slots, top_k_index, has_invalid)  # [T,k] slot ids on the device
                add(self._experts(layer, hidden, slot_ids, weights))
                return
            slot_ids = self._tables.table(index, list(wave), slots, fill=-1)[top_k_index]  # -1: other waves
            in_wave = slot_ids >= 0  # [T,k]; pairs of other waves get weight 0 (no host sync to pick rows)
            add(self._experts(layer, hidden, torch.where(in_wave, slot_ids, slots[0]), weights * in_wave))

        outs: list[torch.Tensor] = []  # [T,H] per wave
        add = outs.append
        self._step.run(layer, ids, compute, rows, top_k_weights, hidden, observe=not capturing, host=work)
        out = outs[0] if len(outs) == 1 else sum(outs, torch.zeros_like(hidden))
        if work is not None and work.result is not None:
            out = (out.float() + work.result).to(hidden.dtype)  # host experts' output, added in fp32
        self._last_layer = (layer, start, self.cache.waits == waits)
        return out

    def set_on_miss(self, on_miss: str) -> None:
        """Where missed experts run from the next `settle` on ("copy", "auto", "host")."""
        self.on_miss = on_miss
        self._misses = MissPlanner(on_miss, self.costs) if on_miss != "copy" else None

    def host_experts(self) -> HostExperts:
        """The host expert threads, started on first use."""
        if self._host is None:
            self._host = HostExperts(self.store, self.host_threads)
        return self._host

    def observe_costs(self, timings: list[tuple[int, float]]) -> None:
        """Feed measured host expert times and the link's mean copy time to the costs the next decisions weigh."""
        for tokens, seconds in timings:
            self.costs.observe_host(tokens, seconds)
        copy_ms = self.cache.engine.mean_copy_ms()
        if copy_ms is not None:
            self.costs.observe_copy(copy_ms / 1e3)

    def close(self) -> None:
        """Stop the host expert threads (unwrap calls this)."""
        if self._host is not None:
            self._host.close()
            self._host = None

    def _time_previous_layer(self, layer: int, now: float, tokens: int) -> None:
        """Feed the prefetcher's link budget the previous layer step's time when it waited for no copy.

        Each layer's id copy syncs with the device, so the host interval between two consecutive layers' syncs
        is one layer step of device time (its experts, the next attention and router)."""
        if self._last_layer is None:
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

    def _experts(self, layer: int, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        views = self.cache.views(layer)
        wf = self.store.weights  # quantized slots carry their scales: the kernels dequantize from the slot bytes
        quant = Quant(wf, views["w1_scale"], views["w2_scale"]) if wf.quantized else None
        return self._kernel(hidden, slot_ids, weights, views["w1"], views["w2"], self.fmt, views.get("b1"),
                            views.get("b2"), quant)

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
