"""`load`: one entry point for every trace format Prophet reads.

* a Prophet trace directory (``header.json`` + ``.npy``; see ``traces/FORMAT.md``), memory-mapped;
* the neutral ``NAME.npz`` (+ ``NAME.json``) format of the shared real traces;
* vLLM-style JSONL, one row per (token, layer): ``{"problem_id", "layer", "token_idx", "experts",
  "gating_probs"}`` and optionally ``"dataset"``;
* what serving engines return (`prophet.trace.engines`): vLLM ``routed_experts`` responses (``fmt="vllm"``),
  SGLang's routed-experts payload (``fmt="sglang"``), MoE-Infinity's saved activation counts (``.npy``).

Whatever the format, a file that is missing, truncated, corrupt or inconsistent raises `TraceError` naming
the file and the problem; nothing is skipped silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from prophet.errors import TraceError
from prophet.trace.format import HEADER, Phase, Trace, TraceModel, check_compatible, load_dir

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

FORMATS = ("auto", "vllm", "sglang", "moe-infinity")  # auto: by the path (a .npy is MoE-Infinity's)
NEUTRAL_ARRAYS = ("experts", "weights", "seq_offsets", "token_ids", "exact")
# numpy dtype kinds each neutral array may have: signed or unsigned integers, floats, booleans
NEUTRAL_KINDS = {"experts": "iu", "weights": "f", "seq_offsets": "iu", "token_ids": "iu", "exact": "b"}
NEUTRAL_KIND_NAMES = {"iu": "an integer dtype", "f": "a floating dtype", "b": "dtype bool"}
JSONL_KEYS = ("problem_id", "layer", "token_idx", "experts", "gating_probs")


def load(
    path: str | os.PathLike[str],
    *,
    model: TraceModel | nn.Module | None = None,
    num_experts: int | None = None,
    verify: bool = True,
    fmt: str = "auto",
) -> Trace:
    """Read a trace in any supported format (chosen by what ``path`` is).

    ``model`` (a `TraceModel` or an adapter-supported model) must agree with the trace's layer count,
    expert count and top-k. ``num_experts`` is needed for formats that do not store it (JSONL, an ``.npz``
    without its ``.json``). ``verify`` checks Prophet traces' CRC-32 (one sequential read of each array).
    ``fmt`` (one of `FORMATS`) names the format where the file name does not (vLLM and SGLang responses are
    ``.json``/``.jsonl``); the engines' formats take layers, experts and top-k from ``model`` where they lack them.
    """
    p = Path(path)
    if fmt not in FORMATS:
        raise TraceError(f"format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    if not p.exists():
        raise TraceError(f"{p}: no such file or directory")
    engine = "moe-infinity" if fmt == "auto" and p.suffix == ".npy" else None if fmt == "auto" else fmt
    if engine is not None:
        from prophet.trace import engines

        reader = {"vllm": engines.read_vllm, "sglang": engines.read_sglang, "moe-infinity": engines.read_moe_infinity}
        shape = None if model is None else _as_trace_model(model)
        trace = reader[engine](p, model=shape, num_experts=num_experts)
    elif p.is_dir():
        trace = load_dir(p, verify=verify)
    elif p.suffix == ".npz":
        trace = read_neutral(p, num_experts=num_experts)
    elif p.suffix in (".jsonl", ".ndjson"):
        trace = read_jsonl(p, num_experts=num_experts)
    elif p.name == HEADER:
        trace = load_dir(p.parent, verify=verify)
    else:
        raise TraceError(f"{p}: unknown trace format (expected a trace directory, NAME.npz or NAME.jsonl)")
    if len(trace) == 0:
        raise TraceError(f"{p}: holds no tokens; record or convert a trace of at least one token")
    if model is not None:
        check_compatible(trace, _as_trace_model(model), str(p))
    return trace


def _as_trace_model(model: TraceModel | nn.Module) -> TraceModel:
    if isinstance(model, TraceModel):
        return model
    from prophet.trace.recorder import trace_model

    return trace_model(model)


def _phase_from_text(text: str) -> Phase:
    low = text.lower()
    if low.startswith("decode"):
        return Phase.DECODE
    if "prefill" in low:
        return Phase.PREFILL
    return Phase.UNKNOWN


def read_neutral(path: Path, num_experts: int | None = None) -> Trace:
    """Read the neutral ``NAME.npz`` format; model facts come from ``NAME.json`` beside it when present."""
    info: dict[str, Any] = {}
    jp = path.with_suffix(".json")
    if jp.exists():
        try:
            info = json.loads(jp.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{jp}: corrupt JSON ({exc})") from exc
    e = info.get("num_experts", num_experts)
    if e is None:
        raise TraceError(f"{path}: no {jp.name} beside it to give the expert count; pass num_experts=")
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise TraceError(f"{path}: num_experts={e!r} (from {jp.name} or the caller) must be a whole number >= 1")
    if num_experts is not None and e != num_experts:
        raise TraceError(f"{path}: {jp.name} says num_experts={e}, the caller says {num_experts}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NEUTRAL_ARRAYS if k not in z.files]
            if missing:
                raise TraceError(f"{path}: arrays {missing} missing (has {sorted(z.files)})")
            arr = {k: z[k] for k in NEUTRAL_ARRAYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise TraceError(f"{path}: truncated or corrupt npz ({exc})") from exc
    for key, kind in NEUTRAL_KINDS.items():
        if arr[key].dtype.kind not in kind:
            raise TraceError(f"{path}: {key} has dtype {arr[key].dtype}, needs {NEUTRAL_KIND_NAMES[kind]}; "
                             "store it as such instead of relying on a conversion")
    ex = arr["experts"]
    if ex.ndim != 3 or 0 in ex.shape[1:]:
        raise TraceError(f"{path}: experts must be [N, L, K] with L, K >= 1, got shape {list(ex.shape)}")
    n, L, K = ex.shape
    if n and (ex.min() < -1 or ex.max() >= e):
        bad = int(ex.max()) if ex.max() >= e else int(ex.min())
        raise TraceError(f"{path}: expert id {bad} is out of range for {e} experts (valid: 0..{e - 1}, or -1 for not "
                         "recorded)")
    unrecorded = ~np.isfinite(arr["weights"]) & (ex >= 0) if arr["weights"].shape == ex.shape else None
    if unrecorded is not None and unrecorded.any():
        t, layer, k = np.argwhere(unrecorded)[0]
        raise TraceError(f"{path}: router weight {arr['weights'][t, layer, k]} of expert {ex[t, layer, k]} at token {t}, "
                         f"layer {layer} is not finite; this format records a finite weight for every expert id >= 0")
    for key, want in (("layers", L), ("top_k", K), ("tokens", n)):
        if key in info and info[key] != want:
            raise TraceError(f"{path}: {jp.name} says {key}={info[key]}, the arrays hold {want}")
    try:
        model = TraceModel(
            name=str(info.get("model", path.stem)),
            model_type="unknown",
            num_layers=L,
            num_experts=e,
            top_k=K,
        )
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from exc
    phase = _phase_from_text(str(info.get("phase", "")))
    return Trace(  # the casts below only change width: kinds and ranges are checked above
        model,
        ex.astype(np.int16, copy=False),
        arr["weights"].astype(np.float32, copy=False),
        arr["seq_offsets"].astype(np.int64, copy=False),
        token_ids=arr["token_ids"].astype(np.int64, copy=False),
        phase=np.full(n, phase, np.uint8),
        exact=arr["exact"],
        meta={"converted_from": str(path), **info},
        source=str(path),
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, float) and math.isfinite(x)) or _is_int(x)


def read_jsonl(path: Path, num_experts: int | None = None) -> Trace:
    """Read vLLM-style routing rows, one JSON object per (token, layer).

    A sequence is one ``(dataset, problem_id)``; its length is the largest ``token_idx`` + 1 over its layers.
    A (token, layer) row that never appears stays -1 / NaN, and every token of that layer in that sequence is
    marked inexact, because recorders of this format count ``token_idx`` per layer, so one lost row shifts
    the rest of the layer. Rows may come in any order. ``num_experts`` defaults to the largest id + 1
    (logged, since it may undercount experts that were never chosen).
    """
    seq_keys: dict[tuple[Any, Any], int] = {}
    seq_col: list[int] = []
    layer_col: list[int] = []
    tok_col: list[int] = []
    ids: list[list[int]] = []
    probs: list[list[float]] = []
    k = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(tqdm(f, desc=f"read {path.name}", unit=" rows", leave=False), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(
                    f"{path}:{lineno}: not valid JSON ({exc}); the file is truncated or corrupt"
                ) from exc
            if not isinstance(row, dict) or any(key not in row for key in JSONL_KEYS):
                raise TraceError(f"{path}:{lineno}: a row needs keys {list(JSONL_KEYS)}")
            experts, gating = row["experts"], row["gating_probs"]
            if not (isinstance(experts, list) and isinstance(gating, list)):
                raise TraceError(f"{path}:{lineno}: experts and gating_probs must be lists")
            if k is None:
                k = len(experts)
            if len(experts) != k or len(gating) != k:
                raise TraceError(
                    f"{path}:{lineno}: {len(experts)} experts and {len(gating)} gating_probs where earlier rows have top_k={k}"
                )
            layer, tok = row["layer"], row["token_idx"]
            if not (_is_int(layer) and _is_int(tok)) or layer < 0 or tok < 0:
                raise TraceError(f"{path}:{lineno}: layer and token_idx must be non-negative integers")
            if not all(_is_int(x) for x in experts) or not all(_is_number(x) for x in gating):
                raise TraceError(f"{path}:{lineno}: experts must be integers and gating_probs finite numbers "
                                 f"(got {experts!r}, {gating!r})")
            key = (row.get("dataset"), row["problem_id"])
            seq_col.append(seq_keys.setdefault(key, len(seq_keys)))
            layer_col.append(layer)
            tok_col.append(tok)
            ids.append(experts)
            probs.append(gating)
    if not seq_col or k is None or k == 0:
        raise TraceError(f"{path}: no routing rows")
    seq = np.asarray(seq_col, np.int64)
    lay = np.asarray(layer_col, np.int64)
    tok = np.asarray(tok_col, np.int64)
    ex = np.asarray(ids, np.int64)
    w = np.asarray(probs, np.float32)
    L = int(lay.max()) + 1
    e = int(ex.max()) + 1 if num_experts is None else num_experts
    if num_experts is None:
        log.info("%s: num_experts not given, using the largest id + 1 = %d", path, e)
    if ex.min() < 0 or ex.max() >= e:
        bad = int(ex.max()) if ex.max() >= e else int(ex.min())
        raise TraceError(f"{path}: expert id {bad} is out of range for {e} experts")
    s = len(seq_keys)
    lengths = np.zeros(s, np.int64)
    np.maximum.at(lengths, seq, tok + 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    row = offsets[seq] + tok  # [R] global token row of each JSON row
    flat = row * L + lay
    uniq, counts = np.unique(flat, return_counts=True)
    if (counts > 1).any():
        i = int(np.flatnonzero(flat == uniq[counts > 1][0])[0])
        key = list(seq_keys)[seq[i]]
        raise TraceError(
            f"{path}: (dataset, problem_id)={key}, layer {lay[i]}, token_idx {tok[i]} appears more than once"
        )
    experts = np.full((n, L, k), -1, np.int16)
    weights = np.full((n, L, k), np.nan, np.float32)
    experts[row, lay] = ex
    weights[row, lay] = w
    present = np.zeros((n, L), bool)
    present[row, lay] = True
    seq_of_row = np.repeat(np.arange(s), lengths)
    complete = np.ones((s, L), bool)  # [S, L] every row of the layer present in the sequence
    np.logical_and.at(complete, seq_of_row, present)
    exact = complete[seq_of_row]
    try:
        model = TraceModel(name=path.stem, model_type="unknown", num_layers=L, num_experts=e, top_k=k)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from exc
    sequences = [{"dataset": d, "problem_id": p} for (d, p) in seq_keys]
    return Trace(
        model,
        experts,
        weights,
        offsets,
        exact=exact,
        meta={"converted_from": str(path), "sequences": sequences},
        source=str(path),
    )
