"""Trace slicing and the alignment rules the predictors and the harness rely on."""

from __future__ import annotations

import numpy as np
import pytest
from predict_helpers import make_trace

from prophet.errors import ConfigError
from prophet.predict.data import RouterTrace, multi_hot


def test_multi_hot_ignores_unrecorded_ids():
    np.testing.assert_array_equal(multi_hot(np.array([[2, -1], [0, 3]]), 4), [[0, 0, 1, 0], [1, 0, 0, 1]])


def test_pairs_stay_inside_a_sequence_and_skip_inexact_or_missing_rows():
    experts = np.arange(5 * 2 * 1).reshape(5, 2, 1) % 4
    experts[3, 0] = -1  # token 3's layer 0 was not recorded
    exact = np.ones((5, 2), bool)
    exact[1, 1] = False
    tr = make_trace(experts, [3, 2], 4, exact=exact)
    src_row, src_layer, dst_row, dst_layer = tr.pairs(1)
    got = set(zip(src_row.tolist(), src_layer.tolist(), dst_row.tolist(), dst_layer.tolist(), strict=True))
    # (0,0)->(0,1); (0,1)->(1,0); (1,0)->(1,1) inexact; (1,1) inexact source; (2,0)->(2,1); (2,1) ends seq 0;
    # (3,0) missing; (3,1)->(4,0); (4,0)->(4,1); (4,1) ends the trace
    assert got == {(0, 0, 0, 1), (0, 1, 1, 0), (2, 0, 2, 1), (3, 1, 4, 0), (4, 0, 4, 1)}
    nxt = tr.pairs(2)  # the same layer of the next token
    assert set(zip(nxt[0].tolist(), nxt[2].tolist(), strict=True)) == {(0, 1), (1, 2), (3, 4)}


def test_sequences_selects_and_reorders_whole_sequences():
    tr = make_trace(np.arange(6).reshape(6, 1, 1), [2, 3, 1], 6)
    sub = tr.sequences([2, 0])
    assert sub.experts[:, 0, 0].tolist() == [5, 0, 1] and sub.seq_offsets.tolist() == [0, 1, 3]


def test_a_trace_with_inconsistent_arrays_is_refused():
    with pytest.raises(ConfigError, match="exact"):
        RouterTrace(np.zeros((2, 3, 1), np.int64), np.zeros((2, 3, 1), np.float32), np.array([0, 2]),
                    np.ones((2, 2), bool), num_experts=4)
    with pytest.raises(ConfigError, match="num_experts"):
        make_trace(np.full((2, 1, 1), 7), [2], 4)
