"""The on-disk format: round trips, memory-mapped reads, selection by sequence, the streaming writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trace_helpers import make_trace, random_trace

import prophet.trace as pt
from prophet.errors import TraceError
from prophet.trace import SketchInfo, Trace, TraceModel, TraceWriter


def assert_same(a: Trace, b: Trace) -> None:
    assert a.model == b.model
    for name, arr in a.arrays().items():
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(b.arrays()[name]), err_msg=name)
    np.testing.assert_array_equal(a.seq_offsets, b.seq_offsets)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    layers=st.integers(1, 4),
    experts=st.integers(2, 40),
    data=st.data(),
)
def test_save_load_round_trip_is_exact(tmp_path_factory, n, layers, experts, data):
    k = data.draw(st.integers(1, min(experts, 6)))
    seqs = data.draw(st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    trace = random_trace(rng, n=n, layers=layers, experts=experts, k=k, seqs=seqs)
    unrecorded = rng.random(trace.weights.shape) < 0.2
    trace.experts[unrecorded], trace.weights[unrecorded] = -1, np.nan  # NaN payloads of unrecorded ids survive too
    path = trace.save(tmp_path_factory.mktemp("t") / "trace")
    again = pt.load(path)
    assert_same(trace, again)
    assert len(again) == n and again.num_sequences == seqs


def test_load_memory_maps_arrays(tmp_path):
    trace = random_trace(np.random.default_rng(0))
    again = pt.load(trace.save(tmp_path / "t"))
    assert isinstance(again.experts, np.memmap) and not again.experts.flags.writeable
    part = again.sequences(slice(0, 2))
    assert isinstance(part.experts, np.memmap)  # a contiguous slice stays a view of the file


def test_sketch_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    base = random_trace(rng, n=20, layers=2)
    sketch = rng.standard_normal((20, 2, 4)).astype(np.float16)
    trace = Trace(
        base.model, base.experts, base.weights, base.seq_offsets, sketch=sketch, sketch_info=SketchInfo(4, 7)
    )
    again = pt.load(trace.save(tmp_path / "t"))
    np.testing.assert_array_equal(again.sketch, sketch)
    assert again.sketch_info == SketchInfo(4, 7)


def test_sequences_selects_whole_sequences_in_the_given_order():
    trace = make_trace(np.arange(10, dtype=np.int16).reshape(10, 1, 1) % 8, [0, 3, 3, 7, 10])
    part = trace.sequences([3, 0])
    assert part.seq_offsets.tolist() == [0, 3, 6]
    assert part.experts[:, 0, 0].tolist() == [7 % 8, 8 % 8, 9 % 8, 0, 1, 2]
    assert len(trace.sequences(1)) == 0  # the empty sequence
    assert trace.sequences(-1).experts[:, 0, 0].tolist() == [7 % 8, 0, 1]
    with pytest.raises(IndexError):
        trace.sequences(4)


def test_split_partitions_sequences_without_overlap():
    rng = np.random.default_rng(2)
    trace = random_trace(rng, n=100, seqs=10)
    train, test = trace.split([0.7, 0.3], seed=3)
    assert train.num_sequences == 7 and test.num_sequences == 3
    assert len(train) + len(test) == len(trace)
    seen = np.concatenate([train.token_ids, test.token_ids])
    assert sorted(seen.tolist()) == sorted(trace.token_ids.tolist())
    ordered = trace.split([0.5, 0.5])
    assert ordered[0].seq_offsets.tolist() == trace.seq_offsets[:6].tolist()
    with pytest.raises(ValueError):
        trace.split([0.8, 0.8])


def test_writer_groups_interleaved_sequences_in_time_order(tmp_path, monkeypatch):
    # a tiny copy block forces the reorder through many blocks
    monkeypatch.setattr("prophet.trace.format._BLOCK_BYTES", 16)
    model = TraceModel("w", "test", num_layers=2, num_experts=8, top_k=1)
    with TraceWriter(tmp_path / "t", model) as w:
        for step in range(5):  # three rows decoding side by side; row ids 7, 3, 9
            seq = np.array([7, 3, 9])
            ex = np.array([[[step], [0]], [[step + 1], [1]], [[step + 2], [2]]], dtype=np.int16)
            w.append(seq, ex, np.ones((3, 2, 1), np.float32), token_ids=seq * 100 + step)
    trace = pt.load(tmp_path / "t")
    assert trace.seq_offsets.tolist() == [0, 5, 10, 15]
    assert trace.token_ids.tolist() == [
        700,
        701,
        702,
        703,
        704,
        300,
        301,
        302,
        303,
        304,
        900,
        901,
        902,
        903,
        904,
    ]
    assert trace.experts[5:10, 0, 0].tolist() == [1, 2, 3, 4, 5]
    assert not (tmp_path / "t" / ".staging").exists()


def test_writer_rejects_wrong_shapes(tmp_path):
    model = TraceModel("w", "test", num_layers=2, num_experts=8, top_k=2)
    with pytest.raises(TraceError, match="experts of shape"):
        with TraceWriter(tmp_path / "t", model) as w:
            w.append(np.zeros(1), np.zeros((1, 3, 2), np.int16), np.zeros((1, 3, 2), np.float32))
    assert not (tmp_path / "t" / "header.json").exists()  # an aborted writer leaves no trace behind


def test_save_refuses_to_overwrite_unless_asked_and_never_foreign_directories(tmp_path):
    trace = random_trace(np.random.default_rng(4))
    trace.save(tmp_path / "t")
    with pytest.raises(TraceError, match="overwrite=True"):
        trace.save(tmp_path / "t")
    trace.sequences(slice(0, 1)).save(tmp_path / "t", overwrite=True)
    assert pt.load(tmp_path / "t").num_sequences == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TraceError, match="not a trace"):
        trace.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()


def test_header_records_version_model_and_checksums(tmp_path):
    trace = random_trace(np.random.default_rng(5))
    header = json.loads((trace.save(tmp_path / "t") / "header.json").read_text())
    assert header["format"] == "prophet-trace" and header["version"] == pt.FORMAT_VERSION
    assert header["model"]["num_experts"] == 8 and header["model"]["top_k"] == 2
    assert set(header["arrays"]) == {"experts", "weights", "seq_offsets", "token_ids", "phase", "exact"}
    assert all(isinstance(e["crc32"], int) for e in header["arrays"].values())
