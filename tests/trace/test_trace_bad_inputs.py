"""Every way a trace file can be wrong is refused with a `TraceError` naming the file; nothing is cast silently
(issue 13, items 4 and 8). One named case per bad input, for each format `prophet.trace.load` reads."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from trace_helpers import random_trace

import prophet.trace as pt
from prophet.errors import TraceError

N, L, K, E = 12, 3, 2, 8


# ---- the neutral NAME.npz (+ NAME.json) format -------------------------------------------------------------------


def neutral_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((N, L, E)), axis=-1)[..., :K].astype(np.int16)
    return {
        "experts": experts,
        "weights": rng.random((N, L, K)).astype(np.float32),
        "seq_offsets": np.array([0, 5, N], np.int64),
        "token_ids": np.arange(N, dtype=np.int64),
        "exact": np.ones((N, L), bool),
    }


def _set(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict, dict], None]:
    def edit(arrays: dict, info: dict) -> None:
        arrays[name] = make(arrays[name].copy())

    return edit


def _at(name: str, value: object, dtype: object = None) -> Callable[[dict, dict], None]:
    """Put ``value`` at ``[0, 0, 0]`` of array ``name`` (converted to ``dtype`` first)."""

    def make(a: np.ndarray) -> np.ndarray:
        a = a.astype(dtype) if dtype is not None else a
        a[(0,) * a.ndim] = value
        return a

    return _set(name, make)


def _info(**changes: object) -> Callable[[dict, dict], None]:
    return lambda arrays, info: info.update(changes)


def _drop(name: str) -> Callable[[dict, dict], None]:
    return lambda arrays, info: arrays.pop(name)


BAD_NPZ: dict[str, Callable[[dict, dict], None]] = {
    # expert ids: only integers in [-1, E); nothing rounded, parsed or wrapped
    "id 4.7 (float ids)": _at("experts", 4.7, np.float32),
    "id 4.0 (integral floats are still floats)": _set("experts", lambda a: a.astype(np.float64)),
    "id '3' (text ids)": _set("experts", lambda a: a.astype(str)),
    "id 65541 (wraps to 5 in int16)": _at("experts", 65541, np.int32),
    "id -32768 (int16 minimum)": _at("experts", -32768),
    "id E (one past the last expert)": _at("experts", E),
    "id -2 (only -1 means not recorded)": _at("experts", -2),
    "id 2**40 in int64": _at("experts", 2**40, np.int64),
    "ids as booleans": _set("experts", lambda a: a > 3),
    "ids as complex numbers": _set("experts", lambda a: a.astype(np.complex64)),
    "same expert twice in a row": _set("experts", lambda a: np.concatenate([a[..., :1], a[..., :1]], -1)),
    "experts 2-D": _set("experts", lambda a: a[:, 0]),
    "experts 4-D": _set("experts", lambda a: a[..., None]),
    "experts with top_k 0": _set("experts", lambda a: a[..., :0]),
    "experts with no layers": _set("experts", lambda a: a[:, :0]),
    # router weights: floating, finite where an expert is recorded
    "weight NaN where recorded": _at("weights", np.nan),
    "weight +inf": _at("weights", np.inf),
    "weight -inf": _at("weights", -np.inf),
    "weights as integers": _set("weights", lambda a: (a * 10).astype(np.int32)),
    "weights as text": _set("weights", lambda a: a.astype(str)),
    "weights of another shape": _set("weights", lambda a: a[:, :, :1]),
    "weights one token short": _set("weights", lambda a: a[:-1]),
    # sequence offsets
    "seq_offsets as floats": _set("seq_offsets", lambda a: a.astype(np.float64)),
    "seq_offsets falling": _set("seq_offsets", lambda a: np.array([0, 9, 4, N], np.int64)),
    "seq_offsets not ending at N": _set("seq_offsets", lambda a: np.array([0, 5, N - 1], np.int64)),
    "seq_offsets not starting at 0": _set("seq_offsets", lambda a: np.array([2, 5, N], np.int64)),
    "seq_offsets 2-D": _set("seq_offsets", lambda a: a[None]),
    "seq_offsets empty": _set("seq_offsets", lambda a: a[:0]),
    # token ids and exactness
    "token_ids as floats": _set("token_ids", lambda a: a + 0.5),
    "token_ids as text": _set("token_ids", lambda a: a.astype(str)),
    "token_ids of another length": _set("token_ids", lambda a: a[:-2]),
    "exact as 0/1 integers": _set("exact", lambda a: a.astype(np.int8)),
    "exact as floats": _set("exact", lambda a: a.astype(np.float32)),
    "exact of another shape": _set("exact", lambda a: a[:, :1]),
    # missing arrays
    "no experts": _drop("experts"),
    "no weights": _drop("weights"),
    "no seq_offsets": _drop("seq_offsets"),
    "no token_ids": _drop("token_ids"),
    "no exact": _drop("exact"),
    # empty
    "zero tokens": lambda arrays, info: arrays.update(
        {k: v[:0] for k, v in arrays.items() if k != "seq_offsets"}, seq_offsets=np.zeros(1, np.int64)
    ),
    # the JSON beside it
    "num_experts as text": _info(num_experts="8"),
    "num_experts a fraction": _info(num_experts=8.5),
    "num_experts zero": _info(num_experts=0),
    "num_experts negative": _info(num_experts=-8),
    "num_experts true": _info(num_experts=True),
    "num_experts below the ids": _info(num_experts=4),
    "num_experts past int16": _info(num_experts=40000),
    "json says other layers": _info(layers=L + 1),
    "json says other top_k": _info(top_k=K + 1),
    "json says other tokens": _info(tokens=N * 2),
}


@pytest.mark.parametrize("case", list(BAD_NPZ), ids=list(BAD_NPZ))
def test_bad_npz_is_refused(tmp_path, case):
    arrays, info = neutral_arrays(), {"model": "m", "num_experts": E, "phase": "decode"}
    BAD_NPZ[case](arrays, info)
    path = tmp_path / "t.npz"
    np.savez(path, **arrays)
    (tmp_path / "t.json").write_text(json.dumps(info))
    with pytest.raises(TraceError, match="t.npz|t.json"):
        pt.load(path)


def test_the_unchanged_npz_loads(tmp_path):
    np.savez(tmp_path / "t.npz", **neutral_arrays())
    (tmp_path / "t.json").write_text(json.dumps({"num_experts": E}))
    assert len(pt.load(tmp_path / "t.npz")) == N


# name -> file contents or a write of the files, for npz files that are not what they claim
def _no_json(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", **neutral_arrays())


def _bad_json(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", **neutral_arrays())
    (tmp_path / "t.json").write_text("{num_experts: 8")


def _object_array(tmp_path: Path) -> None:
    arrays = neutral_arrays()
    arrays["experts"] = np.array([[[1, 2]]] * N, dtype=object)
    np.savez(tmp_path / "t.npz", **arrays)
    (tmp_path / "t.json").write_text(json.dumps({"num_experts": E}))


def _truncated(tmp_path: Path) -> None:
    _no_json(tmp_path)
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "t.json").write_text(json.dumps({"num_experts": E}))


def _garbage(tmp_path: Path) -> None:
    (tmp_path / "t.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "t.json").write_text(json.dumps({"num_experts": E}))


BROKEN_NPZ = {
    "no json and no num_experts": _no_json,
    "json not JSON": _bad_json,
    "pickled object array": _object_array,
    "npz cut in half": _truncated,
    "npz not a zip": _garbage,
}


@pytest.mark.parametrize("case", list(BROKEN_NPZ), ids=list(BROKEN_NPZ))
def test_broken_npz_is_refused(tmp_path, case):
    BROKEN_NPZ[case](tmp_path)
    with pytest.raises(TraceError, match="t.npz|t.json"):
        pt.load(tmp_path / "t.npz")


def test_caller_num_experts_contradicting_the_json_is_refused(tmp_path):
    np.savez(tmp_path / "t.npz", **neutral_arrays())
    (tmp_path / "t.json").write_text(json.dumps({"num_experts": E}))
    with pytest.raises(TraceError, match="caller says 16"):
        pt.load(tmp_path / "t.npz", num_experts=16)


# ---- Prophet trace directories ---------------------------------------------------------------------------------


def _header(path: Path) -> dict:
    return json.loads((path / "header.json").read_text())


def _write_header(path: Path, header: dict) -> None:
    (path / "header.json").write_text(json.dumps(header))


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        header = _header(path)
        change(header)
        _write_header(path, header)

    return edit


def _rewrite(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """Replace an array and fix its header entry, as a buggy writer (not a damaged disk) would."""

    def edit(path: Path) -> None:
        arr = make(np.load(path / f"{name}.npy").copy())
        np.save(path / f"{name}.npy", arr)
        header = _header(path)
        header["arrays"][name].update(shape=list(arr.shape), dtype=arr.dtype.str, crc32=zlib.crc32(arr.tobytes()))
        _write_header(path, header)

    return edit


def _outside(path: Path) -> None:
    other = path.parent / "other"
    other.mkdir()
    (other / "experts.npy").write_bytes((path / "experts.npy").read_bytes())
    _edit(lambda h: h["arrays"]["experts"].update(file="../other/experts.npy"))(path)


def _absolute(path: Path) -> None:
    _edit(lambda h: h["arrays"]["experts"].update(file=str((path / "experts.npy").resolve())))(path)


def _symlink_out(path: Path) -> None:
    other = path.parent / "elsewhere.npy"
    other.write_bytes((path / "experts.npy").read_bytes())
    (path / "link.npy").symlink_to(other)
    _edit(lambda h: h["arrays"]["experts"].update(file="link.npy"))(path)


def _bytes(name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name).write_bytes(change((path / name).read_bytes()))

    return edit


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[-3] ^= 0xFF
    return bytes(out)


def _zero_tokens(path: Path) -> None:
    trace = random_trace(np.random.default_rng(0), n=N, layers=L, experts=E, k=K, seqs=1)
    trace.sequences(slice(0, 0)).save(path, overwrite=True)


def _unfinished(path: Path) -> None:
    (path / "header.json").unlink()
    (path / ".staging").mkdir()


def _weight(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def make(a: np.ndarray) -> np.ndarray:
        a[0, 0, 0] = value
        return a

    return make


BAD_DIRS: dict[str, Callable[[Path], None]] = {
    # the header itself
    "no header": lambda p: (p / "header.json").unlink(),
    "unfinished recording": _unfinished,
    "header not JSON": lambda p: (p / "header.json").write_text("{"),
    "header not UTF-8": lambda p: (p / "header.json").write_bytes(b"\xff\xfe\x00"),
    "header a list": lambda p: (p / "header.json").write_text("[]"),
    "format of another tool": _edit(lambda h: h.update(format="other-trace")),
    "version 2": _edit(lambda h: h.update(version=2)),
    "version as text": _edit(lambda h: h.update(version="1")),
    "no model": _edit(lambda h: h.pop("model")),
    "no arrays": _edit(lambda h: h.pop("arrays")),
    "no num_tokens": _edit(lambda h: h.pop("num_tokens")),
    "num_tokens as text": _edit(lambda h: h.update(num_tokens="12")),
    "num_tokens negative": _edit(lambda h: h.update(num_tokens=-1)),
    "num_tokens wrong": _edit(lambda h: h.update(num_tokens=N + 1)),
    "num_sequences wrong": _edit(lambda h: h.update(num_sequences=9)),
    "model a list": _edit(lambda h: h.update(model=[1, 2])),
    "model field unknown": _edit(lambda h: h["model"].update(colour="blue")),
    "model num_layers as text": _edit(lambda h: h["model"].update(num_layers="3")),
    "model num_layers fraction": _edit(lambda h: h["model"].update(num_layers=2.5)),
    "model top_k above experts": _edit(lambda h: h["model"].update(top_k=E + 1)),
    "model num_experts zero": _edit(lambda h: h["model"].update(num_experts=0)),
    "model num_experts below the ids": _edit(lambda h: h["model"].update(num_experts=2)),
    "model num_layers other than the arrays": _edit(lambda h: h["model"].update(num_layers=L + 1)),
    "sketch description broken": _edit(lambda h: h.update(sketch={"dim": 4})),
    # header entries
    "arrays a list": _edit(lambda h: h.update(arrays=[])),
    "entry without file": _edit(lambda h: h["arrays"]["experts"].pop("file")),
    "entry without dtype": _edit(lambda h: h["arrays"]["weights"].pop("dtype")),
    "entry without shape": _edit(lambda h: h["arrays"]["exact"].pop("shape")),
    "entry a string": _edit(lambda h: h["arrays"].update(phase="phase.npy")),
    "entry file a number": _edit(lambda h: h["arrays"]["experts"].update(file=7)),
    "array not listed": _edit(lambda h: h["arrays"].pop("token_ids")),
    "path ../other/experts.npy": _outside,
    "absolute path": _absolute,
    "symlink out of the directory": _symlink_out,
    "file listed but missing": lambda p: (p / "weights.npy").unlink(),
    # the arrays
    "array truncated": _bytes("experts.npy", lambda d: d[:-7]),
    "array header truncated": _bytes("phase.npy", lambda d: d[:20]),
    "array flipped bits": _bytes("weights.npy", _flip),
    "array with trailing bytes": _bytes("exact.npy", lambda d: d + b"\0" * 8),
    "array empty file": _bytes("seq_offsets.npy", lambda d: b""),
    "dtype other than the header": _edit(lambda h: h["arrays"]["experts"].update(dtype="<i4")),
    "shape other than the header": _edit(lambda h: h["arrays"]["experts"].update(shape=[N, L, K + 1])),
    "experts as int32": _rewrite("experts", lambda a: a.astype(np.int32)),
    "expert id out of range": _rewrite("experts", lambda a: np.where(a == a.max(), E, a).astype(a.dtype)),
    "same expert twice": _rewrite("experts", lambda a: np.repeat(a[..., :1], K, axis=-1)),
    "NaN weight beside recorded ones": _rewrite("weights", _weight(np.nan)),
    "+inf weight": _rewrite("weights", _weight(np.inf)),
    "-inf weight": _rewrite("weights", _weight(-np.inf)),
    "phase value 7": _rewrite("phase", lambda a: np.full_like(a, 7)),
    "seq_offsets falling": _rewrite("seq_offsets", lambda a: a[::-1].copy()),
    "zero tokens": _zero_tokens,
}


@pytest.mark.parametrize("case", list(BAD_DIRS), ids=list(BAD_DIRS))
def test_bad_trace_directory_is_refused(tmp_path, case):
    path = random_trace(np.random.default_rng(0), n=N, layers=L, experts=E, k=K, seqs=2).save(tmp_path / "t")
    BAD_DIRS[case](path)
    with pytest.raises(TraceError, match=str(path)):
        pt.load(path)


def test_a_directory_without_router_weights_loads(tmp_path):
    # engines that report expert ids only leave every weight NaN: that is "not recorded", not corruption
    path = random_trace(np.random.default_rng(0), n=N, layers=L, experts=E, k=K, seqs=2).save(tmp_path / "t")
    _rewrite("weights", lambda a: np.full_like(a, np.nan))(path)
    assert np.isnan(pt.load(path).weights).all()


def test_the_unchanged_directory_loads(tmp_path):
    path = random_trace(np.random.default_rng(0), n=N, layers=L, experts=E, k=K, seqs=2).save(tmp_path / "t")
    assert len(pt.load(path)) == N


# ---- vLLM-style JSONL ------------------------------------------------------------------------------------------


def _row(**changes: object) -> str:
    row = {"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}
    row.update(changes)
    return json.dumps(row)


GOOD_ROWS = [_row(layer=1), _row(token_idx=1), _row(layer=1, token_idx=1)]

BAD_JSONL: dict[str, list[str]] = {
    "empty file": [],
    "blank lines only": ["", "  "],
    "a line not JSON": ['{"problem_id": 0,'],
    "a row that is a list": ["[1, 2]"],
    "row without experts": [json.dumps({"problem_id": 0, "layer": 0, "token_idx": 0, "gating_probs": [1.0]})],
    "row without problem_id": [json.dumps({"layer": 0, "token_idx": 0, "experts": [1], "gating_probs": [1.0]})],
    "experts not a list": [_row(experts=3)],
    "gating_probs not a list": [_row(gating_probs=0.5)],
    "expert id 4.7": [_row(experts=[4.7, 2])],
    "expert id 4.0": [_row(experts=[4.0, 2])],
    "expert id '3'": [_row(experts=["3", 2])],
    "expert id true": [_row(experts=[True, 2])],
    "expert id null": [_row(experts=[None, 2])],
    "expert id negative": [_row(experts=[-1, 2])],
    "expert id past num_experts": [_row(experts=[1, 9])],
    "gating NaN": [_row(gating_probs=[float("nan"), 0.4])],
    "gating Infinity": [_row(gating_probs=[float("inf"), 0.4])],
    "gating '0.6'": [_row(gating_probs=["0.6", 0.4])],
    "gating null": [_row(gating_probs=[None, 0.4])],
    "top-k changes between rows": [_row(experts=[1, 2, 3], gating_probs=[0.5, 0.3, 0.2])],
    "experts and gating of other lengths": [_row(gating_probs=[1.0])],
    "layer negative": [_row(layer=-1)],
    "layer 1.5": [_row(layer=1.5)],
    "layer true": [_row(layer=True)],
    "token_idx as text": [_row(token_idx="0")],
    "token_idx negative": [_row(token_idx=-3)],
    "row repeated": [_row()],
    "expert ids repeated in a row": [_row(experts=[2, 2])],
}


@pytest.mark.parametrize("case", list(BAD_JSONL), ids=list(BAD_JSONL))
def test_bad_jsonl_is_refused(tmp_path, case):
    path = tmp_path / "t.jsonl"
    rows = BAD_JSONL[case]
    path.write_text("\n".join(rows if case in ("empty file", "blank lines only") else [_row(), *GOOD_ROWS, *rows]))
    with pytest.raises(TraceError, match="t.jsonl"):
        pt.load(path, num_experts=E if "past num_experts" not in case else 8)


def test_the_good_jsonl_rows_load(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join([_row(), *GOOD_ROWS]))
    assert len(pt.load(tmp_path / "t.jsonl", num_experts=E)) == 2


# ---- load itself -----------------------------------------------------------------------------------------------


def _other_model(path: Path) -> dict:
    return {"model": pt.TraceModel(name="other", model_type="mixtral", num_layers=32, num_experts=E, top_k=K)}


BAD_LOADS: dict[str, Callable[[Path], tuple[Path, dict]]] = {
    "path does not exist": lambda d: (d / "nope", {}),
    "unknown suffix": lambda d: ((d / "t.csv").write_text("1,2") and d / "t.csv", {}),
    "a file named header.json that is not one": lambda d: ((d / "header.json").write_text("{}") and
                                                            d / "header.json", {}),
    "trace of another model": lambda d: (
        random_trace(np.random.default_rng(0), n=N, layers=L, experts=E, k=K).save(d / "t"), _other_model(d)),
}


@pytest.mark.parametrize("case", list(BAD_LOADS), ids=list(BAD_LOADS))
def test_bad_load_call_is_refused(tmp_path, case):
    path, kwargs = BAD_LOADS[case](tmp_path)
    with pytest.raises(TraceError, match=path.name):
        pt.load(path, **kwargs)
