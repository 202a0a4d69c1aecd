"""The simulator's fast paths against their simple references, on fresh random inputs: eviction candidates kept
as arrays (`ExpertCache._evictable_slots`) against the list built slot by slot (`_evictable`), array victims
(`EvictionPolicy.choose`) against `victim` on key lists, and the wavefront trace generator against the
cell-by-cell loop (bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prophet.cache import ExpertCache
from prophet.hardware import get_profile
from prophet.models.adapter import ExpertFormat
from prophet.policies import FIFO, LFU, LRU, Belady, PredictionAware, ScoredPolicy, keys
from prophet.sim.engine import SimCopyEngine
from prophet.store import HostStore
from prophet.trace import synth

L, E = 3, 6


class _Counter:
    """A predictor stand-in: scores change only when ``version`` moves (as RoutingPredictor's do)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.version = rng, 0
        self.table = rng.integers(0, 3, (L, E)).astype(float)  # few values: many ties

    def observe(self) -> None:
        self.version += 1
        self.table = self.rng.integers(0, 3, (L, E)).astype(float)

    def eviction_score(self, layer: int, expert: int) -> float:
        return float(self.table[layer, expert])

    def eviction_scores(self, ks: list[tuple[int, int]]) -> list[float]:
        return [float(self.table[k]) for k in ks]


def _check_candidates(cache: ExpertCache) -> None:
    for pool in cache.pools:
        for loading in (False, True):
            for prefetch in (False, True):
                fast = cache._evictable_slots(pool, loading, prefetch)
                assert keys(pool.layer_of[fast], pool.expert_of[fast]) == cache._evictable(pool, loading, prefetch)
        candidates = cache._evictable(pool, True)
        if candidates:
            layers, experts = (np.array(c, np.int64) for c in zip(*candidates, strict=True))
            assert pool.policy.choose(layers, experts) == pool.policy.victim(candidates)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["lru", "fifo", "lfu", "scored", "predicted", "predicted-table"])
def test_array_candidates_and_victims_equal_the_plain_lists(seed, kind):
    rng = np.random.default_rng(seed)
    counter = _Counter(rng)
    fixed = rng.integers(0, 2, (L, E)).astype(float)
    factories = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "scored": lambda: ScoredPolicy(lambda k: fixed[k]),
                 "predicted": lambda: PredictionAware(counter.eviction_score, batch=counter.eviction_scores),
                 "predicted-table": lambda: PredictionAware(counter.eviction_score, table=lambda layers: counter.table)}
    store = HostStore(L, E, ExpertFormat(hidden_size=1, intermediate_size=1), torch.float32, pin=False)
    engine = SimCopyEngine(get_profile("h100-sxm"), 1 << 26)  # copies stay in flight for a while
    shared = seed % 2 == 0  # seed 2: up to 17 candidates, more than the few `ScoredPolicy.choose` ranks in Python
    cache = ExpertCache(store, torch.device("cpu"), engine, factories[kind], cache_slots=(7, 17)[seed // 2] if shared else None,
                        slots_per_layer=None if shared else 3)
    for _ in range(60):
        layer = int(rng.integers(L))
        want = sorted(rng.choice(E, int(rng.integers(1, min(cache.capacity(layer), E) + 1)), replace=False).tolist())
        slots = cache.acquire(layer, want)
        _check_candidates(cache)  # with this step's pins held
        for _ in range(int(rng.integers(0, 3))):
            cache.prefetch(int(rng.integers(L)), int(rng.integers(E)))
        _check_candidates(cache)
        cache.release(layer, slots)
        engine.now += float(rng.exponential(engine.seconds_per_copy))
        counter.observe()
        _check_candidates(cache)


def test_belady_scores_arrays_as_key_lists():
    rng = np.random.default_rng(0)
    stream = [(int(rng.integers(L)), int(rng.integers(E))) for _ in range(200)]
    uses: dict = {}
    for i, k in enumerate(stream):
        uses.setdefault(k, []).append(i)
    policy = Belady(uses)
    for k in stream[:120]:
        policy.insert(k)
        policy.touch(k)
    cands = [(layer, e) for layer in range(L + 1) for e in range(E + 2)]  # some outside the known future
    layers, experts = (np.array(c, np.int64) for c in zip(*cands, strict=True))
    np.testing.assert_array_equal(policy.score_array(layers, experts), policy.scores(cands))
    assert policy.choose(layers, experts) == policy.victim(cands)


@pytest.mark.parametrize(("params", "shape"), [("tiny-mixtral", (3, 17)), ("flame-moe-290m", (2, [9, 4])),
                                               ((6, 16, 3), (5, 11)), ((4, 8, 1), (2, 6))])
def test_wavefront_generator_equals_the_cell_by_cell_loop(params, shape):
    p = synth.builtin(params) if isinstance(params, str) else synth.for_shape(*params)
    fast = synth.generate(p, *shape, seed=7, progress=False)
    slow = synth.generate_reference(p, *shape, seed=7)
    np.testing.assert_array_equal(fast.experts, slow.experts)
    np.testing.assert_array_equal(fast.weights, slow.weights)
    np.testing.assert_array_equal(fast.seq_offsets, slow.seq_offsets)
