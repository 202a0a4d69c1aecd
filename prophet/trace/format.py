"""The Prophet trace: in-memory `Trace`, its versioned on-disk directory, and a streaming `TraceWriter`.

On disk a trace is a directory of plain ``.npy`` arrays plus ``header.json`` (layout in ``traces/FORMAT.md``).
``.npy`` keeps the format safe (no pickle) and lets readers memory-map every array, so a trace larger than
RAM can still be sliced. The header is written last, atomically: a directory without one is an unfinished
recording and never loads. Each array's CRC-32 and byte size are in the header, so truncation and corruption
are caught at load time instead of surfacing as wrong statistics later.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prophet.errors import TraceError

FORMAT_NAME = "prophet-trace"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER = "header.json"
STAGING = ".staging"
_BLOCK_BYTES = 16 << 20  # rows copied per block when writing: bounded memory whatever the trace length

# name -> (dtype, trailing shape given (L, K, D)); axis 0 is tokens except for seq_offsets.
ARRAYS: dict[str, tuple[np.dtype, Callable[[int, int, int], tuple[int, ...]]]] = {
    "experts": (np.dtype("<i2"), lambda L, K, D: (L, K)),
    "weights": (np.dtype("<f4"), lambda L, K, D: (L, K)),
    "token_ids": (np.dtype("<i8"), lambda L, K, D: ()),
    "phase": (np.dtype("u1"), lambda L, K, D: ()),
    "exact": (np.dtype("bool"), lambda L, K, D: (L,)),
    "sketch": (np.dtype("<f2"), lambda L, K, D: (L, D)),
}


class Phase(enum.IntEnum):
    """What the model was doing when it routed a token (stored as uint8)."""

    PREFILL = 0
    DECODE = 1
    UNKNOWN = 2


@dataclass(frozen=True)
class TraceModel:
    """The model a trace came from, as far as routing is concerned.

    ``num_layers`` counts MoE layers only; ``layer_indices`` (optional) maps them to decoder-layer indices.
    """

    name: str
    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    layer_indices: tuple[int, ...] | None = None
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TraceError(f"model {self.name!r}: {name}={value!r} must be a whole number")
        if self.num_layers <= 0 or self.num_experts <= 0 or not 0 < self.top_k <= self.num_experts:
            raise TraceError(
                f"model {self.name!r}: need num_layers > 0 and 0 < top_k <= num_experts "
                f"(got L={self.num_layers}, E={self.num_experts}, K={self.top_k})"
            )
        if self.num_experts > np.iinfo(np.int16).max:
            raise TraceError(
                f"model {self.name!r}: num_experts={self.num_experts} does not fit int16 expert ids"
            )
        if self.layer_indices is not None:
            object.__setattr__(self, "layer_indices", tuple(int(i) for i in self.layer_indices))
            if len(self.layer_indices) != self.num_layers:
                raise TraceError(
                    f"model {self.name!r}: {len(self.layer_indices)} layer_indices for {self.num_layers} MoE layers"
                )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.layer_indices is not None:
            out["layer_indices"] = list(self.layer_indices)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceModel:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TraceError(f"unknown model field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class SketchInfo:
    """How the optional hidden-state sketch was made: ``sketch = (h @ P) / sqrt(dim)``, ``P ~ N(0, 1)`` [H, dim]
    drawn by ``torch.Generator().manual_seed(seed)``; stored as float16."""

    dim: int
    seed: int


class Trace:
    """Routing of N tokens through L MoE layers, grouped into S sequences.

    Arrays (possibly read-only memory maps):
      experts     int16   [N, L, K]  expert ids; -1 = not recorded
      weights     float32 [N, L, K]  router weights of those experts; NaN where not recorded
      seq_offsets int64   [S+1]      sequence s is tokens seq_offsets[s]:seq_offsets[s+1], in time order
      token_ids   int64   [N]        vocabulary ids, -1 where unknown
      phase       uint8   [N]        `Phase` per token
      exact       bool    [N, L]     False where the row's token alignment is uncertain (converted traces)
      sketch      float16 [N, L, D]  optional projection of the router input (see `SketchInfo`)
    """

    def __init__(
        self,
        model: TraceModel,
        experts: np.ndarray,
        weights: np.ndarray,
        seq_offsets: np.ndarray,
        *,
        token_ids: np.ndarray | None = None,
        phase: np.ndarray | None = None,
        exact: np.ndarray | None = None,
        sketch: np.ndarray | None = None,
        sketch_info: SketchInfo | None = None,
        meta: dict[str, Any] | None = None,
        source: str | None = None,
        validate: bool = True,
    ) -> None:
        n = experts.shape[0] if experts.ndim else 0
        self.model = model
        self.experts = experts
        self.weights = weights
        self.seq_offsets = seq_offsets
        self.token_ids = token_ids if token_ids is not None else np.full(n, -1, dtype=np.int64)
        self.phase = phase if phase is not None else np.full(n, Phase.UNKNOWN, dtype=np.uint8)
        self.exact = exact if exact is not None else np.ones((n, model.num_layers), dtype=bool)
        self.sketch = sketch
        self.sketch_info = sketch_info
        self.meta = dict(meta or {})
        self.source = source
        if validate:
            validate_trace(self, source or "<in-memory trace>")

    # -- shape -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def top_k(self) -> int:
        return self.model.top_k

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def sequence_lengths(self) -> np.ndarray:
        """[S] int64 tokens per sequence."""
        return np.diff(self.seq_offsets)

    def __repr__(self) -> str:
        sk = f", sketch={self.sketch.shape[-1]}" if self.sketch is not None else ""
        return (
            f"Trace({self.model.name!r}, tokens={len(self)}, sequences={self.num_sequences}, "
            f"L={self.num_layers}, E={self.num_experts}, K={self.top_k}{sk})"
        )

    # -- selection ---------------------------------------------------------------------------------------
    def sequence_ids(self) -> np.ndarray:
        """[N] int64: the sequence each token belongs to."""
        return np.repeat(np.arange(self.num_sequences, dtype=np.int64), self.sequence_lengths)

    def sequences(self, idx: int | slice | Sequence[int] | np.ndarray) -> Trace:
        """The trace of the chosen sequences, in the order given.

        A slice (step 1) of a memory-mapped trace stays memory-mapped; other selections copy.
        """
        s = self.num_sequences
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + s if idx < 0 else int(idx)
            if not 0 <= i < s:
                raise IndexError(f"sequence {idx} out of range for {s} sequences")
            idx = slice(i, i + 1)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(s)
            if step == 1:
                stop = max(stop, start)
                a, b = int(self.seq_offsets[start]), int(self.seq_offsets[stop])
                return self._subset(slice(a, b), self.seq_offsets[start : stop + 1] - a)
            idx = np.arange(start, stop, step)
        order = np.asarray(idx, dtype=np.int64).reshape(-1)
        if order.size and (order.min() < -s or order.max() >= s):
            raise IndexError(f"sequence index out of range for {s} sequences")
        order = np.where(order < 0, order + s, order)
        lengths = self.sequence_lengths[order]
        rows = (
            np.concatenate([np.arange(self.seq_offsets[i], self.seq_offsets[i + 1]) for i in order])
            if order.size
            else np.zeros(0, dtype=np.int64)
        )
        return self._subset(rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def split(self, fractions: Sequence[float], seed: int | None = None) -> list[Trace]:
        """Split by whole sequences into parts of about ``fractions`` of the sequences each (e.g. ``[0.8, 0.2]``).

        Sequences keep their order unless ``seed`` is given, which shuffles them first. A token never ends up
        in two parts, so a predictor fitted on one part can be measured honestly on another.
        """
        fr = np.asarray(fractions, dtype=np.float64)
        if fr.ndim != 1 or fr.size == 0 or (fr < 0).any() or fr.sum() > 1 + 1e-9:
            raise ValueError(f"fractions={list(fractions)}: need non-negative values summing to at most 1")
        s = self.num_sequences
        order = np.arange(s) if seed is None else np.random.default_rng(seed).permutation(s)
        bounds = np.concatenate([[0], np.round(np.cumsum(fr) * s).astype(np.int64)])
        return [
            self.sequences(slice(a, b) if seed is None else order[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def _subset(self, rows: slice | np.ndarray, seq_offsets: np.ndarray) -> Trace:
        return Trace(
            self.model,
            self.experts[rows],
            self.weights[rows],
            np.asarray(seq_offsets, dtype=np.int64),
            token_ids=self.token_ids[rows],
            phase=self.phase[rows],
            exact=self.exact[rows],
            sketch=None if self.sketch is None else self.sketch[rows],
            sketch_info=self.sketch_info,
            meta=self.meta,
            source=self.source,
            validate=False,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-token arrays by on-disk name (``sketch`` only when present)."""
        out = {
            "experts": self.experts,
            "weights": self.weights,
            "token_ids": self.token_ids,
            "phase": self.phase,
            "exact": self.exact,
        }
        if self.sketch is not None:
            out["sketch"] = self.sketch
        return out

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write this trace as a Prophet trace directory; returns the path."""
        out = Path(path)
        if self.source is not None and Path(self.source).resolve() == out.resolve():
            raise TraceError(f"{out}: cannot save a trace onto the directory it is memory-mapped from")
        _prepare_dir(out, overwrite)
        entries = {}
        for name, arr in self.arrays().items():
            entries[name] = _write_npy(out / f"{name}.npy", arr, None)
        entries["seq_offsets"] = _write_npy(
            out / "seq_offsets.npy", np.asarray(self.seq_offsets, np.int64), None
        )
        _write_header(out, self.model, len(self), self.num_sequences, self.sketch_info, entries, self.meta)
        return out


# -- validation --------------------------------------------------------------------------------------------


def _fail(where: str, problem: str) -> TraceError:
    return TraceError(f"{where}: {problem}")


def validate_trace(trace: Trace, where: str) -> None:
    """Raise `TraceError` (naming ``where``) unless every array agrees with the model and with each other."""
    m = trace.model
    n = len(trace)
    L, K, E = m.num_layers, m.top_k, m.num_experts
    D = trace.sketch_info.dim if trace.sketch_info is not None else 0
    if (trace.sketch is None) != (trace.sketch_info is None):
        raise _fail(where, "sketch array and sketch description must come together")
    for name, arr in trace.arrays().items():
        dtype, tail = ARRAYS[name]
        want = (n, *tail(L, K, D))
        if arr.shape != want:
            what = {"experts": "tokens x layers x top_k", "weights": "tokens x layers x top_k"}.get(name, "")
            raise _fail(
                where,
                f"{name} has shape {list(arr.shape)} but the model says {list(want)} {what}".rstrip()
                + f" (L={L} MoE layers, top_k={K})",
            )
        if arr.dtype != dtype:
            raise _fail(where, f"{name} has dtype {arr.dtype}, the format needs {dtype}")
    so = np.asarray(trace.seq_offsets)
    if so.ndim != 1 or so.size < 1 or so.dtype != np.int64:
        raise _fail(where, f"seq_offsets must be a 1-D int64 array [S+1], got {so.dtype} {list(so.shape)}")
    if so[0] != 0 or so[-1] != n or (np.diff(so) < 0).any():
        raise _fail(where, f"seq_offsets must rise from 0 to the token count {n} (got {so[0]}..{so[-1]})")
    if n:
        ex = np.asarray(trace.experts)
        lo, hi = int(ex.min()), int(ex.max())
        if lo < -1 or hi >= E:
            bad = np.argwhere((ex < -1) | (ex >= E))[0]
            raise _fail(
                where,
                f"expert id {int(ex[tuple(bad)])} at token {bad[0]}, layer {bad[1]} is out of range for "
                f"{E} experts (valid: 0..{E - 1}, or -1 for not recorded)",
            )
        if K > 1:
            srt = np.sort(ex, axis=-1)
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
            if dup.any():
                t, layer, _ = np.argwhere(dup)[0]
                raise _fail(
                    where, f"token {t}, layer {layer} selects the same expert twice: {ex[t, layer].tolist()}"
                )
        w = np.asarray(trace.weights)
        missing = np.isnan(w)  # weights not recorded: a whole (token, layer), e.g. engines that report ids only
        bad = np.isinf(w) | (missing & ~missing.all(axis=-1, keepdims=True) & (ex >= 0))
        if bad.any():
            t, layer, k = np.argwhere(bad)[0]
            raise _fail(
                where,
                f"router weight {w[t, layer, k]} of expert {ex[t, layer, k]} at token {t}, layer {layer} is not finite; "
                "weights must be finite numbers, or NaN for every expert of a (token, layer) whose weights were not "
                "recorded",
            )
        ph = np.asarray(trace.phase)
        if ph.max() > max(Phase):
            raise _fail(where, f"phase value {int(ph.max())} unknown (0 prefill, 1 decode, 2 unknown)")


def check_compatible(trace: Trace, expect: TraceModel, where: str | None = None) -> None:
    """Raise `TraceError` when the trace's layer count, expert count or top-k contradicts ``expect``."""
    where = where or trace.source or "<in-memory trace>"
    for field_name in ("num_layers", "num_experts", "top_k"):
        got, want = getattr(trace.model, field_name), getattr(expect, field_name)
        if got != want:
            raise _fail(
                where,
                f"{field_name}={got} in the trace contradicts {field_name}={want} of model {expect.name!r}; "
                "record or convert a trace of this model",
            )


# -- on-disk directory -------------------------------------------------------------------------------------

_KNOWN_FILES = {HEADER, "seq_offsets.npy", *(f"{name}.npy" for name in ARRAYS)}


def _prepare_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; an existing trace directory is replaced only with ``overwrite``, any other is refused."""
    if out.exists():
        if not out.is_dir():
            raise TraceError(f"{out}: exists and is not a directory; choose another path")
        names = {p.name for p in out.iterdir()}
        foreign = names - _KNOWN_FILES - {STAGING, HEADER + ".tmp"}
        if foreign:
            raise TraceError(
                f"{out}: exists and holds files that are not a trace ({sorted(foreign)[:3]}); choose another path"
            )
        if names and not overwrite:
            what = "an unfinished recording" if names == {STAGING} else "a trace"
            raise TraceError(f"{out}: holds {what}; pass overwrite=True to replace it")
        for name in names - {STAGING}:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _blocks(n: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _write_npy(path: Path, src: np.ndarray, order: np.ndarray | None) -> dict[str, Any]:
    """Write ``src[order]`` (or ``src``) to ``path`` block by block; returns the header entry with its CRC-32."""
    n = src.shape[0]
    dtype = src.dtype.newbyteorder("<") if src.dtype.byteorder == ">" else src.dtype
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=src.shape)
    crc = 0
    row_bytes = int(np.prod(src.shape[1:], dtype=np.int64)) * dtype.itemsize
    for a, b in _blocks(n, row_bytes):
        block = np.ascontiguousarray(src[a:b] if order is None else src[order[a:b]], dtype=dtype)
        out[a:b] = block
        crc = zlib.crc32(block.tobytes(), crc)
    out.flush()
    del out
    return {"file": path.name, "dtype": dtype.str, "shape": list(src.shape), "crc32": crc}


def _write_header(
    out: Path,
    model: TraceModel,
    n: int,
    s: int,
    sketch_info: SketchInfo | None,
    entries: dict[str, dict[str, Any]],
    meta: dict[str, Any],
) -> None:
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": model.to_dict(),
        "num_tokens": n,
        "num_sequences": s,
        "sketch": dataclasses.asdict(sketch_info) if sketch_info is not None else None,
        "arrays": entries,
        "meta": meta,
    }
    tmp = out / (HEADER + ".tmp")
    tmp.write_text(json.dumps(header, indent=1, sort_keys=True))
    os.replace(tmp, out / HEADER)


def _read_header(path: Path) -> dict[str, Any]:
    hp = path / HEADER
    if not hp.exists():
        staged = (path / STAGING).exists()
        raise TraceError(
            f"{path}: no {HEADER}"
            + (
                ": the recording was not finished (the process stopped inside `record`)"
                if staged
                else ": not a Prophet trace"
            )
        )
    try:
        header = json.loads(hp.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{hp}: header is corrupt ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise TraceError(
            f"{hp}: not a {FORMAT_NAME} header (format={header.get('format') if isinstance(header, dict) else None!r})"
        )
    version = header.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise TraceError(
            f"{hp}: format version {version!r} is unknown to this Prophet (reads {list(SUPPORTED_VERSIONS)}); "
            "upgrade prophet-moe or re-export the trace"
        )
    for key in ("model", "num_tokens", "num_sequences", "arrays"):
        if key not in header:
            raise TraceError(f"{hp}: header lacks {key!r}")
    for key in ("num_tokens", "num_sequences"):
        if isinstance(header[key], bool) or not isinstance(header[key], int) or header[key] < 0:
            raise TraceError(f"{hp}: {key}={header[key]!r} must be a whole number >= 0; the header is damaged")
    if not isinstance(header["model"], dict):
        raise TraceError(f"{hp}: 'model' must be an object of model fields; the header is damaged")
    return header


def _entry_file(path: Path, name: str, entry: object) -> Path:
    """The file a header entry names, which must be a plain file inside the trace directory."""
    where = path / HEADER
    if not isinstance(entry, dict) or any(key not in entry for key in ("file", "dtype", "shape")):
        raise TraceError(f"{where}: array {name!r} needs an entry with 'file', 'dtype' and 'shape' (got {entry!r}); "
                         "the header is damaged: record or save the trace again")
    file = entry["file"]
    if not isinstance(file, str):
        raise TraceError(f"{where}: array {name!r} has file={file!r}; it must be a file name such as {name}.npy")
    fp = path / file
    if Path(file).is_absolute() or fp.resolve().parent != path.resolve():
        raise TraceError(f"{where}: array {name!r} points at {file!r}, outside the trace directory; a header may only "
                         "name files inside its own directory (e.g. experts.npy)")
    return fp


def _load_npy(path: Path, name: str, entry: dict[str, Any], verify: bool) -> np.ndarray:
    fp = _entry_file(path, name, entry)
    if not fp.exists():
        raise TraceError(f"{fp}: missing (the header lists it)")
    try:
        arr = np.load(fp, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{fp}: truncated or corrupt ({exc})") from exc
    if list(arr.shape) != list(entry["shape"]) or arr.dtype.str != entry["dtype"]:
        raise TraceError(
            f"{fp}: holds {arr.dtype.str} {list(arr.shape)} but the header says {entry['dtype']} {entry['shape']}"
        )
    if isinstance(arr, np.memmap):
        extra = fp.stat().st_size - arr.offset - arr.nbytes
        if extra:
            raise TraceError(
                f"{fp}: {extra} bytes more than the header's shape needs (corrupt or appended to)"
            )
    if verify:
        crc = 0
        row_bytes = arr.nbytes // max(arr.shape[0], 1) if arr.ndim else arr.nbytes
        for a, b in _blocks(arr.shape[0], row_bytes):
            crc = zlib.crc32(memoryview(np.ascontiguousarray(arr[a:b])).cast("B"), crc)
        if crc != entry.get("crc32"):
            raise TraceError(
                f"{fp}: checksum mismatch (crc32 {crc} != {entry.get('crc32')}): the file is corrupt"
            )
    return arr


def load_dir(path: Path, verify: bool = True) -> Trace:
    """Read a Prophet trace directory; arrays are read-only memory maps."""
    header = _read_header(path)
    try:
        model = TraceModel.from_dict(header["model"])
        sk = header.get("sketch")
        sketch_info = SketchInfo(**sk) if sk else None
    except (TypeError, TraceError) as exc:
        raise TraceError(f"{path / HEADER}: model description is invalid ({exc})") from exc
    entries = header["arrays"]
    if not isinstance(entries, dict):
        raise TraceError(f"{path / HEADER}: 'arrays' must map array names to entries; record or save the trace again")
    need = {"experts", "weights", "seq_offsets", "token_ids", "phase", "exact"} | (
        {"sketch"} if sketch_info else set()
    )
    missing = sorted(need - set(entries))
    if missing:
        raise TraceError(f"{path / HEADER}: arrays {missing} are not listed")
    arrays = {name: _load_npy(path, name, entries[name], verify) for name in sorted(need)}
    if (
        len(arrays["experts"]) != header["num_tokens"]
        or len(arrays["seq_offsets"]) != header["num_sequences"] + 1
    ):
        raise TraceError(
            f"{path}: header counts {header['num_tokens']} tokens in {header['num_sequences']} sequences, the arrays "
            f"hold {len(arrays['experts'])} tokens and {len(arrays['seq_offsets']) - 1} sequences"
        )
    return Trace(
        model,
        arrays["experts"],
        arrays["weights"],
        np.asarray(arrays["seq_offsets"]),
        token_ids=arrays["token_ids"],
        phase=arrays["phase"],
        exact=arrays["exact"],
        sketch=arrays.get("sketch"),
        sketch_info=sketch_info,
        meta=header.get("meta") or {},
        source=str(path),
    )


# -- streaming writer --------------------------------------------------------------------------------------


class TraceWriter:
    """Append tokens to a trace directory in bounded memory; `close` groups them by sequence.

    Tokens may arrive interleaved across sequences (a batched generate step holds one token of every row);
    each `append` goes straight to raw staging files on disk. `close` orders tokens by sequence (sequences
    in order of first appearance, tokens in append order) and copies them block by block into the final
    ``.npy`` files. The reorder holds a few int64 per token, never the routing data, so memory stays
    bounded by the block size (plus those indices) however long the recording.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: TraceModel,
        *,
        sketch_info: SketchInfo | None = None,
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.sketch_info = sketch_info
        self.meta = dict(meta or {})
        _prepare_dir(self.path, overwrite)
        self._staging = self.path / STAGING
        self._staging.mkdir(exist_ok=True)
        names = [*ARRAYS] if sketch_info else [n for n in ARRAYS if n != "sketch"]
        self._files = {name: open(self._staging / f"{name}.bin", "wb") for name in [*names, "seq"]}
        self.num_tokens = 0
        self._closed = False

    def _tail(self, name: str) -> tuple[int, ...]:
        d = self.sketch_info.dim if self.sketch_info else 0
        return ARRAYS[name][1](self.model.num_layers, self.model.top_k, d)

    def append(
        self,
        seq: np.ndarray,
        experts: np.ndarray,
        weights: np.ndarray,
        *,
        token_ids: np.ndarray | None = None,
        phase: np.ndarray | None = None,
        exact: np.ndarray | None = None,
        sketch: np.ndarray | None = None,
    ) -> None:
        """Append n tokens: ``seq [n]`` sequence ids (any ints), ``experts/weights [n, L, K]``, optional
        ``token_ids [n]``, ``phase [n]``, ``exact [n, L]``, ``sketch [n, L, D]`` (required iff the writer has a
        sketch). Tokens of one sequence must be appended in time order."""
        if self._closed:
            raise TraceError(f"{self.path}: writer is closed")
        n = len(seq)
        L = self.model.num_layers
        given = {
            "experts": experts,
            "weights": weights,
            "token_ids": token_ids if token_ids is not None else np.full(n, -1, np.int64),
            "phase": phase if phase is not None else np.full(n, Phase.UNKNOWN, np.uint8),
            "exact": exact if exact is not None else np.ones((n, L), bool),
        }
        if self.sketch_info is not None:
            if sketch is None:
                raise TraceError(f"{self.path}: this writer records a sketch; pass sketch=[n, L, D]")
            given["sketch"] = sketch
        for name, arr in given.items():
            want = (n, *self._tail(name))
            if tuple(arr.shape) != want:
                raise TraceError(
                    f"{self.path}: append got {name} of shape {list(arr.shape)}, expected {list(want)}"
                )
            self._files[name].write(np.ascontiguousarray(arr, dtype=ARRAYS[name][0]).tobytes())
        self._files["seq"].write(np.ascontiguousarray(seq, dtype="<i8").tobytes())
        self.num_tokens += n

    def close(self) -> Path:
        """Order by sequence, write the final arrays and the header, remove the staging files."""
        if self._closed:
            return self.path
        for f in self._files.values():
            f.close()
        self._closed = True
        n = self.num_tokens
        seq = _staged(self._staging / "seq.bin", np.dtype("<i8"), (), n)
        uniq, first = np.unique(seq, return_index=True)
        rank = np.empty(len(uniq), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
        key = rank[np.searchsorted(uniq, seq)]  # [N] sequence number in order of first appearance
        order = np.argsort(key, kind="stable") if n and (np.diff(key) < 0).any() else None
        counts = np.bincount(key, minlength=len(uniq)) if n else np.zeros(0, np.int64)
        seq_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        del seq, key
        entries = {}
        for name in self._files:
            if name == "seq":
                continue
            src = _staged(self._staging / f"{name}.bin", ARRAYS[name][0], self._tail(name), n)
            entries[name] = _write_npy(self.path / f"{name}.npy", src, order)
            del src
        entries["seq_offsets"] = _write_npy(self.path / "seq_offsets.npy", seq_offsets, None)
        _write_header(self.path, self.model, n, len(seq_offsets) - 1, self.sketch_info, entries, self.meta)
        self.abort_staging()
        return self.path

    def abort_staging(self) -> None:
        """Close and delete the staging files (what `close` does last; call alone to drop a recording)."""
        for f in self._files.values():
            f.close()
        self._closed = True
        if self._staging.exists():
            for p in self._staging.iterdir():
                p.unlink()
            self._staging.rmdir()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort_staging()


def _staged(path: Path, dtype: np.dtype, tail: tuple[int, ...], n: int) -> np.ndarray:
    if n == 0:
        return np.zeros((0, *tail), dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n, *tail))
