"""GPU expert cache: fixed pools of device slots, an expert->slot map, eviction, pinning and statistics.

The cache knows nothing of predictors or models. `acquire` dedups a step's experts, loads the misses, pins
every slot the step uses and returns slot ids, so kernels never see expert ids. A pinned slot, or one whose
copy is still in flight, is never chosen for eviction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prophet.errors import CapacityError
from prophet.policies import EvictionPolicy, Key
from prophet.store import HostStore
from prophet.transfer import CopyEngine, Load


@dataclass
class LayerStats:
    """Counters of one MoE layer; all plain numbers so they serialize and sum."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # hits on a slot that a prefetch filled and no step had used yet
    prefetches: int = 0  # prefetch copies issued
    wasted_prefetches: int = 0  # prefetched slots evicted before any step used them
    held_back: int = 0  # predictions for this layer below the prefetch threshold (link budget or min_score)
    evictions: int = 0
    bytes_h2d: int = 0
    waves: int = 0  # extra passes needed because a step wanted more experts than the pool holds
    host_experts: int = 0  # distinct missed experts computed on the host CPU instead of copied (on_miss)
    host_tokens: int = 0  # token-expert pairs those host experts computed
    host_ms: float = 0.0  # wall time of the host experts' work (their future's run), summed over steps
    host_wait_ms: float = 0.0  # time the step waited for host results after its GPU work was queued
    admitted: int = 0  # host experts copied into the cache in the background (on_miss="auto"; also in prefetches)
    warmed: int = 0  # copies into free slots before a sequence decoded (`ExpertCache.warm`; not misses or prefetches)

    def add(self, other: LayerStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def hit_rate(self) -> float:
        """Hits over hits + misses; a host-computed expert counts as a miss (its weights were not resident)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class _Slot:
    key: Key | None = None
    pins: int = 0
    load: Load | None = None  # copy in flight (None once known complete)
    prefetched: bool = False  # filled by a prefetch and not used since
    born: int = 0  # cache step at which the slot was filled


class SlotPool:
    """``num_slots`` device slots of one expert slab each, ``data [S, numel]``, with its own policy."""

    def __init__(self, num_slots: int, store: HostStore, device: torch.device, policy: EvictionPolicy) -> None:
        self.data = torch.zeros((num_slots, store.layout.numel), dtype=store.dtype, device=device)
        self.views = store.layout.views(self.data)  # name -> [S, ...] strided views (values with their scales)
        self.slots = [_Slot() for _ in range(num_slots)]
        self.slot_of: dict[Key, int] = {}
        self.free = list(range(num_slots - 1, -1, -1))
        self.policy = policy
        # The slots' keys as arrays ([S] layer and expert, -1 when empty), so a pool of thousands of slots finds its
        # eviction candidates without a Python pass over every slot. ``watch`` holds every slot that may be pinned,
        # loading or prefetched (a superset: a slot leaves it once seen clean); all others are evictable if full.
        self.layer_of = np.full(num_slots, -1, np.int64)
        self.expert_of = np.full(num_slots, -1, np.int64)
        self.watch: set[int] = set()

    def put(self, s: int, slot: _Slot) -> None:
        """Store ``slot`` at index ``s``, keeping the key arrays and ``watch`` in step."""
        self.slots[s] = slot
        self.layer_of[s], self.expert_of[s] = slot.key if slot.key is not None else (-1, -1)
        if slot.pins or slot.load is not None or slot.prefetched:
            self.watch.add(s)

    @property
    def num_slots(self) -> int:
        return len(self.slots)


class ExpertCache:
    """Maps ``(layer, expert)`` to device slots, one shared pool or one pool per layer.

    ``slots_per_layer`` set: layer ``l`` uses ``pools[l]``; else every layer shares ``pools[0]``.
    """

    def __init__(
        self,
        store: HostStore,
        device: torch.device,
        engine: CopyEngine,
        policy: Callable[[], EvictionPolicy],
        cache_slots: int | None = None,
        slots_per_layer: int | None = None,
    ) -> None:
        if (cache_slots is None) == (slots_per_layer is None):
            raise CapacityError("give exactly one of cache_slots (shared pool) or slots_per_layer (pool per layer)")
        count = cache_slots if cache_slots is not None else slots_per_layer
        if count is None or count < 1:
            raise CapacityError(f"an expert cache of {count} slots cannot run any expert: use at least 1 slot")
        self.store = store
        self.device = device
        self.engine = engine
        self.shared = slots_per_layer is None
        npools = 1 if self.shared else store.num_layers
        self.pools = [SlotPool(count, store, device, policy()) for _ in range(npools)]
        self.stats = [LayerStats() for _ in range(store.num_layers)]
        self._loads: list[Load] = []  # copies not yet known complete
        self.step = 0  # acquire calls so far; a prefetch younger than one token's layers is kept from prefetches
        self.waits = 0  # copies something waited for: a step on a slot still loading, or a blocking engine's host

    # ---- geometry -------------------------------------------------------------------------------------
    def pool(self, layer: int) -> SlotPool:
        return self.pools[0] if self.shared else self.pools[layer]

    def capacity(self, layer: int) -> int:
        """Most distinct experts one step of ``layer`` can hold at once."""
        return self.pool(layer).num_slots

    @property
    def num_slots(self) -> int:
        return sum(p.num_slots for p in self.pools)

    @property
    def nbytes(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self.pools)

    def views(self, layer: int) -> dict[str, torch.Tensor]:
        """Slot-indexed weight views of ``layer``'s pool (``w1 [S,N1,H]``, ``w2 [S,H,I]``, their scales, ...)."""
        return self.pool(layer).views

    def resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.pool(layer).slot_of

    def missing(self, layer: int, experts: Sequence[int]) -> tuple[list[int], dict[int, Load]]:
        """Of ``experts``: those without a slot, and those whose slot's copy is still in flight (-> its load)."""
        pool = self.pool(layer)
        absent, inflight = [], {}
        for e in experts:
            s = pool.slot_of.get((layer, e))
            if s is None:
                absent.append(e)
            elif (load := pool.slots[s].load) is not None and not self.engine.done(load):
                inflight[e] = load
        return absent, inflight

    # ---- the step's contract -----------------------------------------------------------------------------
    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Slots holding ``experts`` (distinct ids) of ``layer``, loading misses; all are pinned until `release`.

        The compute stream is made to wait for every copy these slots still have in flight.
        """
        pool = self.pool(layer)
        if len(experts) > pool.num_slots:
            raise CapacityError(
                f"layer {layer} needs {len(experts)} experts at once but its pool has {pool.num_slots} slots; "
                "split the step into waves or raise cache_slots/slots_per_layer"
            )
        self.step += 1
        stats = self.stats[layer]
        slots: dict[int, int] = {}  # expert -> slot
        try:
            # Hits are pinned before any miss loads, so a miss can never evict an expert this same step needs.
            slot_of, entries, touch = pool.slot_of, pool.slots, pool.policy.touch
            for e in experts:
                s = slot_of.get((layer, e))
                if s is not None:
                    slot = entries[s]
                    if slot.prefetched:
                        stats.prefetch_hits += 1
                        slot.prefetched = False
                    slot.pins += 1
                    slots[e] = s
                    touch((layer, e))
            stats.hits += len(slots)
            pool.watch.update(slots.values())
            for e in experts:
                if e not in slots:
                    stats.misses += 1
                    s = self._load(pool, (layer, e), prefetch=False)
                    pool.slots[s].pins += 1
                    pool.watch.add(s)
                    slots[e] = s
                    pool.policy.touch((layer, e))
            ordered = [slots[e] for e in experts]
            for s in ordered:
                slot = entries[s]
                if slot.load is not None:
                    self.waits += not self.engine.done(slot.load)
                    self.engine.wait(slot.load)
                    if self.engine.done(slot.load):
                        slot.load = None
        except BaseException:
            self.release(layer, list(slots.values()))  # nothing read them: the step that failed holds no pin
            self.repair()
            raise
        return ordered

    def release(self, layer: int, slots: Sequence[int]) -> None:
        """Unpin ``slots`` once the compute that reads them has been issued."""
        pool = self.pool(layer)
        entries = pool.slots
        for s in slots:
            entries[s].pins -= 1
        self.engine.released(pool.data, slots)

    def prefetch(self, layer: int, expert: int) -> bool:
        """Start loading ``expert`` of ``layer`` into an evictable slot; False if resident or nothing evictable."""
        pool = self.pool(layer)
        key = (layer, expert)
        if key in pool.slot_of:
            return False
        victim = None
        if not pool.free:  # chosen once, here: a prefetch never waits for a copy in flight to free its slot
            victim = self._victim(pool, for_prefetch=True, include_loading=False)
            if victim is None:
                return False
        self._load(pool, key, prefetch=True, victim=victim)
        self.stats[layer].prefetches += 1
        return True

    def prefetch_victim(self, layer: int) -> Key | None:
        """The key a `prefetch` into ``layer``'s pool would evict now, or None when a slot is free (or nothing is
        evictable): what an admission rule weighs a copy against."""
        pool = self.pool(layer)
        return None if pool.free else self._victim(pool, for_prefetch=True)

    def warm(self, keys: Sequence[Key]) -> int:
        """Fill free slots with ``keys`` (most valuable first, e.g. `prophet.warm.warm_order`) before a sequence
        decodes; never evicts, so it is a no-op on a full cache. Returns the copies issued.

        The copies are ordinary asynchronous loads: they occupy the link in order, a step needing one of them
        waits for it, and a later copy queues behind them, so their time is counted wherever it falls. The policy
        then sees the new keys least valuable first (recency-ranked policies evict the least valuable first).
        """
        issued: list[Key] = []
        for key in keys:
            pool = self.pool(key[0])
            if key in pool.slot_of:
                continue
            if not pool.free:
                if self.shared:
                    break
                continue
            self._load(pool, key, prefetch=False)
            self.stats[key[0]].warmed += 1
            issued.append(key)
        for key in reversed(issued):
            self.pool(key[0]).policy.insert(key)
        return len(issued)

    def holds_everything(self) -> bool:
        """True when every expert of every layer can have a slot at once: nothing would ever be evicted."""
        if self.shared:
            return self.num_slots >= self.store.num_layers * self.store.num_experts
        return all(pool.num_slots >= self.store.num_experts for pool in self.pools)

    def preload(self) -> list[list[int]]:
        """Load every expert into its own slot for good (`holds_everything` must hold); returns the slot of each
        ``[layer][expert]``. The copies count as bytes moved, not as misses; the host waits for them."""
        if not self.holds_everything():
            raise CapacityError("preload needs a slot for every expert of every layer; raise cache_slots")
        slots = [[self._load(self.pool(layer), (layer, e), prefetch=False) for e in range(self.store.num_experts)]
                 for layer in range(self.store.num_layers)]
        self.finish_loads()
        return slots

    def finish_loads(self) -> None:
        """Wait for every copy in flight (the host blocks until they land)."""
        for load in self._loads:
            self.engine.finish(load)
        self._loads = []
        for pool in self.pools:
            for slot in pool.slots:
                slot.load = None

    def inflight(self) -> int:
        """Copies not yet known complete, over all pools."""
        self._loads = [load for load in self._loads if not self.engine.done(load)]
        return len(self._loads)

    # ---- internals -----------------------------------------------------------------------------------------
    def _evictable(self, pool: SlotPool, include_loading: bool, for_prefetch: bool = False) -> list[Key]:
        """Keys whose slots may be reused. A prefetch never evicts another prefetch that is still fresh
        (younger than one pass over all layers), so a lower-scored request cannot undo a higher-scored one."""
        fresh = self.step - self.store.num_layers
        done = self.engine.done  # `_can_evict`, inlined: a pool may hold thousands of slots
        return [slot.key for slot in pool.slots
                if slot.key is not None and not slot.pins
                and not (for_prefetch and slot.prefetched and slot.born > fresh)
                and (slot.load is None or include_loading or done(slot.load))]

    def _evictable_slots(self, pool: SlotPool, include_loading: bool, for_prefetch: bool = False) -> np.ndarray:
        """`_evictable` as slot indices ``[C]``, ascending (the same keys in the same order): every full slot but
        the watched ones that `_can_evict` refuses; watched slots found clean leave ``watch``."""
        fresh = self.step - self.store.num_layers
        mask = pool.layer_of >= 0  # [S]
        for s in list(pool.watch):
            slot = pool.slots[s]
            if not slot.pins and slot.load is None and not slot.prefetched:
                pool.watch.discard(s)
            elif not self._can_evict(slot, include_loading, for_prefetch, fresh):
                mask[s] = False
        return mask.nonzero()[0]

    def _can_evict(self, slot: _Slot, include_loading: bool, for_prefetch: bool, fresh: int) -> bool:
        if slot.pins or (for_prefetch and slot.prefetched and slot.born > fresh):
            return False
        return slot.load is None or include_loading or self.engine.done(slot.load)

    def _victim(self, pool: SlotPool, for_prefetch: bool, include_loading: bool = True) -> Key | None:
        """The key to evict, or None when every slot is pinned: a slot whose copy is done if any, else (when
        ``include_loading``) one still loading. A policy with a total order (LRU, FIFO) is walked from its oldest
        key to the first evictable one, the same choice as ranking every evictable key, without scanning the
        whole pool."""
        order = pool.policy.order()
        if order is None:
            slots = self._evictable_slots(pool, False, for_prefetch)
            if not slots.size and include_loading:
                slots = self._evictable_slots(pool, True, for_prefetch)
            return pool.policy.choose(pool.layer_of[slots], pool.expert_of[slots]) if slots.size else None
        fresh = self.step - self.store.num_layers
        for loading in (False, True)[: 1 + include_loading]:
            for key in order:
                s = pool.slot_of.get(key)
                if s is not None and self._can_evict(pool.slots[s], loading, for_prefetch, fresh):
                    return key
        return None

    def _take_slot(self, pool: SlotPool, for_prefetch: bool, victim: Key | None = None) -> int:
        """A free slot, else ``victim``'s (chosen by the caller) or the `_victim`'s, emptied."""
        if pool.free:
            return pool.free.pop()
        victim = victim if victim is not None else self._victim(pool, for_prefetch)
        if victim is None:
            raise CapacityError(
                f"all {pool.num_slots} slots are pinned by the current step; raise cache_slots/slots_per_layer"
            )
        s = pool.slot_of.pop(victim)
        slot = pool.slots[s]
        if slot.load is not None:
            self.engine.finish(slot.load)
        vstats = self.stats[victim[0]]
        vstats.evictions += 1
        if slot.prefetched:
            vstats.wasted_prefetches += 1
        pool.policy.remove(victim)
        pool.put(s, _Slot())
        return s

    def _load(self, pool: SlotPool, key: Key, prefetch: bool, victim: Key | None = None) -> int:
        s = self._take_slot(pool, prefetch, victim)
        try:
            load = self.engine.copy(pool.data[s], self.store.slab(*key), s)
        except BaseException:
            pool.free.append(s)  # the slot was emptied for this copy: give it back, as if never taken
            raise
        self.waits += self.engine.blocking
        pool.put(s, _Slot(key=key, load=None if self.engine.done(load) else load, prefetched=prefetch, born=self.step))
        if pool.slots[s].load is not None:
            self._loads.append(load)
        pool.slot_of[key] = s
        pool.policy.insert(key)
        self.stats[key[0]].bytes_h2d += load.nbytes
        return s

    # ---- recovery ------------------------------------------------------------------------------------------
    def pinned(self) -> int:
        """Pins held over all pools (0 between steps)."""
        return sum(slot.pins for pool in self.pools for slot in pool.slots)

    def unpin_all(self) -> None:
        """Release every pin, as the end of a step would: what a step interrupted by an exception still held.
        Compute already issued on those slots stays ordered before any later copy into them."""
        for pool in self.pools:
            held = [s for s, slot in enumerate(pool.slots) if slot.pins]
            for s in held:
                pool.slots[s].pins = 0
            if held:
                self.engine.released(pool.data, held)
        self.repair()

    def repair(self) -> None:
        """Make the expert -> slot map, the free list and the policy agree with the slots again, whatever
        point an exception (KeyboardInterrupt included) left a load or an eviction at. A copy that was issued
        stays known to the engine, so a slot is never reused under it."""
        for pool in self.pools:
            for s, slot in enumerate(pool.slots):
                if slot.key is not None and pool.slot_of.get(slot.key) != s:
                    if slot.key in pool.slot_of:  # another slot claims the key: this one is a stray copy
                        pool.put(s, _Slot())
                    else:
                        pool.slot_of[slot.key] = s
                        pool.policy.insert(slot.key)
            for key, s in list(pool.slot_of.items()):
                if pool.slots[s].key != key:
                    del pool.slot_of[key]
                    pool.policy.remove(key)
            pool.free = [s for s in range(pool.num_slots - 1, -1, -1) if pool.slots[s].key is None]

    def total_stats(self) -> LayerStats:
        total = LayerStats()
        for s in self.stats:
            total.add(s)
        return total
