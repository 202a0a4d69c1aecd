"""Measuring predictors on traces: recall per look-ahead distance, and hit rates by driving the real cache.

`recall_report` replays a trace through a predictor, batch 1, token by token and layer by layer, and scores
its top-k guesses against what the trace did. `replay` drives the runtime's own `ExpertCache` and
`Prefetcher` with a trace in the order `prophet.runtime.Runtime.run_layer` does (advance the prefetcher,
acquire, release, observe, submit predictions), so an eviction policy or predictor measured here is the one
the runtime would run; only the copies are free (a one-element slab per expert, synchronous). The cache
persists across the trace's sequences, as a serving process's would; the predictor is `reset` at each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from prophet.cache import ExpertCache, LayerStats
from prophet.config import PrefetchConfig
from prophet.layer import unique_experts
from prophet.models.adapter import ExpertFormat
from prophet.policies import EvictionPolicy, Key
from prophet.predict.base import RoutingPredictor
from prophet.predict.data import RouterTrace
from prophet.prefetch import Prefetcher
from prophet.store import HostStore
from prophet.transfer import SyncCopyEngine

# The smallest expert the store accepts: replay moves one slab per load, so loads cost nothing real.
_TINY = ExpertFormat(hidden_size=1, intermediate_size=1)


def distance_label(distance: int, num_layers: int) -> str:
    if distance == num_layers:
        return "next token"
    return f"+{distance} layer" + ("s" if distance > 1 else "")


def recall_report(
    predictor: RoutingPredictor,
    trace: RouterTrace,
    distances: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    progress: bool = False,
) -> dict:
    """Recall@k and precision@k of ``predictor`` on ``trace`` per look-ahead distance and target layer.

    ``distances`` default to 1-4 layers and the next token (``L``); ``ks`` to top-k and 2 x top-k. A distance
    below L counts targets in the same token only (the last layer's +1 is the next token's first layer, a
    different question that ``L`` answers); a step counts only where its source and target rows are
    recorded and exact (cross-layer alignment is certain).
    recall@k = found true experts / true experts; precision@k = found true experts / (k x steps).
    """
    L, E = trace.num_layers, trace.num_experts
    distances = list(distances or [d for d in (1, 2, 3, 4) if d < L] + [L])
    ks = list(ks or sorted({trace.top_k, min(2 * trace.top_k, E)}))
    hot = trace.multi_hot()  # [N, L, E]
    # target[i] [N, L, 2] = (row, layer) reached from each source step at distances[i], row -1 if not counted
    target = np.full((len(distances), trace.num_tokens, L, 2), -1, np.int64)
    for i, d in enumerate(distances):
        src_row, src_layer, dst_row, dst_layer = trace.pairs(d)
        keep = (src_layer + d < L) | (d == L)  # d < L: later layers of the same token only
        target[i, src_row[keep], src_layer[keep]] = np.stack([dst_row[keep], dst_layer[keep]], axis=1)
    wanted = target[..., 0] >= 0  # [D, N, L]
    hits = np.zeros((len(distances), len(ks), L))  # [D, K, L(target)]
    true = np.zeros((len(distances), L))
    steps = np.zeros((len(distances), L))
    dist = np.asarray(distances)
    bar = tqdm(total=trace.num_tokens, desc=f"recall {predictor.name}", disable=not progress, leave=False)
    for s in range(trace.num_sequences):
        predictor.reset()
        for t in range(trace.seq_offsets[s], trace.seq_offsets[s + 1]):
            for layer in range(L):
                h = None if trace.hidden is None else trace.hidden[t, layer][None]
                predictor.observe(layer, trace.experts[t, layer][None], trace.weights[t, layer][None], h)
                sel = np.flatnonzero(wanted[:, t, layer])
                if not len(sel):
                    continue
                scores = predictor.scores(dist[sel])  # [D', E]
                order = np.argsort(-scores, axis=1, kind="stable")
                for i, row in zip(sel, order, strict=True):
                    r, j = target[i, t, layer]
                    truth = hot[r, j]
                    true[i, j] += truth.sum()
                    steps[i, j] += 1
                    for ki, k in enumerate(ks):
                        hits[i, ki, j] += truth[row[:k]].sum()
            bar.update()
    bar.close()
    out: dict = {"predictor": predictor.name, "trace": trace.name, "ks": ks, "distances": {}}
    for i, d in enumerate(distances):
        entry: dict = {"label": distance_label(d, L), "steps": int(steps[i].sum())}
        for ki, k in enumerate(ks):
            tot = true[i].sum()
            per_layer = np.where(true[i] > 0, hits[i, ki] / np.maximum(true[i], 1), np.nan)
            entry[f"recall@{k}"] = float(hits[i, ki].sum() / tot) if tot else float("nan")
            entry[f"precision@{k}"] = float(hits[i, ki].sum() / (k * steps[i].sum())) if tot else float("nan")
            entry[f"recall@{k}_per_layer"] = [None if np.isnan(v) else round(float(v), 4) for v in per_layer]
        out["distances"][str(d)] = entry
    return out


@dataclass
class ReplayResult:
    """Cache statistics of one replay; loads count host->device copies (demand misses + prefetches)."""

    policy: str
    slots: str
    tokens: int
    hits: int
    misses: int
    prefetches: int
    prefetch_hits: int
    wasted_prefetches: int
    loads: int
    bytes_moved: int
    per_layer_hit_rate: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def loads_per_token(self) -> float:
        return self.loads / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "loads_per_token": self.loads_per_token}


def access_stream(trace: RouterTrace) -> list[Key]:
    """Every ``(layer, expert)`` the cache is asked for by `replay`, in order (what Belady must know)."""
    out: list[Key] = []
    for t in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            ids = sorted({int(e) for e in trace.experts[t, layer] if e >= 0})
            out.extend((layer, e) for e in ids)
    return out


def replay(
    trace: RouterTrace,
    policy: Callable[[], EvictionPolicy],
    *,
    slots_per_layer: int | None = None,
    cache_slots: int | None = None,
    predictor: RoutingPredictor | None = None,
    prefetch: PrefetchConfig | None = None,
    expert_bytes: int | None = None,
    name: str | None = None,
    progress: bool = False,
) -> ReplayResult:
    """Drive a fresh `ExpertCache` (``policy`` factory, one pool per layer or one shared) with ``trace``.

    ``predictor`` observes every step (prediction-aware policies read it); its predictions are prefetched
    only when ``prefetch`` is given and enabled. ``expert_bytes`` (one real expert's size) turns load counts
    into bytes moved; without it ``bytes_moved`` counts loads.
    """
    L, E = trace.num_layers, trace.num_experts
    store = HostStore(L, E, _TINY, torch.float32, pin=False)
    cache = ExpertCache(
        store, torch.device("cpu"), SyncCopyEngine(), policy, cache_slots=cache_slots, slots_per_layer=slots_per_layer
    )
    prefetcher = Prefetcher(cache, prefetch or PrefetchConfig(enabled=False))
    prefetching = prefetcher.config.enabled and predictor is not None
    experts = torch.from_numpy(trace.experts.astype(np.int64))  # [N, L, K]
    bar = tqdm(total=trace.num_tokens, desc=f"replay {name or 'policy'}", disable=not progress, leave=False)
    for s in range(trace.num_sequences):
        if predictor is not None:
            predictor.reset()
        for t in range(trace.seq_offsets[s], trace.seq_offsets[s + 1]):
            for layer in range(L):
                ids, _ = unique_experts(experts[t, layer], E)
                prefetcher.advance(layer)
                if ids:
                    cache.release(layer, cache.acquire(layer, ids))
                if predictor is not None:
                    h = None if trace.hidden is None else trace.hidden[t, layer][None]
                    predictor.observe(layer, trace.experts[t, layer][None], trace.weights[t, layer][None], h)
                    if prefetching:
                        prefetcher.submit(predictor.predict(), layer)
            bar.update()
    bar.close()
    total: LayerStats = cache.total_stats()
    loads = total.bytes_h2d // store.slab_bytes
    return ReplayResult(
        policy=name or type(policy()).__name__,
        slots=f"{slots_per_layer} of {E} per layer" if slots_per_layer else f"{cache_slots} shared",
        tokens=trace.num_tokens,
        hits=total.hits,
        misses=total.misses,
        prefetches=total.prefetches,
        prefetch_hits=total.prefetch_hits,
        wasted_prefetches=total.wasted_prefetches,
        loads=loads,
        bytes_moved=loads * expert_bytes if expert_bytes else loads,
        per_layer_hit_rate=[round(st.hit_rate, 4) for st in cache.stats],
    )
