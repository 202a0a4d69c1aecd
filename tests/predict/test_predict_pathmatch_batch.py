"""Path matching observes and scores a batch in array operations: the same numbers as a per-token loop."""

from __future__ import annotations

import copy

import numpy as np
from predict_helpers import random_trace

from prophet.predict import PathMatchPredictor
from prophet.predict.base import union
from prophet.predict.pathmatch import nearest


def per_token_scores(p: PathMatchPredictor, distances: np.ndarray) -> np.ndarray:
    """The reference: each token's neighbours vote alone, then the batch's union."""
    shifts, layers = np.divmod(p.layer + distances, p.num_layers)
    out = []
    for sim in p.sim:
        m = len(sim)
        n = min(p.neighbours, m)
        top = nearest(sim, n)  # the neighbours, ties as every path breaks them
        w = sim[top] ** p.power
        rows = []
        for s, j in zip(shifts, layers, strict=True):
            r = top
            for _ in range(s):
                r = p.succ[r]
            votes = p.mem[j][:, r] @ w
            rows.append((votes[:-1] + p.prior_votes[j]) / (votes[-1] + p.prior))
        out.append(rows)
    return union(np.asarray(out))


def test_a_batch_matches_a_per_token_loop():
    rng = np.random.default_rng(0)
    fit = random_trace(rng, 200, 4, 8, 2, seqs=4)
    p = PathMatchPredictor(4, 8, 2).fit([fit])
    ref = copy.deepcopy(p)
    rows = [[1, 5], [2], [], [7, 0]]  # uneven rows, one with no valid expert
    for layer in range(3):
        p.observe(layer, _padded(rows), np.ones((4, 2)))
        ref.sim = ref.sim if ref.sim.shape == (4, ref.size) else np.zeros((4, ref.size), np.float32)
        for t, row in enumerate(rows):
            ref.sim[t] = ref.sim[t] * ref.decay + ref.mem[layer, :, : ref.size][row].sum(axis=0)
        np.testing.assert_allclose(p.sim, ref.sim, rtol=1e-6)
    dist = np.arange(1, 6)
    np.testing.assert_allclose(p.scores(dist), per_token_scores(p, dist), rtol=1e-5, atol=1e-7)


def _padded(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), 2), -1)
    for t, row in enumerate(rows):
        out[t, : len(row)] = row
    return out
