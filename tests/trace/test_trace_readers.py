"""Converters: the neutral npz of the shared real traces and vLLM-style JSONL rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

import prophet.trace as pt
from prophet.trace import Phase


@pytest.mark.parametrize(
    "name, shape, sequences, phase",
    [
        ("mixtral-8x7b_humaneval_decode", (338, 32, 2), 2, Phase.DECODE),
        ("flame-moe-290m_prefill", (2048, 8, 6), 32, Phase.PREFILL),
    ],
)
def test_reads_the_shared_neutral_traces(shared_traces, name, shape, sequences, phase):
    trace = pt.load(shared_traces / f"{name}.npz")
    raw = np.load(shared_traces / f"{name}.npz")
    assert trace.experts.shape == shape and trace.num_sequences == sequences
    np.testing.assert_array_equal(trace.experts, raw["experts"])
    np.testing.assert_array_equal(trace.exact, raw["exact"])
    assert (trace.phase == phase).all()
    assert trace.num_experts == json.loads((shared_traces / f"{name}.json").read_text())["num_experts"]


def test_neutral_trace_converts_to_the_prophet_format(shared_traces, tmp_path):
    trace = pt.load(shared_traces / "mixtral-8x7b_humaneval_decode.npz")
    again = pt.load(trace.save(tmp_path / "m"))
    np.testing.assert_array_equal(again.experts, trace.experts)
    np.testing.assert_array_equal(again.weights, trace.weights)  # NaN where the source has gaps
    assert again.meta["converted_from"].endswith("mixtral-8x7b_humaneval_decode.npz")


def test_reads_vllm_jsonl_rows_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    lengths = {
        ("humaneval", 0): 5,
        ("humaneval", 1): 3,
        ("gsm8k", 0): 4,
    }  # problem ids repeat across datasets
    truth = {}
    rows = []
    for (ds, pid), n in lengths.items():
        for layer in range(3):
            for t in range(n):
                ex = rng.choice(8, 2, replace=False).tolist()
                truth[ds, pid, layer, t] = ex
                rows.append(
                    {
                        "dataset": ds,
                        "problem_id": pid,
                        "layer": layer,
                        "experts": ex,
                        "gating_probs": [0.7, 0.3],
                        "token_idx": t,
                    }
                )
    order = rng.permutation(len(rows))
    path = tmp_path / "routing.jsonl"
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    trace = pt.load(path, num_experts=8)
    assert trace.num_sequences == 3 and trace.num_layers == 3 and trace.top_k == 2
    keys = [(s["dataset"], s["problem_id"]) for s in trace.meta["sequences"]]
    for s, key in enumerate(keys):
        seq = trace.sequences(s)
        assert len(seq) == lengths[key]
        for layer in range(3):
            for t in range(lengths[key]):
                assert seq.experts[t, layer].tolist() == truth[(*key, layer, t)]
    assert trace.exact.all()
    assert np.allclose(trace.weights, [0.7, 0.3])


def test_jsonl_missing_rows_become_gaps_and_mark_the_layer_inexact(tmp_path):
    rows = [
        {"problem_id": 0, "layer": layer, "token_idx": t, "experts": [t % 4], "gating_probs": [1.0]}
        for layer in range(2)
        for t in range(4)
        if not (layer == 1 and t == 2)  # the recorder lost one row
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = pt.load(path)
    assert trace.num_experts == 4  # largest id + 1
    assert trace.experts[:, 1, 0].tolist() == [0, 1, -1, 3]
    assert np.isnan(trace.weights[2, 1, 0])
    assert trace.exact[:, 0].all() and not trace.exact[:, 1].any()
