"""Statistics on hand-made traces whose answers are known, plus sanity on the real and the tiny traces."""

from __future__ import annotations

import numpy as np
import pytest
from trace_helpers import make_trace, random_trace

import prophet.trace as pt
from prophet.trace import stats


def test_popularity_and_entropy():
    # layer 0 always picks {0, 1}; layer 1 spreads over 4 experts evenly; -1 is ignored
    ex = [[[0, 1], [0, 1]], [[0, 1], [2, 3]], [[1, 0], [-1, -1]]]
    trace = make_trace(ex, num_experts=4)
    pop = stats.popularity(trace)
    np.testing.assert_allclose(pop, [[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(stats.entropy(trace), [1.0, 2.0])
    np.testing.assert_allclose(stats.entropy(trace, normalized=True), [0.5, 1.0])


def test_reuse_distances_stay_inside_sequences():
    # one layer, top-1; sequence 0 = [2, 5, 2, 2], sequence 1 = [2, 5]
    trace = make_trace(np.array([2, 5, 2, 2, 2, 5]).reshape(6, 1, 1), [0, 4, 6])
    (d,) = stats.reuse_distances(trace)
    assert sorted(d.tolist()) == [
        1,
        2,
    ]  # 2 at t=2 (distance 2), 2 at t=3 (distance 1); nothing across sequences
    # reuse rate: tokens with a predecessor are t=1,2,3 of seq 0 and t=1 of seq 1; only t=3 repeats its predecessor
    np.testing.assert_allclose(stats.reuse_rate(trace, 1), [1 / 4])
    np.testing.assert_allclose(stats.reuse_rate(trace, 2), [2 / 4])


def test_cooccurrence_counts_pairs_of_consecutive_layers_on_exact_rows():
    ex = [[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[3, 1], [0, 2]]]
    exact = np.array([[True, True], [True, True], [True, False]])
    trace = make_trace(ex, num_experts=4, exact=exact)
    c = stats.cooccurrence(trace, 1)
    assert c.shape == (1, 4, 4) and c.sum() == 8  # two exact tokens x 2 x 2 pairs
    assert c[0, 0, 2] == 2 and c[0, 1, 3] == 1 and c[0, 2, 1] == 1 and c[0, 3, 0] == 0


def test_mutual_information_bounds():
    rng = np.random.default_rng(0)
    ident = rng.integers(0, 4, 4000)
    same = make_trace(np.stack([ident, ident], 1)[:, :, None], num_experts=4)  # layer 1 copies layer 0
    np.testing.assert_allclose(stats.mutual_information(same), stats.entropy(same)[:1], rtol=1e-9)
    indep = make_trace(rng.integers(0, 4, (4000, 2, 1)), num_experts=4)
    assert stats.mutual_information(indep)[0] < 0.01


def test_next_layer_recall_is_one_for_a_deterministic_mapping_and_near_chance_for_noise():
    rng = np.random.default_rng(1)
    first = rng.integers(0, 8, 500)
    mapped = make_trace(np.stack([first, (first * 3 + 1) % 8], 1)[:, :, None])
    np.testing.assert_allclose(stats.next_layer_recall(mapped), [1.0])
    noise = random_trace(rng, n=3000, layers=2, experts=8, k=2, seqs=1)
    assert abs(stats.next_layer_recall(noise)[0] - 2 / 8) < 0.05


def test_dedup_curve_matches_uniform_routing_for_uniform_traces():
    trace = random_trace(np.random.default_rng(2), n=4096, layers=2, experts=8, k=2, seqs=64)
    curve = stats.dedup_curve(trace, (1, 2, 8, 32))
    np.testing.assert_allclose(curve.mean, curve.uniform, rtol=0.03)
    assert curve.mean[0] == 2.0 and curve.saving[0] == 0.0
    by_seq = stats.dedup_curve(trace, (1, 8), mode="sequences")
    np.testing.assert_allclose(by_seq.mean, by_seq.uniform, rtol=0.05)
    assert np.isnan(
        stats.dedup_curve(trace, (128,), mode="sequences").mean[0]
    )  # fewer sequences than the batch


def test_dedup_of_identical_tokens_is_flat():
    trace = make_trace(np.tile([[[3, 5]]], (64, 1, 1)))
    np.testing.assert_allclose(stats.dedup_curve(trace, (1, 4, 16)).mean, [2, 2, 2])


def test_summary_of_the_project_trace_is_plain_data(tiny_trace_path):
    import json

    summary = stats.summary(pt.load(tiny_trace_path))
    again = json.loads(json.dumps(summary))
    assert again["tokens"] == 319 and len(again["entropy_normalized"]) == 4
    assert all(0.5 < h <= 1.0 for h in again["entropy_normalized"])


@pytest.mark.parametrize("name", ["mixtral-8x7b_humaneval_decode", "flame-moe-290m_prefill"])
def test_real_traces_route_better_than_chance_across_layers(shared_traces, name):
    trace = pt.load(shared_traces / f"{name}.npz")
    chance = trace.top_k / trace.num_experts
    assert np.nanmean(stats.next_layer_recall(trace)) > chance + 0.15
    assert np.nanmean(stats.reuse_rate(trace)) > chance
    assert (stats.mutual_information(trace) >= 0).all()
