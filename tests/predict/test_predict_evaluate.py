"""The harness's arithmetic, and the replay driver against a plain simulation of the same cache."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from predict_helpers import make_trace, random_trace

from prophet.config import PrefetchConfig
from prophet.policies import LRU, PredictionAware
from prophet.predict import OraclePredictor, RoutingPredictor
from prophet.predict.evaluate import recall_report
from prophet.sim.replay import access_stream, replay_counts


class Ranked(RoutingPredictor):
    """Always ranks expert 0 first, then 1, 2, ...: a predictor whose guesses are known in advance."""

    def __init__(self, layers: int, experts: int, k: int) -> None:
        super().__init__(layers, experts, k)

    def _observe(self, layer, ids, weights, hidden) -> None:
        pass

    def _scores(self, distances, shifts, layers):
        return np.tile(np.linspace(1.0, 0.1, self.num_experts), (len(distances), 1))


def test_recall_and_precision_are_counted_by_hand():
    # 1 sequence, 3 tokens, 2 layers, top-2 of 4; token 1's layer 1 is inexact and must not count.
    experts = np.array([
        [[0, 1], [0, 2]],
        [[2, 3], [1, 3]],
        [[0, 3], [2, 3]],
    ])
    exact = np.ones((3, 2), bool)
    exact[1, 1] = False
    tr = make_trace(experts, [3], 4, exact=exact)
    rep = recall_report(Ranked(2, 4, 2), tr, distances=[1, 2], ks=[1, 2])
    # +1 layer (same token only): token 0 (0->{0,2}) and token 2 (->{2,3}); token 1's target is inexact.
    #   top-1 {0}: 1 of 4 true found; top-2 {0,1}: 1 of 4.
    one = rep["distances"]["1"]
    assert one["steps"] == 2
    assert one["recall@1"] == 1 / 4 and one["precision@1"] == 1 / 2
    assert one["recall@2"] == 1 / 4 and one["precision@2"] == 1 / 4
    # next token (d = L = 2): (0,0)->(1,0) {2,3}; (0,1)->(1,1) inexact; (1,0)->(2,0) {0,3}; (1,1) inexact.
    nxt = rep["distances"]["2"]
    assert nxt["label"] == "next token" and nxt["steps"] == 2
    assert nxt["recall@1"] == 1 / 4 and nxt["recall@2"] == 1 / 4 and nxt["precision@2"] == 1 / 4
    assert nxt["recall@2_per_layer"] == [0.25, None]


def plain_lru(trace, slots: int) -> float:
    """The README's plain simulation: per-layer LRU, batch 1, the step's own experts never evicted."""
    hits = total = 0
    caches = [OrderedDict() for _ in range(trace.num_layers)]
    for t in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            cache = caches[layer]
            # the cache serves a step's hits before its misses, so they end up older in recency order
            ids = sorted({int(e) for e in trace.experts[t, layer] if e >= 0}, key=lambda e: e not in cache)
            for e in ids:
                total += 1
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                    continue
                if len(cache) >= slots:
                    del cache[next(k for k in cache if k not in ids)]
                cache[e] = None
    return hits / total


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(2, 6))
def test_replay_through_the_real_cache_matches_a_plain_lru_simulation(seed, slots):
    tr = random_trace(np.random.default_rng(seed), 30, 3, 8, 2, seqs=2)
    res = replay_counts(tr, LRU, slots_per_layer=slots)
    assert abs(res.hit_rate - plain_lru(tr, slots)) < 1e-12
    assert res.loads == res.misses and res.hits + res.misses == len(access_stream(tr))


def test_prefetching_the_oracle_turns_every_step_but_each_sequences_first_into_a_hit():
    tr = random_trace(np.random.default_rng(0), 40, 4, 8, 2, seqs=2)
    oracle = OraclePredictor(tr)
    oracle.horizon, oracle.top = 1, 2
    res = replay_counts(tr, lambda: PredictionAware(oracle.eviction_score), slots_per_layer=4, predictor=oracle,
                 prefetch=PrefetchConfig(max_inflight=64))
    assert res.misses <= 2 * tr.num_sequences  # a sequence's first step has nothing before it to predict from
    assert res.wasted_prefetches == 0 and res.prefetch_hits == res.prefetches
    assert res.bytes_h2d == res.loads == res.misses + res.prefetches
