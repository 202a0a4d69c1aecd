"""Readers for the routing serving engines return, into Prophet's `Trace`.

* vLLM (``--enable-return-routed-experts``): each completion choice carries ``routed_experts``, expert ids
  ``[generated tokens, MoE layers, top_k]``; the response carries ``prompt_routed_experts``
  ``[prompt tokens, MoE layers, top_k]`` shared by its choices. A file holds saved responses: one JSON object,
  a JSON list of them, or JSONL (one per line). Each choice becomes one sequence (its prompt's rows first,
  marked prefill, when ``prompt_routed_experts`` is there; then its generated rows, marked decode).
* SGLang (``--enable-return-routed-experts``, ``return_routed_experts`` per request): each response's
  ``meta_info.routed_experts`` is base64 of little-endian int32 ids, ``[tokens, MoE layers, top_k]`` flattened;
  the file holds responses as for vLLM. Each response becomes one sequence. The shape is not in the payload:
  the model (layers and top-k) must be given.
* MoE-Infinity: its expert tracer saves ``np.save`` arrays ``[sequences, MoE layers, experts]`` of activation
  counts per sequence (unused rows all zero). The counts have no token order, so each layer's activations are
  dealt to the sequence's tokens in a seeded random order: each expert's share of a sequence, the sequence
  lengths and the number of experts are the source's; the order of tokens and the cross-layer paths are not
  (every row is marked inexact and ``meta`` says so).

Neither engine records router weights: they are NaN (not recorded). Ids are checked against the expert count
(the model's, or the largest id + 1 when none is given); anything malformed raises `TraceError` naming the
file, the record and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prophet.errors import TraceError
from prophet.trace.format import Phase, Trace, TraceModel

log = logging.getLogger(__name__)


def _responses(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, response)`` for each saved response: a JSON object, a JSON list, or one object per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is not None:
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            yield f"{path}: response {i}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{lineno}: not valid JSON ({exc.msg}); the file is truncated or corrupt") from None


def _ids(value: Any, where: str, shape_hint: str) -> np.ndarray:
    """A nested list of integers -> int64 ``[T, L, K]``."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{where}: {shape_hint} must be a rectangular nested list of integers ({exc})") from None
    if arr.ndim != 3 or arr.dtype.kind not in "iu" or arr.size == 0 and arr.shape[0] != 0:
        got = f"dtype {arr.dtype}" if arr.ndim == 3 else f"{arr.ndim} dimensions"
        raise TraceError(f"{where}: {shape_hint} must be integer ids [tokens, layers, top_k], got {got}")
    return arr.astype(np.int64)


def _build(path: Path, parts: list[tuple[np.ndarray, np.ndarray, dict[str, Any]]], model: TraceModel | None,
           num_experts: int | None, engine: str, exact: bool = True, meta: dict[str, Any] | None = None) -> Trace:
    """One `Trace` from per-sequence ``(ids [T, L, K], phase [T], info)``, with ids checked against the experts."""
    parts = [p for p in parts if p[0].shape[0] > 0]
    if not parts:
        raise TraceError(f"{path}: no routed tokens in any {engine} record")
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise TraceError(f"{path}: records disagree on [layers, top_k]: {sorted(shapes)}; one file holds one model")
    L, K = shapes.pop()
    if model is not None and (model.num_layers, model.top_k) != (L, K):
        raise TraceError(f"{path}: the {engine} records hold {L} MoE layers x top-{K} but {model.name} has "
                         f"{model.num_layers} x top-{model.top_k}; give the model the trace was recorded from")
    ids = np.concatenate([p[0] for p in parts])  # [N, L, K]
    e = model.num_experts if model is not None else num_experts
    if e is None:
        e = int(ids.max()) + 1
        log.info("%s: num_experts not given, using the largest id + 1 = %d", path, e)
    bad = ids[(ids < 0) | (ids >= e)]
    if bad.size:
        raise TraceError(f"{path}: expert id {int(bad[0])} is out of range for {e} experts")
    name = model.name if model is not None else path.stem
    try:
        tm = TraceModel(name=name, model_type=model.model_type if model else "unknown", num_layers=L, num_experts=e,
                        top_k=K)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None
    lengths = [p[0].shape[0] for p in parts]
    n = int(sum(lengths))
    return Trace(tm, ids.astype(np.int16), np.full(ids.shape, np.nan, np.float32),
                 np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                 phase=np.concatenate([p[1] for p in parts]).astype(np.uint8), exact=np.full((n, L), exact),
                 meta={"converted_from": str(path), "engine": engine, "sequences": [p[2] for p in parts],
                       **(meta or {})},
                 source=str(path))


def read_vllm(path: str | Path, *, model: TraceModel | None = None, num_experts: int | None = None) -> Trace:
    """vLLM responses with ``routed_experts`` per choice (see the module docstring)."""
    path = Path(path)
    parts = []
    for where, resp in _responses(path):
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list) or not resp["choices"]:
            raise TraceError(f"{where}: a vLLM response needs a non-empty 'choices' list")
        prompt = resp.get("prompt_routed_experts")
        head = None if prompt is None else _ids(prompt, where, "prompt_routed_experts")
        for i, choice in enumerate(resp["choices"]):
            if not isinstance(choice, dict) or choice.get("routed_experts") is None:
                raise TraceError(f"{where}: choice {i} has no 'routed_experts'; serve with "
                                 "--enable-return-routed-experts")
            gen = _ids(choice["routed_experts"], f"{where}: choice {i}", "routed_experts")
            if head is not None and head.shape[1:] != gen.shape[1:]:
                raise TraceError(f"{where}: choice {i}: prompt_routed_experts {list(head.shape)} and routed_experts "
                                 f"{list(gen.shape)} disagree on [layers, top_k]")
            rows = gen if head is None else np.concatenate([head, gen])
            phase = np.concatenate([np.full(0 if head is None else len(head), Phase.PREFILL),
                                    np.full(len(gen), Phase.DECODE)])
            parts.append((rows, phase, {"id": resp.get("id"), "choice": i}))
    return _build(path, parts, model, num_experts, "vllm")


def read_sglang(path: str | Path, *, model: TraceModel | None = None, num_experts: int | None = None) -> Trace:
    """SGLang responses with base64 ``meta_info.routed_experts`` (see the module docstring); ``model`` gives
    the MoE layers and top-k the flat payload does not."""
    path = Path(path)
    if model is None:
        raise TraceError(f"{path}: SGLang's routed-experts payload is flat; give the model (--model) for its "
                         "MoE layers and top-k")
    L, K = model.num_layers, model.top_k
    parts = []
    for where, resp in _responses(path):
        info = resp.get("meta_info") if isinstance(resp, dict) else None
        payload = info.get("routed_experts") if isinstance(info, dict) else None
        if not isinstance(payload, str):
            raise TraceError(f"{where}: no meta_info.routed_experts string; launch SGLang with "
                             "--enable-return-routed-experts and send return_routed_experts=true")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TraceError(f"{where}: meta_info.routed_experts is not valid base64 ({exc})") from None
        if len(raw) % (4 * L * K):
            raise TraceError(f"{where}: {len(raw)} bytes of routed experts are not a whole number of tokens of "
                             f"{L} layers x top-{K} int32 ids; is --model the model that served it?")
        ids = np.frombuffer(raw, dtype="<i4").astype(np.int64).reshape(-1, L, K)
        parts.append((ids, np.full(len(ids), Phase.UNKNOWN), {"id": info.get("id"), "tokens": len(ids)}))
    return _build(path, parts, model, num_experts, "sglang")


def read_moe_infinity(path: str | Path, *, model: TraceModel | None = None, num_experts: int | None = None) -> Trace:
    """MoE-Infinity's saved activation counts ``[sequences, MoE layers, experts]`` (see the module docstring);
    ``model`` gives top-k (default 1, as for Switch Transformers) and must match layers and experts."""
    path = Path(path)
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise TraceError(f"{path}: not a readable .npy array ({exc})") from None
    if counts.ndim != 3 or counts.dtype.kind not in "iuf":
        raise TraceError(f"{path}: MoE-Infinity traces are numeric [sequences, layers, experts], got "
                         f"{counts.ndim} dimensions of {counts.dtype}")
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts != np.round(counts)).any():
        raise TraceError(f"{path}: activation counts must be finite whole numbers >= 0")
    S, L, E = counts.shape
    if model is not None and (model.num_layers, model.num_experts) != (L, E):
        raise TraceError(f"{path}: {L} MoE layers x {E} experts but {model.name} has {model.num_layers} x "
                         f"{model.num_experts}; give the model the trace was recorded from")
    if num_experts is not None and num_experts != E:
        raise TraceError(f"{path}: the array has {E} experts, the caller says {num_experts}")
    k = model.top_k if model is not None else 1
    counts = counts.astype(np.int64)
    rng = np.random.default_rng(0)
    parts = []
    for s in range(S):
        per_layer = counts[s].sum(axis=1)  # [L] = tokens x top_k at every layer
        if per_layer.sum() == 0:
            continue  # an unused row of the tracer's fixed capacity
        if (per_layer != per_layer[0]).any() or per_layer[0] % k:
            raise TraceError(f"{path}: sequence {s}: layers count {sorted(set(per_layer.tolist()))} activations; each "
                             f"layer must count tokens x top-{k} (is top-k right?)")
        tokens = int(per_layer[0]) // k
        if (counts[s] > tokens).any():
            raise TraceError(f"{path}: sequence {s}: an expert counts more activations than the {tokens} tokens; "
                             f"each token picks an expert at most once (is top-{k} right?)")
        ids = np.empty((tokens, L, k), np.int64)
        for layer in range(L):
            dealt = np.repeat(np.arange(E), counts[s, layer]).reshape(k, tokens).T  # [T, K] no expert twice per token
            ids[:, layer] = dealt[rng.permutation(tokens)]
        parts.append((ids, np.full(tokens, Phase.UNKNOWN), {"row": s, "tokens": tokens}))
    shaped = model or TraceModel(name=path.stem, model_type="unknown", num_layers=L, num_experts=E, top_k=k)
    return _build(path, parts, shaped, None, "moe-infinity", exact=False,
                  meta={"caveat": "activation counts only: tokens are dealt each layer's activations in a seeded "
                                  "random order, so token order and cross-layer paths are not the source's"})
