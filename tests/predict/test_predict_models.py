"""Path matching, the MLP, the ensemble and the oracle on synthetic routing with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from predict_helpers import make_trace, mapped_trace, random_trace

from prophet.errors import ConfigError
from prophet.predict import (
    EnsemblePredictor,
    MLPPredictor,
    OraclePredictor,
    PathMatchPredictor,
    Predictor,
    RouterTrace,
    RoutingPredictor,
)
from prophet.predict.evaluate import recall_report


def typed_trace(rng: np.random.Generator, tokens: int, layers: int, seqs: int) -> RouterTrace:
    """Tokens of 10 kinds, each with its own fixed top-2 path over 8 experts; layer 0 tells kinds apart."""
    pairs = [(a, b) for a in range(8) for b in range(a + 1, 8)]
    first = rng.choice(len(pairs), 10, replace=False)
    paths = np.array([[pairs[first[k]]] + [pairs[i] for i in rng.integers(0, len(pairs), layers - 1)] for k in range(10)])
    kinds = rng.integers(0, 10, tokens)
    lengths = [len(a) for a in np.array_split(np.arange(tokens), seqs)]
    return make_trace(paths[kinds], lengths, 8)


def test_pathmatch_follows_a_path_once_its_first_layer_identifies_it():
    rng = np.random.default_rng(0)
    tr = typed_trace(rng, 300, 5, seqs=3)
    p = PathMatchPredictor(5, 8, 2, online=False).fit([tr.sequences([0, 1])])
    rep = recall_report(p, tr.sequences([2]), distances=[1, 2, 3, 4])
    for d in "1234":
        assert rep["distances"][d]["recall@2"] == 1.0


def test_pathmatch_learns_the_running_sequence_online():
    rng = np.random.default_rng(1)
    tr = typed_trace(rng, 200, 4, seqs=1)
    online = recall_report(PathMatchPredictor(4, 8, 2), tr, distances=[1])["distances"]["1"]["recall@2"]
    offline = recall_report(PathMatchPredictor(4, 8, 2, online=False), tr, distances=[1])["distances"]["1"]["recall@2"]
    assert offline < 0.5 < 0.9 < online  # nothing fitted: only what it has seen of this sequence helps


def test_mlp_learns_a_deterministic_layer_mapping():
    rng = np.random.default_rng(2)
    tr = mapped_trace(rng, 240, 2, 8, seqs=3)
    p = MLPPredictor(2, 8, 2, window=1, hidden_size=32, max_distance=1, epochs=20, lr=1e-2).fit([tr.sequences([0, 1])])
    rep = recall_report(p, tr.sequences([2]), distances=[1])
    assert rep["distances"]["1"]["recall@2"] >= 0.95


def test_mlp_training_is_reproducible():
    rng = np.random.default_rng(3)
    tr = random_trace(rng, 40, 3, 8, 2)
    a = MLPPredictor(3, 8, 2, epochs=2).fit([tr])
    b = MLPPredictor(3, 8, 2, epochs=2).fit([tr])
    np.testing.assert_array_equal(a.w2, b.w2)


class Fixed(RoutingPredictor):
    """Scores that never change: for checking combination arithmetic."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__(2, len(scores), 1)
        self.fixed = np.asarray(scores)

    def _observe(self, layer, ids, weights, hidden) -> None:
        pass

    def _scores(self, distances, shifts, layers):
        return np.tile(self.fixed, (len(distances), 1))


def test_ensemble_is_the_weighted_mean_of_its_members():
    e = EnsemblePredictor([Fixed([1.0, 0.0, 0.5]), Fixed([0.0, 1.0, 0.5])], weights=[3, 1])
    assert isinstance(e, Predictor)
    e.observe(0, np.array([[0]]), np.array([[1.0]]))
    np.testing.assert_allclose(e.scores([1, 2]), [[0.75, 0.25, 0.5]] * 2)


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0]])
def test_ensemble_rejects_weights_that_do_not_fit_its_members(weights):
    with pytest.raises(ConfigError, match="weight"):
        EnsemblePredictor([Fixed([1.0]), Fixed([0.0])], weights=weights)


def test_oracle_finds_everything_at_every_distance():
    rng = np.random.default_rng(4)
    tr = random_trace(rng, 60, 4, 8, 2, seqs=3)
    rep = recall_report(OraclePredictor(tr), tr, distances=[1, 2, 3, 4])
    assert {d: v["recall@2"] for d, v in rep["distances"].items()} == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0}


def test_oracle_refuses_a_stream_that_is_not_its_trace():
    rng = np.random.default_rng(5)
    tr = random_trace(rng, 5, 2, 8, 2)
    oracle = OraclePredictor(tr)
    wrong = (tr.experts[0, 0] + 1) % 8
    with pytest.raises(ConfigError, match="feed it the trace"):
        oracle.observe(0, wrong[None], np.ones((1, 2)))


def test_predictions_name_next_token_layers_past_the_last_layer():
    p = Fixed([0.9, 0.1])
    p.observe(1, np.array([[0]]), np.array([[1.0]]))  # last layer of a 2-layer model
    assert [(q.layer, q.expert) for q in p.predict(horizon=2, top=1)] == [(2, 0), (3, 0)]
