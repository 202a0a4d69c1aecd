"""Batch-1 fast paths give the reference's predictions and eviction scores on fresh random inputs: the numpy
fast paths bit for bit, the compiled path-matching kernel (prophet/pathmatch.c) to float32 rounding of its
vote sums, with the same similarities and neighbours."""

from __future__ import annotations

import numpy as np
import pytest
from predict_helpers import random_trace

from prophet.predict import FrequencyPredictor, PathMatchPredictor, pathmatch, pathmatch_kernel
from prophet.predict.base import Prediction, RoutingPredictor
from prophet.predict.pathmatch import PathMatchReference

# The kernel's float32 vote sums run in another order than numpy's BLAS: a few units of float32 rounding.
KERNEL_RTOL = 1e-5


@pytest.fixture(params=["kernel", "numpy"])
def kernel(request, monkeypatch) -> bool:
    """Run a test with the compiled path-matching kernel and with the numpy fast paths (PROPHET_NATIVE=0)."""
    if request.param == "numpy":
        monkeypatch.setenv("PROPHET_NATIVE", "0")
        assert pathmatch_kernel.library() is None
        return False
    monkeypatch.setenv("PROPHET_NATIVE", "1")
    if pathmatch_kernel.library() is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    return True


def same_predictions(got: list[Prediction], want: list[Prediction], rtol: float = 1e-12) -> None:
    """Equal scores per layer; equal experts except among ties at the cut (either choice is right)."""
    for layer in {p.layer for p in want} | {p.layer for p in got}:
        g = sorted((p for p in got if p.layer == layer), key=lambda p: -p.score)
        w = sorted((p for p in want if p.layer == layer), key=lambda p: -p.score)
        np.testing.assert_allclose([p.score for p in g], [p.score for p in w], rtol=rtol)
        cut = w[-1].score * (1 + 2 * rtol) if w else 0.0
        assert {p.expert for p in g if p.score > cut} == {p.expert for p in w if p.score > cut}


def reference_predict(p: RoutingPredictor, horizon: int, top: int) -> list[Prediction]:
    """The plain ranking: every distance scored alone, ``argsort`` of each row."""
    out = []
    for d in range(1, horizon + 1):
        row = p.scores([d])[0]
        out += [Prediction(p.layer + d, int(e), float(row[e])) for e in np.argsort(-row)[:top] if row[e] > 0.0]
    return out


def drive(fast: RoutingPredictor, ref: RoutingPredictor, rng: np.random.Generator, tokens: int, layers: int,
          experts: int, k: int, evict: bool, rtol: float = 1e-12) -> None:
    """Feed both the same random batch-1 steps (some ids -1, some sequences reset); compare after each."""
    for t in range(tokens):
        if rng.random() < 0.1:
            fast.reset()
            ref.reset()
        for layer in range(layers):
            ids = rng.permutation(experts)[:k]
            if rng.random() < 0.1:
                ids[rng.integers(k)] = -1  # an unrecorded or dropped slot
            for p in (fast, ref):
                p.observe(layer, ids[None], np.ones((1, k), np.float32))
            if isinstance(ref, PathMatchReference):  # the same similarities, hence the same neighbours
                np.testing.assert_array_equal(fast.sim, ref.sim)
                if ref.sim.shape[1]:
                    assert set(fast.neighbours_of()[0][0].tolist()) == set(ref.neighbours_of()[0][0].tolist())
            if evict:  # a prediction-aware pool asking before predict (a demand miss) and after
                keys = [(int(rng.integers(layers)), int(e)) for e in rng.integers(0, experts, 3)]
                np.testing.assert_allclose(fast.eviction_scores(keys), ref.eviction_scores(keys), rtol=rtol)
            h = int(rng.integers(1, 3))
            same_predictions(fast.predict(horizon=h), ref.predict(horizon=h), rtol)
            same_predictions(fast.predict(horizon=h), reference_predict(ref, h, ref.top), rtol)
            if evict:
                nxt = [((layer + 1) % layers, e) for e in range(experts)]
                np.testing.assert_allclose(fast.eviction_scores(nxt), ref.eviction_scores(nxt), rtol=rtol)
            dist = rng.integers(1, 2 * layers + 2, 4)
            np.testing.assert_allclose(fast.scores(dist), ref.scores(dist), rtol=rtol)


@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_pathmatch_matches_its_reference(seed, evict, kernel):
    rng = np.random.default_rng(seed)
    L, E, K = 4, 8, 2
    fit = random_trace(rng, 60, L, E, K, seqs=3)
    kw = {"max_online": 16, "neighbours": 5}  # a small window: the memory slides during the test
    fast = PathMatchPredictor(L, E, K, **kw).fit([fit])
    ref = PathMatchReference(L, E, K, **kw).fit([fit])
    assert (fast._kernel is not None) == kernel
    drive(fast, ref, rng, 60, L, E, K, evict, KERNEL_RTOL if kernel else 1e-12)
    np.testing.assert_array_equal(fast.mem, ref.mem)  # the online memory grew alike
    np.testing.assert_array_equal(fast.sim, ref.sim)


def test_pathmatch_unfitted_and_top3_match_the_reference(monkeypatch, kernel):
    monkeypatch.setattr(pathmatch, "_MAX_GROUPS", 3)  # the memo of distance sets is cleared many times
    rng = np.random.default_rng(5)
    fast, ref = PathMatchPredictor(3, 6, 3), PathMatchReference(3, 6, 3)
    drive(fast, ref, rng, 30, 3, 6, 3, evict=True, rtol=KERNEL_RTOL if kernel else 1e-12)


@pytest.mark.parametrize(("experts", "k", "neighbours"), [(8, 2, 8), (32, 8, 3), (16, 1, 2)])
def test_pathmatch_kernel_shapes_and_wrapping_distances(experts, k, neighbours, kernel):
    # top-1/2/8, few and many neighbours, a fitted memory of several sequences with unexact entries, an online
    # window that slides, and distances up to three tokens ahead (wrapping through successor chains)
    rng = np.random.default_rng(experts + k)
    L = 5
    fit = random_trace(rng, 300, L, experts, k, seqs=4)  # more rows than a block of the pick (64)
    kw = {"max_online": 12, "neighbours": neighbours, "power": 1.5 if k == 8 else 2.0}
    fast = PathMatchPredictor(L, experts, k, **kw).fit([fit])
    ref = PathMatchReference(L, experts, k, **kw).fit([fit])
    drive(fast, ref, rng, 40, L, experts, k, evict=True, rtol=KERNEL_RTOL if kernel else 1e-12)
    far = np.arange(1, 3 * L + 2)
    np.testing.assert_allclose(fast.scores(far), ref.scores(far), rtol=KERNEL_RTOL if kernel else 1e-12)
    np.testing.assert_array_equal(fast.mem, ref.mem)


def test_wide_layers_rank_with_argpartition_alike():
    # more experts than the Python sort handles: the numpy branch of `predict`
    rng = np.random.default_rng(6)
    fit = random_trace(rng, 40, 2, 64, 4)
    a, b = FrequencyPredictor(2, 64, 4).fit([fit]), FrequencyPredictor(2, 64, 4).fit([fit])
    for _ in range(20):
        for layer in range(2):
            ids = rng.permutation(64)[:4][None]
            a.observe(layer, ids, None)
            b.observe(layer, ids, None)
            same_predictions(a.predict(horizon=2), reference_predict(b, 2, b.top))
