"""The slot cache on CPU with synchronous copies: mapping, eviction, pinning, prefetch accounting."""

import pytest
import torch

from prophet.cache import ExpertCache
from prophet.config import PrefetchConfig
from prophet.errors import CapacityError, ConfigError
from prophet.models.adapter import ExpertFormat
from prophet.policies import LRU
from prophet.predict.base import Prediction
from prophet.prefetch import Prefetcher
from prophet.store import HostStore, slab_views
from prophet.transfer import SyncCopyEngine

FMT = ExpertFormat(hidden_size=4, intermediate_size=3)


def make_store(layers=2, experts=5):
    store = HostStore(layers, experts, FMT, torch.float32, pin=False)
    for layer in range(layers):
        store.allocate(layer).normal_()
    return store


def make_cache(store, **kw):
    return ExpertCache(store, torch.device("cpu"), SyncCopyEngine(), LRU, **kw)


def test_slab_views_cover_the_slab_in_order():
    slab = torch.arange(FMT.numel, dtype=torch.float32)
    views = slab_views(slab, FMT)
    assert views["w1"].shape == (6, 4) and views["w2"].shape == (4, 3)
    assert torch.equal(torch.cat([v.flatten() for v in views.values()]), slab)


def test_acquire_loads_misses_and_slots_hold_the_right_expert():
    store = make_store()
    cache = make_cache(store, slots_per_layer=3)
    slots = cache.acquire(1, [0, 4])
    cache.release(1, slots)
    for e, s in zip([0, 4], slots, strict=True):
        assert torch.equal(cache.pool(1).data[s], store.slab(1, e))
    assert cache.stats[1].misses == 2 and cache.stats[1].hits == 0
    assert cache.stats[1].bytes_h2d == 2 * store.slab_bytes
    again = cache.acquire(1, [4])
    assert again == [slots[1]] and cache.stats[1].hits == 1


def test_lru_eviction_in_a_shared_pool():
    store = make_store()
    cache = make_cache(store, cache_slots=2)
    for layer, e in [(0, 0), (1, 1), (0, 0), (0, 2)]:  # (1,1) is least recent when (0,2) arrives
        cache.release(layer, cache.acquire(layer, [e]))
    assert cache.resident(0, 0) and cache.resident(0, 2) and not cache.resident(1, 1)
    assert cache.stats[1].evictions == 1


def test_pinned_slots_are_never_evicted():
    store = make_store()
    cache = make_cache(store, slots_per_layer=2)
    held = cache.acquire(0, [0, 1])  # both slots pinned by the current step
    with pytest.raises(CapacityError, match="pinned"):
        cache.acquire(0, [2])
    cache.release(0, held)
    cache.release(0, cache.acquire(0, [2]))


def test_a_step_larger_than_the_pool_is_refused_with_the_setting_to_change():
    cache = make_cache(make_store(), slots_per_layer=2)
    with pytest.raises(CapacityError, match="slots_per_layer"):
        cache.acquire(0, [0, 1, 2])


def test_prefetch_hits_and_wasted_prefetches_are_counted():
    store = make_store()
    cache = make_cache(store, slots_per_layer=2)
    assert cache.prefetch(1, 3) and cache.prefetch(1, 4)
    assert not cache.prefetch(1, 3)  # already resident
    cache.release(1, cache.acquire(1, [3]))
    assert cache.stats[1].prefetch_hits == 1 and cache.stats[1].hits == 1
    cache.release(1, cache.acquire(1, [0]))  # evicts the unused prefetch of expert 4 (LRU among evictable)
    assert cache.stats[1].wasted_prefetches == 1


def test_zero_slots_is_an_error():
    with pytest.raises(CapacityError, match="at least 1"):
        make_cache(make_store(), cache_slots=0)


def test_prefetcher_issues_in_score_order_and_drops_stale_requests():
    store = make_store(layers=3, experts=5)
    cache = make_cache(store, slots_per_layer=1)
    pf = Prefetcher(cache)
    # layer 0 is running: a request for layer 0 is stale, layer 2 gets its best-scored expert
    pf.submit([Prediction(0, 1, 0.9), Prediction(2, 3, 0.2), Prediction(2, 4, 0.8)], current_layer=0)
    assert cache.resident(2, 4) and not cache.resident(0, 1)
    assert pf.dropped_stale == 1


def test_next_token_predictions_wrap_to_the_first_layers():
    store = make_store(layers=2, experts=5)
    cache = make_cache(store, slots_per_layer=2)
    pf = Prefetcher(cache)
    pf.submit([Prediction(2, 3, 0.9)], current_layer=1)  # layer 2 = layer 0 of the next token
    assert cache.resident(0, 3)


def test_link_budget_threshold_is_the_break_even_of_hidden_compute_and_wasted_link_time():
    cache = make_cache(make_store(layers=2, experts=5), slots_per_layer=2)
    assert Prefetcher(cache, PrefetchConfig(min_score=0.2)).threshold(1) == 0.2  # no costs: the floor
    pf = Prefetcher(cache, PrefetchConfig(copy_ms=6.0, layer_ms=2.0))
    assert pf.threshold(1) == pytest.approx(0.75) and pf.threshold(3) == pytest.approx(0.5)
    assert pf.threshold(0) == pf.threshold(1)  # a prediction for the running layer still needs a copy's worth
    floored = Prefetcher(cache, PrefetchConfig(copy_ms=6.0, layer_ms=2.0, min_score=0.6))
    assert floored.threshold(3) == 0.6
    free = Prefetcher(cache, PrefetchConfig(copy_ms=0.0, layer_ms=0.0))  # free copies: everything passes
    assert free.threshold(1) == 0.0


def test_predictions_below_the_link_budget_are_not_copied():
    store = make_store(layers=3, experts=5)
    cache = make_cache(store, slots_per_layer=2)
    pf = Prefetcher(cache, PrefetchConfig(copy_ms=6.0, layer_ms=2.0))
    # one layer ahead needs 0.75, two layers ahead 0.6
    pf.submit([Prediction(1, 0, 0.7), Prediction(1, 1, 0.8), Prediction(2, 2, 0.65)], current_layer=0)
    assert not cache.resident(1, 0) and cache.resident(1, 1) and cache.resident(2, 2)


@pytest.mark.parametrize("bad", [{"copy_ms": 1.0}, {"copy_ms": -1.0, "layer_ms": 1.0}])
def test_link_budget_needs_both_costs_and_no_negatives(bad):
    with pytest.raises(ConfigError):
        PrefetchConfig(**bad)


def test_slot_release_names_the_slot_tensor_so_pools_never_collide():
    # A copy into a slot must wait for the last compute that read *that* slot; with one pool per layer the
    # slot index alone is ambiguous, so the engine is told the slot's tensor.
    class Recording(SyncCopyEngine):
        def __init__(self):
            super().__init__()
            self.released_at: list[int] = []

        def released(self, pool, slots):
            self.released_at.extend(pool[s].data_ptr() for s in slots)

    store = make_store()
    engine = Recording()
    cache = ExpertCache(store, torch.device("cpu"), engine, LRU, slots_per_layer=2)
    for layer in (0, 1):
        cache.release(layer, cache.acquire(layer, [3]))
    assert engine.released_at == [cache.pool(0).data[0].data_ptr(), cache.pool(1).data[0].data_ptr()]
    assert engine.released_at[0] != engine.released_at[1]


def test_a_miss_never_evicts_an_expert_the_same_step_needs():
    store = make_store()
    cache = make_cache(store, slots_per_layer=2)
    cache.release(0, cache.acquire(0, [1]))
    cache.release(0, cache.acquire(0, [2]))  # LRU order now: 1 (oldest), 2
    slots = cache.acquire(0, [3, 1])  # the miss for 3 must evict 2, not the step's own hit 1
    assert cache.resident(0, 1) and cache.resident(0, 3) and not cache.resident(0, 2)
    assert cache.stats[0].misses == 3 and cache.stats[0].hits == 1
    assert torch.equal(cache.pool(0).data[slots[1]], store.slab(0, 1))


class _SlowLink(SyncCopyEngine):
    """Copies as usual but reports them as taking ``ms`` each: the link cost the auto budget reads."""

    def __init__(self, ms):
        super().__init__()
        self.ms = ms

    def mean_copy_ms(self):
        return self.ms


@pytest.mark.parametrize(("copy_ms", "copied"), [(0.1, True), (100.0, False)])
def test_auto_budget_gates_with_measured_costs(copy_ms, copied):
    store = make_store(layers=3, experts=5)
    cache = ExpertCache(store, torch.device("cpu"), _SlowLink(copy_ms), LRU, slots_per_layer=2)
    pf = Prefetcher(cache, PrefetchConfig(auto_budget=True))
    pf.observe_layer(0.002)
    pf.observe_layer(0.004)
    assert pf.layer_ms == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)  # a moving average, in ms
    pf.submit([Prediction(1, 3, 0.9)], current_layer=0)
    assert cache.resident(1, 3) == copied  # 0.9 beats 0.1 / (0.1 + 2.2) but not 100 / (100 + 2.2)


def test_auto_budget_is_ungated_until_both_costs_are_measured():
    cache = make_cache(make_store(layers=3, experts=5), slots_per_layer=2)
    pf = Prefetcher(cache, PrefetchConfig(auto_budget=True, min_score=0.1))
    assert cache.engine.mean_copy_ms() is None and pf.threshold(1) == 0.1
    pf.observe_layer(0.001)
    assert pf.threshold(1) == 0.1  # still no copy measured
    cache.acquire(0, [1])
    assert cache.engine.mean_copy_ms() > 0 and 0.1 <= pf.threshold(1) < 1.0


def test_wrap_measures_its_link_budget_by_default():
    from prophet.config import ProphetConfig

    assert ProphetConfig().prefetch.auto_budget and not PrefetchConfig().auto_budget


def test_a_new_step_size_restarts_the_layer_time_average():
    pf = Prefetcher(make_cache(make_store(), slots_per_layer=2), PrefetchConfig(auto_budget=True))
    pf.observe_layer(0.050, tokens=64)  # a prefill layer
    pf.observe_layer(0.001, tokens=1)  # decode: the prefill time must not linger in the average
    assert pf.layer_ms == pytest.approx(1.0)
    pf.observe_layer(0.003, tokens=1)
    assert pf.layer_ms == pytest.approx(1.2)
