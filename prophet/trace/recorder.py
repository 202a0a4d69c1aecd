"""Record a model's routing while it runs: ``with prophet.trace.record(model, path): model.generate(...)``.

Hooks only read: a forward pre-hook on each MoE layer's experts module sees ``(hidden [T,H], top_k_index
[T,K], top_k_weights [T,K])`` exactly as the experts will, and a pre-hook on the top-level model (with its
kwargs) sees ``input_ids``, ``attention_mask`` and the KV cache, which say which of the T = B*S rows are real
tokens, which sequence each belongs to and whether the step is prefill or decode. Nothing is written into
the model or its inputs, and no random number generator is touched, so outputs are unchanged.

Sequences: a forward whose cache is empty starts one new sequence per batch row; a forward with a non-empty
cache continues the current rows. The cache is found by type, whatever the keyword it came under is called in
the installed transformers (`prophet.compat.cached_tokens`); a forward whose cache cannot be read raises
`TraceError` rather than recording every decode step as a new sequence.

Cost: per forward the hooks only copy the router outputs on the model's device and keep references; every
`FLUSH_EVERY` forwards (and at exit) the pending forwards are processed together: runs of same-shaped forwards
(a decode loop) are stacked into one device-to-host copy per array and streamed to disk by a `TraceWriter`,
which groups the tokens of each row contiguously when the recording closes (see `TraceWriter` for the memory
bound). Memory is bounded by `FLUSH_EVERY` forwards.

Rows that are not tokens are skipped: left (or right) padding, by the attention mask; and, in batched
``generate``, rows that already finished: once a decode step feeds a row its end-of-sequence token, that row's
later forwards only produce padding that a serving engine would never compute, so they are not recorded.
Beam search reorders rows between steps and is not supported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prophet.compat import cached_tokens
from prophet.errors import TraceError
from prophet.models import moe_layers
from prophet.models.adapter import Adapter, MoELayer
from prophet.trace.format import Phase, SketchInfo, TraceModel, TraceWriter
from prophet.trace.sketch import sketch_projection

log = logging.getLogger(__name__)


def trace_model(
    model: nn.Module, adapter: Adapter | None = None, layers: list[MoELayer] | None = None
) -> TraceModel:
    """The `TraceModel` of an adapter-supported model (its MoE layers, experts and top-k)."""
    layers = layers if layers is not None else moe_layers(model, adapter)
    config = getattr(model, "config", None)
    tops = {ly.top_k for ly in layers}
    nexp = {ly.num_experts for ly in layers}
    if len(tops) != 1 or len(nexp) != 1:
        raise TraceError(
            f"MoE layers disagree on top_k {sorted(tops)} or num_experts {sorted(nexp)}; a trace needs one of each"
        )
    return TraceModel(
        name=str(getattr(config, "name_or_path", "") or type(model).__name__),
        model_type=str(getattr(config, "model_type", "unknown")),
        num_layers=len(layers),
        num_experts=nexp.pop(),
        top_k=tops.pop(),
        layer_indices=tuple(ly.layer_index for ly in layers),
        hidden_size=layers[0].fmt.hidden_size,
    )


FLUSH_EVERY = 64  # forwards kept on the device before they are copied out and written

# one MoE layer in one forward, as the model produced them: expert ids [T,K], weights [T,K], sketch [T,D] or None
Routing = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass
class _Forward:
    """What one top-level forward leaves for `Recorder._flush`: its shape, its sequences and its routing."""

    batch: int
    seq_len: int
    past: int  # tokens already in the cache (0 = a new batch)
    first_seq: int  # sequence id of batch row 0
    token_ids: torch.Tensor | None  # [B, S] input ids (None when the model got embeddings)
    mask: torch.Tensor | None  # [B, S] attention mask of the new tokens (None = all real)
    layers: list[Routing | None]  # per MoE layer, None where the layer did not run

    @property
    def phase(self) -> Phase:
        return Phase.PREFILL if (self.seq_len > 1 or self.past == 0) else Phase.DECODE


class Recorder:
    """Context manager returned by `record`; ``num_tokens`` counts what was recorded so far."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        hidden_sketch: int = 0,
        sketch_seed: int = 0,
        adapter: Adapter | None = None,
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if hidden_sketch < 0:
            raise TraceError(f"hidden_sketch={hidden_sketch}: use 0 (off) or the sketch size in dims")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise TraceError(
                f"{path}: recording encoder-decoder models is not supported: their encoder and decoder MoE layers "
                "see different tokens, and a trace needs every token to pass every recorded layer"
            )
        self.model = model
        self.path = path
        self.layers = moe_layers(model, adapter)
        self.info = trace_model(model, layers=self.layers)
        self.sketch_info = SketchInfo(dim=hidden_sketch, seed=sketch_seed) if hidden_sketch else None
        self.meta = {"recorder": "prophet.trace.record", **(meta or {})}
        self.overwrite = overwrite
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = np.asarray(
            eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]), np.int64
        )
        self.writer: TraceWriter | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._current: _Forward | None = None  # the forward running now
        self._pending: list[_Forward] = []  # completed forwards not yet written
        self._next_seq = 0
        self._batch_seq = 0  # sequence id of row 0 of the current batch
        self._batch_rows = 0
        self._finished: np.ndarray = np.zeros(0, bool)  # [B] rows of the current batch that fed their EOS
        self._proj: dict[torch.device, torch.Tensor] = {}

    @property
    def num_tokens(self) -> int:
        return self.writer.num_tokens if self.writer is not None else 0

    # -- context -----------------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self.writer = TraceWriter(
            self.path, self.info, sketch_info=self.sketch_info, meta=self.meta, overwrite=self.overwrite
        )
        self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end, always_call=False))
        for layer in self.layers:
            self._handles.append(
                layer.experts.register_forward_pre_hook(self._layer_hook(layer), with_kwargs=True)
            )
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = None
        self._flush()
        assert self.writer is not None
        if self.writer.num_tokens == 0:
            self.writer.abort_staging()
            if exc_type is None:
                raise TraceError(
                    f"{self.path}: nothing was recorded; call the model inside the `with record(...)` block"
                )
            return
        if exc_type is not None:
            log.warning(
                "recording interrupted by %s; keeping the %d tokens of completed forwards",
                exc_type,
                self.num_tokens,
            )
        self.writer.close()

    # -- hooks (per forward: no host copies, no syncs) ------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            b, s = ids.shape[:2]
        elif embeds is not None:
            b, s = embeds.shape[:2]
        else:
            raise TraceError(f"{self.path}: the model was called without input_ids or inputs_embeds")
        past = cached_tokens(args, kwargs)
        if past is None:
            raise TraceError(
                f"{self.path}: cannot tell whether this forward starts a sequence or continues one: pass the KV "
                f"cache as one transformers Cache (got keywords {sorted(k for k, v in kwargs.items() if v is not None)})"
            )
        if past == 0:  # a new batch: one new sequence per row
            self._batch_seq, self._batch_rows = self._next_seq, b
            self._next_seq += b
        elif b != self._batch_rows:
            raise TraceError(
                f"{self.path}: batch of {b} rows continues a cache of {self._batch_rows} rows; the recorder follows "
                "rows across steps and cannot handle beam search or rows that change between steps"
            )
        mask = kwargs.get("attention_mask")
        self._current = _Forward(
            batch=b,
            seq_len=s,
            past=past,
            first_seq=self._batch_seq,
            token_ids=None if ids is None else ids.detach().clone(),
            mask=mask[:, -s:].detach().clone() if mask is not None and mask.dim() == 2 else None,
            layers=[None] * len(self.layers),
        )

    def _layer_hook(self, layer: MoELayer):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fwd = self._current
            if fwd is None:
                return  # experts called outside a recorded top-level forward
            if layer.unpack_call is not None:
                hidden, idx, w = layer.unpack_call(*args, **kwargs)
            else:
                names = ("hidden_states", "top_k_index", "top_k_weights")
                vals = list(args[:3]) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
                if len(vals) != 3:
                    raise TraceError(
                        f"layer {layer.name}: experts called with unexpected arguments; give the adapter an unpack_call"
                    )
                hidden, idx, w = vals
            t = fwd.batch * fwd.seq_len
            if idx.shape[0] != t:
                raise TraceError(
                    f"{self.path}: layer {layer.name} routed {idx.shape[0]} rows in a forward of {fwd.batch}x{fwd.seq_len} "
                    "tokens; the recorder needs one row per token"
                )
            sketch = None
            if self.sketch_info is not None:
                sketch = (hidden.detach().reshape(t, -1).float() @ self._projection(hidden)).half()
            # clones on the model's device (the experts module may rewrite its inputs in place); dtypes are
            # converted once per flush, not here
            fwd.layers[layer.moe_index] = (idx.detach().clone(), w.detach().clone(), sketch)

        return hook

    def _projection(self, hidden: torch.Tensor) -> torch.Tensor:
        """[H, D] `sketch_projection`, drawn once per device."""
        if hidden.device not in self._proj:
            assert self.sketch_info is not None
            self._proj[hidden.device] = sketch_projection(hidden.shape[-1], self.sketch_info, hidden.device)
        return self._proj[hidden.device]

    def _end(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        fwd, self._current = self._current, None
        if fwd is not None and any(entry is not None for entry in fwd.layers):
            self._pending.append(fwd)
            if len(self._pending) >= FLUSH_EVERY:
                self._flush()

    # -- batched processing ----------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the pending forwards, stacking each run of same-shaped forwards of one batch."""
        pending, self._pending = self._pending, []
        start = 0
        for i in range(1, len(pending) + 1):
            if i == len(pending) or _run_key(pending[i]) != _run_key(pending[start]):
                self._write_run(pending[start:i])
                start = i

    def _write_run(self, run: list[_Forward]) -> None:
        """Append forwards of equal shape from one batch, in order: [n forwards, B rows, S positions]."""
        first = run[0]
        n, b, s, K = len(run), first.batch, first.seq_len, self.info.top_k
        if first.past == 0:
            self._finished = np.zeros(b, bool)
        like = next(e for e in first.layers if e is not None)
        missing: Routing = (  # a layer that did not run in a forward stays "not recorded"
            torch.full((b * s, K), -1, dtype=like[0].dtype, device=like[0].device),
            torch.full((b * s, K), float("nan"), dtype=like[1].dtype, device=like[1].device),
            None if like[2] is None else torch.zeros_like(like[2]),
        )

        def stacked(part: int, dtype: torch.dtype) -> np.ndarray:  # [n, B*S, L, ...], one device->host copy
            parts = [torch.stack([(e or missing)[part] for e in f.layers], 1) for f in run]
            return torch.stack(parts).to(dtype).cpu().numpy()

        experts, weights = stacked(0, torch.int16), stacked(1, torch.float32)
        sketch = stacked(2, torch.float16) if self.sketch_info else None
        exact = np.array([[e is not None for e in f.layers] for f in run])[:, None, :]  # [n, 1, L]
        tok = (
            torch.stack([f.token_ids for f in run]).cpu().numpy().astype(np.int64)
            if first.token_ids is not None
            else np.full((n, b, s), -1, np.int64)
        )
        keep = (
            torch.stack([f.mask for f in run]).cpu().numpy() != 0
            if first.mask is not None
            else np.ones((n, b, s), bool)
        )
        if first.phase is Phase.DECODE and self.eos.size:
            for j in range(n):  # a row ends at the forward that feeds it EOS; later forwards only pad it
                self._finished |= (tok[j, :, 0:1] == self.eos[None, :]).any(1) & keep[j, :, 0]
                keep[j] &= ~self._finished[:, None]
        keep = keep.reshape(n, b * s)
        seq = np.broadcast_to(np.repeat(np.arange(first.first_seq, first.first_seq + b), s), (n, b * s))
        m = int(keep.sum())
        if m == 0:
            return
        assert self.writer is not None
        self.writer.append(
            seq[keep],
            experts[keep],
            weights[keep],
            token_ids=tok.reshape(n, b * s)[keep],
            phase=np.full(m, first.phase, np.uint8),
            exact=np.broadcast_to(exact, (n, b * s, exact.shape[-1]))[keep],
            sketch=None if sketch is None else sketch[keep],
        )


def _run_key(f: _Forward) -> tuple[Any, ...]:
    """Forwards with equal keys can be stacked: same shape, same batch, same phase, same kind of inputs."""
    return (f.batch, f.seq_len, f.first_seq, f.phase, f.token_ids is None, f.mask is None)


def record(
    model: nn.Module,
    path: str | os.PathLike[str],
    hidden_sketch: int = 0,
    *,
    sketch_seed: int = 0,
    adapter: Adapter | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Recorder:
    """Record every forward of ``model`` inside the ``with`` block into the trace directory ``path``.

    ``hidden_sketch=D > 0`` also stores a D-dim float16 random projection of each router input (seeded by
    ``sketch_seed``), for predictors that look at hidden states. ``adapter`` overrides the adapter table for
    models of an unregistered family. The trace is written when the block exits.
    """
    return Recorder(
        model,
        path,
        hidden_sketch=hidden_sketch,
        sketch_seed=sketch_seed,
        adapter=adapter,
        meta=meta,
        overwrite=overwrite,
    )
