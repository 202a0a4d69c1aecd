"""Bad input raises `TraceError` naming the file and the problem; nothing is read partially."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from trace_helpers import make_trace, random_trace, tiny_mixtral

import prophet.trace as pt
from prophet.errors import ProphetError, TraceError
from prophet.trace import TraceModel


@pytest.fixture
def saved(tmp_path) -> Path:
    return random_trace(np.random.default_rng(0), n=30, layers=3, experts=8, k=2).save(tmp_path / "t")


def rewrite_array(path: Path, name: str, arr: np.ndarray) -> None:
    """Replace one array and fix its header entry, as a buggy writer (not a damaged disk) would."""
    np.save(path / f"{name}.npy", arr)
    header = json.loads((path / "header.json").read_text())
    header["arrays"][name].update(shape=list(arr.shape), dtype=arr.dtype.str, crc32=zlib.crc32(arr.tobytes()))
    (path / "header.json").write_text(json.dumps(header))


def edit_header(path: Path, **changes) -> None:
    header = json.loads((path / "header.json").read_text())
    for key, value in changes.items():
        target = header
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    (path / "header.json").write_text(json.dumps(header))


def test_trace_error_is_a_prophet_error():
    assert issubclass(TraceError, ProphetError)


def test_missing_path(tmp_path):
    with pytest.raises(TraceError, match=r"nope.*no such file"):
        pt.load(tmp_path / "nope")


def test_missing_array_file(saved):
    (saved / "weights.npy").unlink()
    with pytest.raises(TraceError, match=r"weights\.npy: missing"):
        pt.load(saved)


def test_truncated_array(saved):
    data = (saved / "experts.npy").read_bytes()
    (saved / "experts.npy").write_bytes(data[:-7])
    with pytest.raises(TraceError, match=r"experts\.npy: truncated or corrupt"):
        pt.load(saved)


def test_truncated_npy_header(saved):
    (saved / "phase.npy").write_bytes((saved / "phase.npy").read_bytes()[:20])
    with pytest.raises(TraceError, match=r"phase\.npy: truncated or corrupt"):
        pt.load(saved)


def test_corrupted_bytes_fail_the_checksum(saved):
    data = bytearray((saved / "weights.npy").read_bytes())
    data[-5] ^= 0xFF
    (saved / "weights.npy").write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"weights\.npy: checksum mismatch"):
        pt.load(saved)
    assert len(pt.load(saved, verify=False)) == 30  # the caller may opt out of the CRC pass


def test_trailing_bytes(saved):
    with open(saved / "token_ids.npy", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(TraceError, match=r"token_ids\.npy: 8 bytes more"):
        pt.load(saved)


def test_unknown_version(saved):
    edit_header(saved, version=99)
    with pytest.raises(TraceError, match=r"header\.json: format version 99 is unknown"):
        pt.load(saved)


def test_corrupt_header(saved):
    (saved / "header.json").write_text('{"format": "prophet-trace", "vers')
    with pytest.raises(TraceError, match=r"header\.json: header is corrupt"):
        pt.load(saved)


def test_not_a_trace_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(TraceError, match="not a Prophet trace"):
        pt.load(tmp_path / "d")


def test_unfinished_recording(tmp_path):
    model = TraceModel("w", "test", num_layers=1, num_experts=4, top_k=1)
    writer = pt.TraceWriter(tmp_path / "t", model)
    writer.append(np.zeros(1), np.zeros((1, 1, 1), np.int16), np.ones((1, 1, 1), np.float32))
    with pytest.raises(TraceError, match="recording was not finished"):
        pt.load(tmp_path / "t")
    writer.close()
    assert len(pt.load(tmp_path / "t")) == 1


def test_expert_id_out_of_range(saved):
    ex = np.array(pt.load(saved).experts)
    ex[17, 2, 1] = 8
    ex[17, 2, 0] = 0
    rewrite_array(saved, "experts", ex)
    with pytest.raises(TraceError, match=r"expert id 8 at token 17, layer 2 is out of range for 8 experts"):
        pt.load(saved)


def test_negative_expert_id_other_than_minus_one(saved):
    ex = np.array(pt.load(saved).experts)
    ex[3, 0, 0] = -5
    rewrite_array(saved, "experts", ex)
    with pytest.raises(TraceError, match="expert id -5"):
        pt.load(saved)


def test_same_expert_twice_in_a_row(saved):
    ex = np.array(pt.load(saved).experts)
    ex[4, 1] = [3, 3]
    rewrite_array(saved, "experts", ex)
    with pytest.raises(TraceError, match=r"token 4, layer 1 selects the same expert twice"):
        pt.load(saved)


def test_top_k_contradicting_the_header(saved):
    edit_header(saved, model__top_k=3)
    with pytest.raises(TraceError, match=r"experts has shape \[30, 3, 2\] but the model says \[30, 3, 3\]"):
        pt.load(saved)


def test_layer_count_contradicting_the_header(saved):
    edit_header(saved, model__num_layers=4)
    with pytest.raises(TraceError, match=r"L=4 MoE layers"):
        pt.load(saved)


def test_header_counts_contradicting_the_arrays(saved):
    edit_header(saved, num_tokens=31)
    with pytest.raises(TraceError, match="header counts 31 tokens"):
        pt.load(saved)


def test_bad_sequence_offsets(saved):
    rewrite_array(saved, "seq_offsets", np.array([0, 20, 10, 30], np.int64))
    edit_header(saved, num_sequences=3)
    with pytest.raises(TraceError, match="seq_offsets must rise"):
        pt.load(saved)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("num_layers", 4, "num_layers=3 in the trace contradicts num_layers=4"),
        ("top_k", 1, "top_k=2 in the trace"),
        ("num_experts", 16, "num_experts=8"),
    ],
)
def test_trace_contradicting_the_model(saved, field, value, words):
    model = {"name": "m", "model_type": "test", "num_layers": 3, "num_experts": 8, "top_k": 2, field: value}
    with pytest.raises(TraceError, match=words):
        pt.load(saved, model=TraceModel(**model))


def test_trace_contradicting_a_live_model(tiny_trace_path):
    model = tiny_mixtral(layers=2)  # the tiny trace has 4 MoE layers
    with pytest.raises(TraceError, match=r"tiny-mixtral: num_layers=4 in the trace contradicts num_layers=2"):
        pt.load(tiny_trace_path, model=model)


def test_in_memory_trace_is_validated_too():
    with pytest.raises(TraceError, match="out of range"):
        make_trace([[[0, 9]]], num_experts=8)


# -- converted formats ----------------------------------------------------------------------------------------


def test_corrupt_npz(tmp_path, shared_traces):
    src = shared_traces / "mixtral-8x7b_humaneval_decode.npz"
    dst = tmp_path / "m.npz"
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    with pytest.raises(TraceError, match=r"m\.npz: truncated or corrupt npz"):
        pt.load(dst)


def test_npz_without_its_json_needs_the_expert_count(tmp_path, shared_traces):
    dst = tmp_path / "m.npz"
    shutil.copy(shared_traces / "mixtral-8x7b_humaneval_decode.npz", dst)
    with pytest.raises(TraceError, match="pass num_experts="):
        pt.load(dst)
    assert pt.load(dst, num_experts=8).num_experts == 8


def test_npz_contradicting_its_json(tmp_path, shared_traces):
    dst = tmp_path / "m.npz"
    shutil.copy(shared_traces / "mixtral-8x7b_humaneval_decode.npz", dst)
    info = json.loads((shared_traces / "mixtral-8x7b_humaneval_decode.json").read_text())
    dst.with_suffix(".json").write_text(json.dumps({**info, "top_k": 3}))
    with pytest.raises(TraceError, match="says top_k=3, the arrays hold 2"):
        pt.load(dst)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {
    "dataset": "d",
    "problem_id": 0,
    "layer": 0,
    "token_idx": 0,
    "experts": [1, 2],
    "gating_probs": [0.6, 0.4],
}


def test_jsonl_bad_line_is_named(tmp_path):
    p = _jsonl(tmp_path / "r.jsonl", [ROW])
    with open(p, "a") as f:
        f.write('{"layer": 1, "experts": [1,\n')
    with pytest.raises(TraceError, match=r"r\.jsonl:2: not valid JSON"):
        pt.load(p)


def test_jsonl_missing_key(tmp_path):
    row = {k: v for k, v in ROW.items() if k != "gating_probs"}
    with pytest.raises(TraceError, match=r"r\.jsonl:1: a row needs keys"):
        pt.load(_jsonl(tmp_path / "r.jsonl", [row]))


def test_jsonl_top_k_changing_between_rows(tmp_path):
    rows = [ROW, {**ROW, "token_idx": 1, "experts": [1, 2, 3], "gating_probs": [0.5, 0.3, 0.2]}]
    with pytest.raises(TraceError, match=r"r\.jsonl:2: 3 experts .* top_k=2"):
        pt.load(_jsonl(tmp_path / "r.jsonl", rows))


def test_jsonl_duplicate_row(tmp_path):
    with pytest.raises(TraceError, match="layer 0, token_idx 0 appears more than once"):
        pt.load(_jsonl(tmp_path / "r.jsonl", [ROW, ROW]))


def test_jsonl_expert_out_of_range(tmp_path):
    with pytest.raises(TraceError, match="expert id 2 is out of range for 2 experts"):
        pt.load(_jsonl(tmp_path / "r.jsonl", [ROW]), num_experts=2)


def test_unknown_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(TraceError, match="unknown trace format"):
        pt.load(tmp_path / "x.csv")
