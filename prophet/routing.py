"""Forced routing: every MoE layer runs the experts a router trace recorded, token by token.

A model with random weights routes near-uniformly, which makes an expert cache look worse than it is. Forcing
each layer's choice from a real trace gives realistic caching (the trace's popularity, reuse and co-occurrence)
without the real weights: the experts module of every MoE layer gets a forward pre-hook that replaces its
``top_k_index`` argument with the trace's ids for the tokens of the current forward. The router's own weights are
kept, and so is its choice wherever the trace recorded none (id -1); such a filled-in choice may repeat an expert
the trace gave the same token (run twice, each with its weight), and the simulator, which skips unrecorded ids,
differs from the real run on those rows. The hooks sit on whatever module is the layer's experts when `attach` runs (the family's own, or Prophet's
`OffloadedExperts`), so a wrapped and an unwrapped model replay identical routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prophet.errors import TraceError, UnsupportedModelError
from prophet.models.adapter import MoELayer


class ForcedRouting:
    """The routing of ``rows`` of a trace, played one forward call at a time.

    experts  int  [N, L, K]  the trace's expert ids, -1 where unrecorded (L >= the model's MoE layers; the first
                             ones are used)
    rows     int  [S, B]     trace row of lane b at position s: a forward over ``n`` new tokens per lane plays
                             positions ``pos .. pos+n-1`` (the prompt is several positions, a decode step one)
    """

    def __init__(self, experts: np.ndarray, rows: np.ndarray, device: torch.device | str) -> None:
        if experts.ndim != 3 or rows.ndim != 2:
            raise TraceError(f"forced routing needs experts [N, L, K] and rows [S, B], got {experts.shape} and {rows.shape}")
        self.experts = torch.as_tensor(np.ascontiguousarray(experts), dtype=torch.int64, device=device)  # [N, L, K]
        self.rows = rows
        self.pos = 0
        self._current: torch.Tensor | None = None  # [T, L, K] for the forward under way
        self._handles: list[Any] = []

    @property
    def batch(self) -> int:
        return int(self.rows.shape[1])

    @property
    def positions(self) -> int:
        return int(self.rows.shape[0])

    def begin(self, tokens_per_lane: int) -> None:
        """Route the next forward call: ``tokens_per_lane`` new tokens for each of the ``batch`` lanes."""
        if self.pos + tokens_per_lane > self.positions:
            raise TraceError(f"forced routing has {self.positions} positions; {self.pos + tokens_per_lane} were asked for")
        rows = self.rows[self.pos : self.pos + tokens_per_lane].T.reshape(-1)  # [B*n], token t = b*n + p
        self._current = self.experts[torch.as_tensor(rows, device=self.experts.device)]  # [T, L, K]
        self.pos += tokens_per_lane

    def reset(self) -> None:
        """Start again from position 0 (a new run over the same rows)."""
        self.pos, self._current = 0, None

    def attach(self, layers: Sequence[MoELayer]) -> ForcedRouting:
        """Hook the current experts module of each of ``layers`` (MoE layer i plays trace layer i)."""
        self.detach()
        if len(layers) > self.experts.shape[1]:
            raise TraceError(f"the trace has {self.experts.shape[1]} MoE layers, the model {len(layers)}")
        for i, layer in enumerate(layers):
            module = getattr(layer.parent, layer.attr)
            self._handles.append(module.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: int) -> Any:
        def replace(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._current is None:
                raise TraceError("forced routing: call begin(tokens_per_lane) before each forward")
            forced = self._current[:, layer]  # [T, K]
            if len(args) < 2 and "top_k_index" not in kwargs:
                raise UnsupportedModelError(
                    f"{type(module).__name__}: forced routing needs experts called as experts(hidden, top_k_index, "
                    "top_k_weights); this family calls its experts differently"
                )
            given = args[1] if len(args) > 1 else kwargs["top_k_index"]
            if given.shape != forced.shape:
                raise TraceError(
                    f"MoE layer {layer}: the model routes {tuple(given.shape)} (tokens, top-k) but the trace gives "
                    f"{tuple(forced.shape)}; use a trace of this model's top-k and call begin() with the tokens per "
                    "lane (a family whose experts take a routing mask instead of top_k_index cannot be forced)"
                )
            forced = torch.where(forced >= 0, forced, given)  # unrecorded: the router's own choice
            if len(args) > 1:
                return (args[0], forced, *args[2:]), kwargs
            return args, {**kwargs, "top_k_index": forced}

        return replace
