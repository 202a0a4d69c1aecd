"""Warm start: the order (fitted frequencies, most used first) and the cache's fill of free slots only."""

import numpy as np
import pytest
import torch

from prophet.cache import ExpertCache
from prophet.errors import ConfigError
from prophet.models.adapter import ExpertFormat
from prophet.policies import LRU
from prophet.predict.data import as_router_trace
from prophet.sim import replay
from prophet.store import HostStore
from prophet.trace.synth import synthetic_trace
from prophet.transfer import SyncCopyEngine
from prophet.warm import fitted_order, frequencies, warm_order
from prophet.wrap import _warm_keys

FMT = ExpertFormat(hidden_size=4, intermediate_size=3)


def make_cache(layers=2, experts=5, **kw):
    store = HostStore(layers, experts, FMT, torch.float32, pin=False)
    for layer in range(layers):
        store.allocate(layer).normal_()
    return ExpertCache(store, torch.device("cpu"), SyncCopyEngine(), LRU, **kw)


def test_order_and_frequencies_equal_their_definitions_on_fresh_random_routing():
    rng = np.random.default_rng()
    r = as_router_trace(synthetic_trace(3, 6, 2, num_sequences=2, tokens_per_sequence=20,
                                        seed=int(rng.integers(1 << 30)), progress=False))
    freq = frequencies([r], 3, 6)
    ref = np.zeros((3, 6))
    for t in range(r.num_tokens):
        for layer in range(3):
            for e in set(r.experts[t, layer].tolist()) - {-1}:
                ref[layer, e] += 1 / r.num_tokens
    np.testing.assert_allclose(freq, ref)
    order = fitted_order([r])
    assert sorted(order) == [(layer, e) for layer in range(3) for e in range(6)]
    values = [freq[k] for k in order]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ConfigError, match="layers, experts"):
        warm_order(np.zeros(4))


def test_warm_fills_free_slots_only_and_the_least_valuable_is_evicted_first():
    cache = make_cache(cache_slots=3)
    cache.release(1, cache.acquire(1, [4]))  # one slot already taken
    order = [(0, 1), (1, 4), (0, 3), (1, 0), (0, 2)]
    assert cache.warm(order) == 2  # (1, 4) resident; two free slots: (0, 1), (0, 3)
    assert cache.resident(0, 1) and cache.resident(0, 3) and not cache.resident(1, 0)
    assert sum(s.warmed for s in cache.stats) == 2 and cache.total_stats().misses == 1
    assert cache.warm(order) == 0  # full: never evicts
    cache.release(0, cache.acquire(0, [2]))  # a miss evicts the least recently used: (1, 4) (used before warm)
    cache.release(1, cache.acquire(1, [0]))  # then the less valuable warm expert, (0, 3)
    assert cache.resident(0, 1) and not cache.resident(0, 3)


def test_per_layer_pools_are_each_filled():
    cache = make_cache(slots_per_layer=2)
    assert cache.warm(warm_order(np.arange(10.0).reshape(2, 5))) == 4
    assert all(cache.resident(layer, e) for layer in (0, 1) for e in (3, 4))


def test_prefill_warm_start_lands_before_the_clock_and_bad_settings_are_refused():
    r = as_router_trace(synthetic_trace(32, 8, 2, num_sequences=1, tokens_per_sequence=6, seed=1, progress=False))
    order = fitted_order([r])
    cold = replay(r, "mixtral-8x7b", "h100-sxm", cache_slots=40, progress=False)
    decode = replay(r, "mixtral-8x7b", "h100-sxm", cache_slots=40, progress=False, warm=order)
    prefill = replay(r, "mixtral-8x7b", "h100-sxm", cache_slots=40, progress=False, warm=order, warm_during="prefill")
    assert decode.warmed == prefill.warmed == 40 and decode.loads >= 40 and prefill.loads < decode.loads
    assert prefill.hits == decode.hits > cold.hits  # same cache contents; only the clock differs
    assert prefill.tokens_per_s >= decode.tokens_per_s
    with pytest.raises(ConfigError, match="warm_during"):
        replay(r, "mixtral-8x7b", "h100-sxm", cache_slots=40, progress=False, warm=order, warm_during="later")
    with pytest.raises(ConfigError, match="layer < 2"):
        _warm_keys([(2, 0)], 2, 8)
