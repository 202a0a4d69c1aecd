"""Counting predictors on synthetic routing where the right answer is known."""

from __future__ import annotations

import numpy as np
import torch
from predict_helpers import make_trace, mapped_trace, random_trace

from prophet.predict import (
    ActivationMatrixPredictor,
    CoOccurrencePredictor,
    FrequencyPredictor,
    Prediction,
    Predictor,
    ReusePredictor,
)
from prophet.predict.evaluate import recall_report


def test_every_predictor_satisfies_the_runtime_protocol():
    for cls in (FrequencyPredictor, ReusePredictor, CoOccurrencePredictor, ActivationMatrixPredictor):
        assert isinstance(cls(4, 8, 2), Predictor)


def test_frequency_ranks_the_popular_experts_of_each_layer_first():
    rng = np.random.default_rng(0)
    tr = random_trace(rng, 200, 3, 8, 2)
    tr.experts[:150, :, 0] = np.array([5, 6, 7])  # experts 5, 6, 7 dominate layers 0, 1, 2
    tr.experts[:150, :, 1] = np.where(tr.experts[:150, :, 1] == tr.experts[:150, :, 0], 0, tr.experts[:150, :, 1])
    p = FrequencyPredictor(3, 8, 2, online=False).fit([tr])
    p.observe(0, torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]]))
    preds = p.predict(horizon=2, top=1)
    assert [(q.layer, q.expert) for q in preds] == [(1, 6), (2, 7)]
    assert all(isinstance(q, Prediction) and 0.0 < q.score <= 1.0 for q in preds)


def test_frequency_learns_online_without_traces():
    p = FrequencyPredictor(2, 4, 1)
    for _ in range(5):
        p.observe(0, np.array([[3]]), np.array([[1.0]]))
        p.observe(1, np.array([[2]]), np.array([[1.0]]))
    assert p.predict(horizon=1, top=1) == [Prediction(2, 3, p.scores([1])[0, 3])]  # layer 0 of the next token


def test_reuse_on_a_constant_sequence_finds_every_expert_of_the_next_token():
    ids = np.tile(np.array([[0, 1], [2, 3], [4, 5]]), (20, 1, 1))  # [20, 3, 2]: every token routes alike
    tr = make_trace(ids, [20], 6)
    rep = recall_report(ReusePredictor(3, 6, 2), tr, distances=[1, 3])
    assert rep["distances"]["3"]["recall@2"] == 1.0  # next token, same layer
    assert rep["distances"]["1"]["recall@2"] >= 1.0 - 1.0 / 20  # all but the first token's later layers


def test_reuse_forgets_the_previous_sequence_on_reset():
    p = ReusePredictor(2, 4, 1)
    p.observe(0, np.array([[3]]), np.array([[1.0]]))
    p.reset()
    assert not p.scores([1, 2]).any()


def test_cooccurrence_recovers_a_deterministic_layer_to_layer_mapping_at_every_hop():
    rng = np.random.default_rng(1)
    tr = mapped_trace(rng, 400, 6, 8, seqs=4)
    p = CoOccurrencePredictor(6, 8, 2, max_distance=4).fit([tr.sequences([0, 1, 2])])
    rep = recall_report(p, tr.sequences([3]), distances=[1, 2, 3, 4])
    for d in "1234":
        assert rep["distances"][d]["recall@2"] == 1.0


def test_cooccurrence_ignores_pairs_whose_alignment_is_not_exact():
    rng = np.random.default_rng(2)
    tr = mapped_trace(rng, 300, 2, 8, seqs=1)
    shifted = tr.experts.copy()
    shifted[:, 1] = np.roll(shifted[:, 1], 1, axis=0)  # layer 1 misaligned by a token, and marked so
    noisy = make_trace(shifted, [300], 8, exact=np.tile([True, False], (300, 1)))
    clean = CoOccurrencePredictor(2, 8, 2, max_distance=1, alpha=0.0).fit([tr])
    both = CoOccurrencePredictor(2, 8, 2, max_distance=1, alpha=0.0).fit([tr, noisy])
    np.testing.assert_allclose(both.table[0, 0], clean.table[0, 0])


def test_activation_matrix_predicts_from_the_matching_kind_of_sequence():
    rng = np.random.default_rng(3)
    low = np.argsort(rng.random((64, 4, 4)), axis=-1)[..., :2]  # sequences of kind A use experts 0-3
    high = low + 4  # kind B uses 4-7
    lib = make_trace(np.concatenate([low[:32], high[:32]]), [32, 32], 8)
    p = ActivationMatrixPredictor(4, 8, 2, matches=1).fit([lib])
    for t in range(3):
        for layer in range(4):
            p.observe(layer, high[32 + t, layer][None], np.full((1, 2), 0.5))
    top = np.argsort(-p.scores([1, 2, 3, 4]), axis=1)[:, :4]
    assert (top >= 4).all()


def test_activation_matrix_adds_finished_sequences_to_its_collection():
    p = ActivationMatrixPredictor(2, 4, 1)
    p.observe(0, np.array([[1]]), np.array([[1.0]]))
    p.reset()
    assert p.library.shape == (1, 2, 4) and p.library[0, 0, 1] == 1.0


def test_batched_observation_scores_the_union_of_the_rows():
    p = ReusePredictor(2, 4, 1)
    p.observe(0, torch.tensor([[1], [2]]), torch.ones(2, 1))
    p.observe(1, torch.tensor([[3], [3]]), torch.ones(2, 1))
    np.testing.assert_array_equal(p.scores([1])[0], [0, 1, 1, 0])
