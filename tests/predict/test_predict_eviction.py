"""Belady and prediction-aware eviction, driven through the runtime's cache by the replay driver."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from predict_helpers import random_trace

from prophet.errors import ConfigError
from prophet.policies import FIFO, LFU, LRU, Belady, PredictionAware, access_positions
from prophet.predict import OraclePredictor
from prophet.sim.replay import access_stream, replay_counts


def skewed_trace(seed: int):
    """Random routing with popular experts (Zipf-like), where policies differ more than under uniform routing."""
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, 40, 3, 8, 2, seqs=2)
    pop = rng.permutation(8)
    p = 1.0 / np.arange(1, 9)
    for t in range(tr.num_tokens):
        for layer in range(3):
            tr.experts[t, layer] = pop[rng.choice(8, 2, replace=False, p=p / p.sum())]
    return tr


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(2, 7), shared=st.booleans())
def test_belady_is_never_beaten_by_lru_lfu_or_fifo(seed, slots, shared):
    tr = skewed_trace(seed)
    uses = access_positions(access_stream(tr))
    size = {"cache_slots": 3 * slots} if shared else {"slots_per_layer": slots}
    best = replay_counts(tr, lambda: Belady(uses), **size).hit_rate
    for policy in (LRU, LFU, FIFO):
        assert best >= replay_counts(tr, policy, **size).hit_rate


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(2, 7))
def test_prediction_aware_eviction_with_the_oracle_equals_or_beats_lru(seed, slots):
    tr = skewed_trace(seed)
    oracle = OraclePredictor(tr)
    ours = replay_counts(tr, oracle.policy_factory(), slots_per_layer=slots, predictor=oracle)
    assert ours.hit_rate >= replay_counts(tr, LRU, slots_per_layer=slots).hit_rate


def test_prediction_aware_evicts_the_lowest_scored_key_and_breaks_ties_by_recency():
    scores = {(0, 0): 0.9, (0, 1): 0.2, (0, 2): 0.2, (0, 3): 0.5}
    policy = PredictionAware(lambda layer, expert: scores[layer, expert])
    for key in scores:
        policy.insert(key)
    policy.touch((0, 1))
    assert policy.victim(list(scores)) == (0, 2)


def test_belady_evicts_the_key_used_furthest_in_the_future():
    stream = [(0, 1), (0, 2), (0, 3), (0, 1), (0, 3), (0, 2)]
    policy = Belady(access_positions(stream))
    for key in stream[:3]:
        policy.insert(key)
        policy.touch(key)
    assert policy.victim([(0, 1), (0, 2), (0, 3)]) == (0, 2)


def test_belady_fails_loudly_when_the_replay_strays_from_its_future():
    policy = Belady(access_positions([(0, 1)]))
    policy.touch((0, 1))
    with pytest.raises(ConfigError, match="access stream"):
        policy.touch((0, 1))


@pytest.mark.parametrize("name", ["cooccurrence", "pathmatch", "frequency"])
def test_batched_eviction_scores_equal_one_at_a_time(name):
    """A shared pool asks for every slot's keep-priority at once; the batched path must agree key for key."""
    from prophet.predict import pathmatch, statistical

    cls = {"cooccurrence": statistical.CoOccurrencePredictor, "pathmatch": pathmatch.PathMatchPredictor,
           "frequency": statistical.FrequencyPredictor}[name]
    tr = skewed_trace(3)
    pred = cls(3, 8, 2).fit([tr])
    rng = np.random.default_rng(0)
    for t in range(6):
        for layer in range(3):
            pred.observe(layer, tr.experts[t, layer][None], tr.weights[t, layer][None])
            keys = [(int(lay), int(e)) for lay, e in zip(rng.integers(0, 3, 20), rng.integers(0, 8, 20), strict=True)]
            batched = pred.eviction_scores(keys)
            singles = []
            for k in keys:  # each alone, from a cleared memo: one layer per scores() call
                pred._keep_version = -1
                singles.append(pred.eviction_score(*k))
            assert batched == singles
            single, batched = PredictionAware(pred.eviction_score), pred.policy_factory()()
            distinct = list(dict.fromkeys(keys))
            for k in distinct:  # the same recency order in both, for ties
                single.insert(k)
                batched.insert(k)
            assert single.victim(distinct) == batched.victim(distinct)


@pytest.mark.parametrize("name", ["cooccurrence", "pathmatch", "pathmatch-numpy", "value"])
def test_keep_table_equals_fresh_scores(name):
    """`keep_table` (what the prediction-aware policy gathers from) equals each layer's two next occurrences
    scored afresh, whatever `predict` prefilled and whichever rows earlier calls asked for (random order)."""
    from prophet.predict import pathmatch, statistical, value

    L, E = 3, 8
    make = {"cooccurrence": lambda: statistical.CoOccurrencePredictor(L, E, 2),
            "pathmatch": lambda: pathmatch.PathMatchPredictor(L, E, 2),
            "pathmatch-numpy": lambda: pathmatch.PathMatchPredictor(L, E, 2, native=False),
            "value": lambda: value.ValuePredictor(L, E, 2)}[name]
    pred = make().fit([skewed_trace(5)])
    tr = skewed_trace(6)  # replayed on another trace than the fit
    policy = pred.policy_factory()()
    rng = np.random.default_rng(1)
    for t in range(5):
        for layer in range(L):
            pred.observe(layer, tr.experts[t, layer][None], tr.weights[t, layer][None])
            pred.predict(horizon=int(rng.integers(1, L + 1)))
            layers = rng.integers(0, L, int(rng.integers(1, 12)))
            experts = rng.integers(0, E, len(layers))
            got = policy.score_array(layers, experts)  # [C]
            first = (np.arange(L) - layer - 1) % L + 1
            ref = pred.scores(np.concatenate([first, first + L])).reshape(2, L, E).sum(axis=0)  # [L, E]
            if name == "value":
                ref = ref + (pred.span - 2.0) * pred.rates()
            np.testing.assert_array_equal(got, ref[layers, experts])
            assert pred.eviction_scores(list(zip(layers.tolist(), experts.tolist()))) == got.tolist()
