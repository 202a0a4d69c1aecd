"""ValuePredictor: expected uses over the coming tokens (near predictions + a recency-weighted rate), and the
admission rule the step and the prefetcher take from it."""

import numpy as np
import pytest

from prophet.config import PrefetchConfig
from prophet.errors import ConfigError
from prophet.models import get_spec
from prophet.predict.data import as_router_trace
from prophet.predict.pathmatch import PathMatchPredictor
from prophet.predict.value import ValuePredictor
from prophet.sim import replay
from prophet.sim.replay import replay_counts
from prophet.trace.synth import synthetic_trace

from predict_helpers import random_trace


def reference_value(near, history, layer, expert, cursor, span, decay, prior, base):
    """value(l, e) by the definition, with loops: near probabilities at the layer's next two steps plus
    (span - 2) x the decayed use rate of this sequence smoothed towards ``base``."""
    L = near.num_layers
    first = (layer - cursor - 1) % L + 1
    p = near.scores([first, first + L])[:, expert].sum()
    counts = weight = 0.0
    for row in history:  # the layer's rows of this sequence, oldest first
        counts = decay * counts + (expert in row)
        weight = decay * weight + 1
    rate = (counts + prior * base[layer, expert]) / (weight + prior)
    return p + (span - 2) * rate


def test_value_equals_its_definition_on_fresh_random_routing():
    rng = np.random.default_rng(7)
    L, E, K = 3, 6, 2
    fit, test = random_trace(rng, 40, L, E, K), random_trace(rng, 9, L, E, K)
    span, decay, prior = 6.0, 0.8, 3.0
    p = ValuePredictor(L, E, K, span=span, decay=decay, prior=prior).fit([fit])
    ref_near = PathMatchPredictor(L, E, K).fit([fit])
    base = fit.multi_hot().sum(axis=0) / fit.num_tokens  # [L, E]
    history = [[] for _ in range(L)]
    for t in range(test.num_tokens):
        for layer in range(L):
            ids = test.experts[t, layer][None]
            p.observe(layer, ids, np.ones_like(ids, float))
            ref_near.observe(layer, ids, np.ones_like(ids, float))
            history[layer].append(set(ids[0].tolist()))
            for key in [(0, 1), (layer, int(ids[0, 0])), (L - 1, 5)]:
                want = reference_value(ref_near, history[key[0]], *key, layer, span, decay, prior, base)
                assert p.value(*key) == pytest.approx(want, rel=1e-6)  # path matching votes in float32
            keys = [(lay, e) for lay in range(L) for e in range(E)]
            assert p.eviction_scores(keys) == pytest.approx([p.value(*k) for k in keys])


def test_an_expert_this_sequence_keeps_using_outranks_one_it_never_uses_and_reset_forgets():
    L, E, K = 2, 8, 2
    p = ValuePredictor(L, E, K, near=PathMatchPredictor(L, E, K, online=False), span=16.0, decay=0.9)
    for _ in range(20):
        for layer in range(L):
            p.observe(layer, np.array([[3, 4]]), np.ones((1, 2)))
    assert p.value(0, 3) > 3 * p.value(0, 6)
    p.reset()
    assert p.value(0, 3) == pytest.approx(p.value(0, 6))


def test_worth_copying_weighs_the_victim_with_the_margin():
    L, E, K = 2, 8, 2
    p = ValuePredictor(L, E, K, margin=0.5)
    for _ in range(10):
        for layer in range(L):
            p.observe(layer, np.array([[1, 2]]), np.ones((1, 2)))
    assert p.worth_copying((0, 1), None)  # a free slot: nothing to lose
    assert p.worth_copying((0, 1), (0, 7)) and not p.worth_copying((0, 7), (0, 1))
    gap = p.value(0, 1) - p.value(0, 7)
    assert not ValuePredictor(L, E, K, margin=gap + 1).worth_copying((0, 7), (0, 7))


@pytest.mark.parametrize("bad", [{"span": 1.0}, {"decay": 1.5}, {"prior": 0.0}, {"margin": -1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="ValuePredictor"):
        ValuePredictor(2, 8, 2, **bad)


@pytest.mark.parametrize("margin, admits", [(0.0, True), (1e9, False)])
def test_hybrid_admits_host_experts_only_when_worth_more_than_their_victim(margin, admits):
    spec = get_spec("mixtral")  # real expert sizes: at batch 1 a miss is computed on the host, not copied
    shape = (spec.num_moe_layers, spec.num_experts, spec.top_k)
    r = as_router_trace(synthetic_trace(*shape, num_sequences=1, tokens_per_sequence=24, seed=3, progress=False))
    p = ValuePredictor(*shape, margin=margin)
    slots = 64
    res = replay(r, spec, "h100-sxm", policy=p.policy_factory(), predictor=p, cache_slots=slots, on_miss="auto",
                 prefetch=PrefetchConfig(enabled=False, max_inflight=1), progress=False)
    assert res.cpu_misses > 0
    # a margin no copy can beat leaves only the free slots to fill: nothing is ever evicted for a copy
    assert (res.loads > slots) == admits


def test_prefetches_are_gated_by_the_value_of_what_they_would_evict():
    spec = get_spec("mixtral").tiny()
    shape = (spec.num_moe_layers, spec.num_experts, spec.top_k)
    r = as_router_trace(synthetic_trace(*shape, num_sequences=1, tokens_per_sequence=40, seed=5, progress=False))
    slots = 6
    counts = {}
    for margin in (0.0, 1e9):
        p = ValuePredictor(*shape, margin=margin)
        counts[margin] = replay_counts(r, p.policy_factory(), predictor=p, cache_slots=slots,
                                       prefetch=PrefetchConfig(max_inflight=4)).prefetches
    # an unbeatable margin leaves prefetch only the free slots of the start
    assert counts[1e9] <= slots < counts[0.0]
