"""Turns predictions into prefetch copies, in score order, without ever stalling the compute stream.

The prefetcher keeps a queue of requested ``(layer, expert)`` loads. `submit` adds a step's predictions,
`advance(layer)` drops requests for layers the model has already passed (stale) and issues copies while fewer
than ``max_inflight`` are in flight and the cache has an evictable slot. The cache's copy engine decides what a
copy means: a side-stream copy on CUDA, a synchronous one on CPU, modelled time in the replay simulator.
"""

from __future__ import annotations

from collections.abc import Callable

from prophet.cache import ExpertCache
from prophet.config import PrefetchConfig
from prophet.policies import Key
from prophet.predict.base import Prediction


class Prefetcher:
    """Score-ordered prefetch queue over an `ExpertCache`."""

    def __init__(self, cache: ExpertCache, config: PrefetchConfig | None = None) -> None:
        self.cache = cache
        self.config = config or PrefetchConfig()
        self._queue: list[Prediction] = []
        self._last_layer = -1
        self.num_layers = cache.store.num_layers
        self.dropped_stale = 0
        self.layer_ms: float | None = None  # measured compute of a layer step (auto budget), moving average
        self._layer_tokens = 0  # tokens of the steps layer_ms averages
        # admission rule ``gate(key, victim) -> bool``: copy a prediction only when it is worth more than the key its
        # copy would evict (None: copy whatever passes the threshold); `prophet.step.Step` sets the predictor's
        self.gate: Callable[[Key, Key | None], bool] | None = None
        self.gated = 0  # predictions dropped by the gate

    def submit(self, predictions: list[Prediction], current_layer: int) -> None:
        """Queue ``predictions`` (keeping the best score per key) and issue what fits now."""
        if not self.config.enabled:
            return
        best: dict[tuple[int, int], Prediction] = {(p.layer, p.expert): p for p in self._queue}
        costs = self.costs()  # once per step: reading measured copy times queries the device
        for p in predictions:
            if p.score < self._threshold(p.layer - current_layer, costs):
                self.cache.stats[p.layer % self.num_layers].held_back += 1
                continue
            key = (p.layer, p.expert)
            if key not in best or best[key].score < p.score:
                best[key] = p
        self._queue = sorted(best.values(), key=lambda p: -p.score)
        self.advance(current_layer)

    def clear(self) -> None:
        """Drop every queued request (a new sequence starts: next-token predictions are for a token that will
        not come)."""
        self._queue = []
        self._last_layer = -1

    def costs(self) -> tuple[float, float] | None:
        """``(copy_ms, layer_ms)`` of the link budget: fixed, or measured with ``auto_budget`` once both are
        known; None means no budget (only ``min_score``)."""
        copy, layer = self.config.copy_ms, self.config.layer_ms
        if copy is None and self.config.auto_budget:
            copy, layer = self.cache.engine.mean_copy_ms(), self.layer_ms
        return None if copy is None or layer is None else (copy, layer)

    def threshold(self, distance: int) -> float:
        """Least score worth a copy for a prediction ``distance`` layer-steps ahead.

        A right guess hides at most the compute before the expert is needed (``distance * layer``); a wrong
        one occupies the link for ``copy``, delaying the misses behind it. Copying pays when
        ``score * distance * layer >= (1 - score) * copy``. When the link is the bottleneck (batch 1 over
        PCIe: a 352 MB expert takes 6.7 ms, a layer computes in well under 1 ms) only near-certain or
        far-ahead predictions pass; when compute dominates, nearly all do. Without costs: ``min_score``;
        with ``auto_budget``, the measured costs once both are known.
        """
        return self._threshold(distance, self.costs())

    def _threshold(self, distance: int, costs: tuple[float, float] | None) -> float:
        floor = self.config.min_score
        if costs is None:
            return floor
        copy, hidden = costs[0], max(distance, 1) * costs[1]
        return max(floor, copy / (copy + hidden)) if copy + hidden > 0 else floor

    def observe_layer(self, seconds: float, tokens: int = 1) -> None:
        """One layer step's compute time over ``tokens`` tokens, measured by the runtime on a step that waited
        for no copy. A new step size (prefill, then decode) starts the average afresh."""
        ms = seconds * 1e3
        fresh = self.layer_ms is None or tokens != self._layer_tokens
        self.layer_ms = ms if fresh else 0.9 * self.layer_ms + 0.1 * ms
        self._layer_tokens = tokens

    def advance(self, current_layer: int) -> int:
        """Drop requests for layers at or before ``current_layer``; issue queued copies. Returns copies issued.

        A ``current_layer`` below the last one seen means a new token began: next-token requests
        (``layer >= num_layers``) become this token's.
        """
        if current_layer < self._last_layer:
            self._queue = [p._replace(layer=p.layer - self.num_layers) for p in self._queue]
        self._last_layer = current_layer
        fresh = [p for p in self._queue if p.layer > current_layer]
        self.dropped_stale += len(self._queue) - len(fresh)
        self._queue = fresh
        issued = 0
        while self._queue and self.cache.inflight() < self.config.max_inflight:
            p = self._queue.pop(0)
            layer = p.layer % self.num_layers
            if self.cache.resident(layer, p.expert):
                continue
            if self.gate is not None and not self.gate((layer, p.expert), self.cache.prefetch_victim(layer)):
                self.gated += 1
                continue
            if not self.cache.prefetch(layer, p.expert):
                self._queue.insert(0, p)  # no evictable slot now; retry at the next layer
                break
            issued += 1
        return issued
