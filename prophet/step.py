"""One step of one MoE layer, in the one order every driver shares (DESIGN.md, "One decode step").

    dedup -> split misses (on_miss) -> host submit -> acquire (pins the step's experts) -> advance the
          prefetcher -> remap + compute -> release -> host join (+ admit) -> observe -> predict -> submit

The runtime (`prophet.runtime`) computes with real copies and CUDA events, the replay simulator
(`prophet.sim.replay`) with its cost-model clock, and the free-copy replay (the predictor harness) with nothing
at all: they differ only in the ``compute`` callback and the copy engine under the cache, so their hit and miss
counts agree exactly. The step's experts are pinned before the prefetcher may evict anything, so a prefetch for
a later layer never takes a slot this layer is about to read. A step that needs more distinct experts than its
pool holds runs in waves (acquire, compute, release, repeat).

With a `prophet.hybrid.MissPlanner` (``on_miss`` "auto" or "host"), each distinct expert without a resident
slot (or with its copy in flight) is weighed by `prophet.hybrid.decide`: the ones it sends to the host go to the
driver's `HostPath` before the device experts are acquired, so the host computes them while the device runs the
rest, and are joined after the last wave. They count as misses and as host experts; with ``on_miss="auto"`` they
are then admitted into the cache by background copies (`admit`), with ``"host"`` never copied.

Whatever is raised inside a step (an out-of-memory, a kernel error, KeyboardInterrupt) releases its pins,
repairs the cache's maps, resets the predictor and waits for the step's host experts (an error of theirs is
noted on the step's), so the next step works and computes the right answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from prophet.cache import ExpertCache
from prophet.hybrid import Choice, MissPlanner
from prophet.prefetch import Prefetcher

# compute(wave, slots, index): issue the compute of ``wave`` (distinct expert ids) held in ``slots``; ``index``
# counts the waves of this step (0 unless the step is larger than the pool).
Compute = Callable[[Sequence[int], list[int], int], None]
# after(index, last): called once a wave's slots are released (the simulator admits host-computed experts here).
After = Callable[[int, bool], None]



class HostPath(Protocol):
    """How a driver computes a step's host experts: ``submit`` starts them (before the device experts are
    issued), ``join`` adds their output to the step's (after the last wave)."""

    def submit(self, experts: list[int], tokens: dict[int, int]) -> None: ...

    def join(self) -> None: ...


# Batches with at most this many (token, k) pairs are deduplicated with a Python set; larger ones with a mask.
_SMALL_DEDUP = 256


def unique_experts(ids: np.ndarray, num_experts: int) -> tuple[list[int], bool]:
    """Sorted distinct expert ids of host ids ``[T, k]``, and whether any lies outside ``[0, num_experts)``.

    Out-of-range ids are what some routers emit for "no expert" (transformers treats id ``E`` so); they are
    left out and their pairs contribute nothing.
    """
    if ids.size <= _SMALL_DEDUP:
        found = set(ids.ravel().tolist())
        valid = sorted(e for e in found if 0 <= e < num_experts)
        return valid, len(valid) != len(found)
    flat = ids.ravel()
    invalid = bool(flat.min() < 0 or flat.max() >= num_experts)
    if invalid:
        flat = flat[(flat >= 0) & (flat < num_experts)]
    hot = np.zeros(num_experts, dtype=bool)
    hot[flat] = True
    return np.flatnonzero(hot).tolist(), invalid


class Step:
    """The cache, prefetcher and predictor that one driver steps through, layer by layer."""

    def __init__(self, cache: ExpertCache, prefetcher: Prefetcher, predictor: Any = None,
                 misses: MissPlanner | None = None, warm: Sequence[tuple[int, int]] | None = None) -> None:
        self.cache = cache
        self.warm = list(warm or [])  # experts filling free slots where a sequence starts (`prophet.warm`)
        self.prefetcher = prefetcher
        self.predictor = predictor
        self.misses = misses
        self.prefetching = prefetcher.config.enabled and predictor is not None
        # a predictor that values experts decides what its prefetches may evict, as it decides admissions
        prefetcher.gate = getattr(predictor, "worth_copying", None)

    def begin_sequence(self) -> None:
        """A new sequence starts: the predictor forgets the old one's tokens (`reset`, where it has one) and
        queued next-token prefetches, made for a token that will not come, are dropped. With a warm-start order,
        free slots are filled from it (`ExpertCache.warm`; nothing happens once the cache is full)."""
        if self.predictor is not None and hasattr(self.predictor, "reset"):
            self.predictor.reset()
        self.prefetcher.clear()
        if self.warm:
            self.cache.warm(self.warm)

    def run(
        self,
        layer: int,
        ids: Sequence[int],
        compute: Compute,
        rows: Any = None,
        weights: Any = None,
        hidden: Any = None,
        *,
        observe: bool = True,
        after: After | None = None,
        host: HostPath | None = None,
    ) -> None:
        """One step of ``layer`` over the distinct experts ``ids``; the predictor (when ``observe``) sees
        ``rows [T,k]`` (host ids), ``weights [T,k]`` and ``hidden [T,H]``. With ``host`` and a `MissPlanner`,
        missed experts may be computed on the host (`split`)."""
        cache = self.cache
        capacity = cache.capacity(layer)
        pending = False  # host experts submitted and not yet joined
        try:
            offloaded = self.split(layer, ids, rows) if host is not None and self.misses is not None else {}
            if offloaded:
                host.submit(list(offloaded), offloaded)
                pending = True
                ids = [e for e in ids if e not in offloaded]
            waves = max(1, -(-len(ids) // capacity))
            if not ids:
                self.prefetcher.advance(layer)
                if after is not None:
                    after(0, True)
            for index in range(waves):
                wave = ids[index * capacity : (index + 1) * capacity]
                if not wave:
                    break
                slots = cache.acquire(layer, wave)
                if index == 0:
                    self.prefetcher.advance(layer)  # after the pins: prefetches cannot evict this step's experts
                compute(wave, slots, index)
                cache.release(layer, slots)
                if waves > 1:
                    cache.stats[layer].waves += 1
                if after is not None:
                    after(index, index == waves - 1)
            if offloaded:
                pending = False  # a join that raises is the step's error, not joined again
                host.join()
                if self.misses.admit:
                    self.admit(layer, offloaded)
            if observe and self.predictor is not None:
                self.predictor.observe(layer, rows, weights, hidden)
                if self.prefetching:
                    self.prefetcher.submit(self.predictor.predict(), layer)
        except BaseException as exc:
            self.abort()
            if pending:  # the host threads must not run on into the next step; their own error is kept
                try:
                    host.join()  # type: ignore[union-attr]
                except BaseException as host_exc:  # noqa: BLE001 - reported on the step's error
                    note = f"the step's host experts failed too: {type(host_exc).__name__}: {host_exc}"
                    exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # add_note, also on Python 3.10
            raise

    def split(self, layer: int, ids: Sequence[int], rows: Any) -> dict[int, int]:
        """The experts of ``ids`` the planner sends to the host (-> tokens routed to each, from ``rows [T,k]``
        host ids), counted in the layer's stats as misses and host experts."""
        absent, inflight = self.cache.missing(layer, ids)
        if not absent and not inflight:
            return {}
        flat = np.asarray(rows).ravel()
        tokens = {e: int(np.count_nonzero(flat == e)) for e in (*absent, *inflight)}
        chosen = self.misses.choose(layer, tokens, inflight).experts(Choice.HOST)
        stats = self.cache.stats[layer]
        stats.misses += len(chosen)
        stats.host_experts += len(chosen)
        stats.host_tokens += sum(tokens[e] for e in chosen)
        return {e: tokens[e] for e in sorted(chosen)}

    def admit(self, layer: int, experts: Sequence[int]) -> None:
        """Copy host experts into the cache in the background, as prefetches, while fewer than the prefetcher's
        ``max_inflight`` copies are in flight: one used again soon is then a hit.

        With a predictor that values experts (``worth_copying``, e.g. `prophet.predict.value.ValuePredictor`),
        only hot experts are admitted, most valuable first: each must be worth more than the expert its copy
        would evict, so the link's few copies a token go where they pay ("hot-expert admission")."""
        stats = self.cache.stats[layer]
        gate = getattr(self.predictor, "worth_copying", None)
        if gate is not None:
            experts = sorted(experts, key=lambda e: -self.predictor.value(layer, e))
        for e in experts:
            if self.cache.inflight() >= self.prefetcher.config.max_inflight:
                break
            if gate is not None and not gate((layer, e), self.cache.prefetch_victim(layer)):
                continue
            if self.cache.prefetch(layer, e):
                stats.admitted += 1

    def abort(self) -> None:
        """Undo what a failed step left behind: its pins, half-made loads, and a predictor that may have seen
        half a step (it starts afresh)."""
        self.cache.unpin_all()
        if self.predictor is not None and hasattr(self.predictor, "reset"):
            self.predictor.reset()
