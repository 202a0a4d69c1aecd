"""Predictors stay bounded however long they run, and `reset` starts a sequence afresh (issue 13, item 6)."""

import copy

import numpy as np
import pytest
import torch
from predict_helpers import random_trace
from torch import nn

from prophet.errors import ConfigError
from prophet.predict import (
    ActivationMatrixPredictor,
    CoOccurrencePredictor,
    EnsemblePredictor,
    FrequencyPredictor,
    MLPPredictor,
    PathMatchPredictor,
    ReusePredictor,
    RouterLookahead,
)

L, E, K = 3, 6, 2


def _feed(predictor, trace, rows) -> list:
    """Observe ``rows`` of ``trace`` token by token (all layers); the predictions after each step."""
    out = []
    for t in rows:
        for layer in range(L):
            hidden = torch.full((1, 4), float(trace.experts[t, layer, 0]))
            predictor.observe(layer, torch.as_tensor(trace.experts[t, layer][None]), torch.ones(1, K), hidden)
            out.append(predictor.predict(horizon=L + 1))
    return out


def _routers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, E, bias=False) for _ in range(L)]


# Each predictor with what it learns across sequences switched off, so that after `reset` it must behave
# exactly like a copy that never saw the earlier sequence.
PER_SEQUENCE = {
    "frequency": lambda: FrequencyPredictor(L, E, K, online=False),
    "reuse": lambda: ReusePredictor(L, E, K, decay=0.5),
    "cooccurrence": lambda: CoOccurrencePredictor(L, E, K, order=2),
    "activation_matrix": lambda: ActivationMatrixPredictor(L, E, K, learn_online=False),
    "pathmatch": lambda: PathMatchPredictor(L, E, K, online=False),
    "mlp": lambda: MLPPredictor(L, E, K, epochs=1, hidden_size=8),
    "router": lambda: RouterLookahead(_routers(), E, K, fallback=ReusePredictor(L, E, K)),
    "ensemble": lambda: EnsemblePredictor([ReusePredictor(L, E, K), CoOccurrencePredictor(L, E, K)]),
}


@pytest.mark.parametrize("name", sorted(PER_SEQUENCE))
def test_reset_forgets_the_sequence(name):
    trace = random_trace(np.random.default_rng(1), tokens=40, layers=L, experts=E, k=K, seqs=2)
    fitted = PER_SEQUENCE[name]().fit([trace])
    fresh = copy.deepcopy(fitted)
    _feed(fitted, trace, range(0, 20))  # another sequence first
    fitted.reset()
    assert fitted.layer == -1 and fitted.tokens == 0
    assert _feed(fitted, trace, range(20, 30)) == _feed(fresh, trace, range(20, 30))


def test_pathmatch_online_memory_is_a_window_of_the_latest_tokens():
    rng = np.random.default_rng(2)
    fit, stream = random_trace(rng, 30, L, E, K), random_trace(rng, 400, L, E, K, seqs=8)
    bounded = PathMatchPredictor(L, E, K, max_online=64).fit([fit])
    unbounded = PathMatchPredictor(L, E, K, max_online=10**6).fit([fit])
    for s in range(8):
        rows = range(stream.seq_offsets[s], stream.seq_offsets[s + 1])
        _feed(bounded, stream, rows)
        _feed(unbounded, stream, rows)
        bounded.reset()
        unbounded.reset()
        online = bounded.size - bounded.fitted
        assert bounded.fitted == 30 and online <= 64
        assert bounded.mem.shape[2] <= 2 * (30 + 64) + 1  # capacity stays bounded too
        # the kept online rows are exactly the unbounded memory's newest ones, links included
        tail = slice(unbounded.size - online, unbounded.size)
        np.testing.assert_array_equal(bounded.mem[:, :, 30 : bounded.size], unbounded.mem[:, :, tail])
        shift = unbounded.size - bounded.size
        for links_b, links_u in ((bounded.succ, unbounded.succ), (bounded.pred, unbounded.pred)):
            want = links_u[tail] - shift
            want[want < 30] = -1  # links into dropped rows end
            np.testing.assert_array_equal(links_b[30 : bounded.size], want)
    assert unbounded.size - unbounded.fitted == 400


def test_pathmatch_predictions_stay_valid_after_the_window_slides():
    rng = np.random.default_rng(3)
    pm = PathMatchPredictor(L, E, K, max_online=8)
    for preds in _feed(pm, random_trace(rng, 100, L, E, K), range(100)):
        assert all(0.0 <= p.score <= 1.0 + 1e-9 and 0 <= p.expert < E for p in preds)
    assert pm.size <= 8


def test_activation_matrix_library_keeps_fitted_and_the_latest_sequences():
    rng = np.random.default_rng(4)
    am = ActivationMatrixPredictor(L, E, K, max_online=3).fit([random_trace(rng, 20, L, E, K, seqs=2)])
    stream = random_trace(rng, 60, L, E, K, seqs=10)
    for s in range(10):
        _feed(am, stream, range(stream.seq_offsets[s], stream.seq_offsets[s + 1]))
        am.reset()
        assert len(am.library) <= 2 + 3
    assert am.fitted == 2 and len(am.library) == 5


@pytest.mark.parametrize("cls", [PathMatchPredictor, ActivationMatrixPredictor], ids=["pathmatch", "activation_matrix"])
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "16"], ids=["zero", "negative", "fraction", "bool", "text"])
def test_a_bad_budget_is_refused(cls, bad):
    with pytest.raises(ConfigError, match="max_online"):
        cls(L, E, K, max_online=bad)
