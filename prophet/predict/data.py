"""The slice of a router trace that predictors learn from, and the arithmetic of look-ahead distances.

Predictors and the evaluation harness only need the routing arrays, so they take a `RouterTrace`: any object
with ``experts``/``weights``/``seq_offsets``/``exact`` (a `prophet.trace.Trace` qualifies) is converted by
`as_router_trace`. A look-ahead *distance* ``d`` counts MoE-layer steps in execution order: from layer ``l``
of token ``t`` it reaches layer ``(l + d) % L`` of token ``t + (l + d) // L``; ``d = L`` is the same layer of
the next token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import prophet.trace
from prophet.errors import ConfigError


@dataclass(frozen=True)
class RouterTrace:
    """Routing of N tokens, S sequences, L MoE layers, top-K of E experts.

    experts     int      [N, L, K]  expert ids, -1 where not recorded
    weights     float32  [N, L, K]  router weights (NaN where not recorded)
    seq_offsets int64    [S+1]      sequence s is rows seq_offsets[s]:seq_offsets[s+1]
    exact       bool     [N, L]     False where the row's token alignment across layers is uncertain
    hidden      float32  [N, L, H]  router inputs (or a reconstruction), only for hidden-state predictors
    """

    experts: np.ndarray
    weights: np.ndarray
    seq_offsets: np.ndarray
    exact: np.ndarray
    num_experts: int
    hidden: np.ndarray | None = None
    name: str = "trace"

    def __post_init__(self) -> None:
        n, L, _ = self.experts.shape
        if self.exact.shape != (n, L) or self.weights.shape != self.experts.shape:
            raise ConfigError(f"{self.name}: experts {self.experts.shape}, weights {self.weights.shape} and exact "
                              f"{self.exact.shape} disagree; exact must be [N, L]")
        if self.seq_offsets[0] != 0 or self.seq_offsets[-1] != n or (np.diff(self.seq_offsets) < 0).any():
            raise ConfigError(f"{self.name}: seq_offsets must rise from 0 to N={n}")
        if self.experts.max() >= self.num_experts:
            raise ConfigError(f"{self.name}: expert id {self.experts.max()} >= num_experts={self.num_experts}")
        if self.hidden is not None and self.hidden.shape[:2] != (n, L):
            raise ConfigError(f"{self.name}: hidden must be [N, L, H], got {self.hidden.shape}")

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def sequences(self, idx: Sequence[int]) -> RouterTrace:
        """The trace of sequences ``idx``, in that order (a copy)."""
        rows = np.concatenate([np.arange(self.seq_offsets[s], self.seq_offsets[s + 1]) for s in idx])
        lengths = [int(self.seq_offsets[s + 1] - self.seq_offsets[s]) for s in idx]
        return RouterTrace(
            experts=self.experts[rows],
            weights=self.weights[rows],
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            exact=self.exact[rows],
            num_experts=self.num_experts,
            hidden=None if self.hidden is None else self.hidden[rows],
            name=f"{self.name}[{','.join(map(str, idx))}]",
        )

    def multi_hot(self) -> np.ndarray:
        """``[N, L, E]`` float32: 1 where a token used an expert at a layer."""
        return multi_hot(self.experts, self.num_experts)

    def successor(self, shift: int) -> np.ndarray:
        """``[N]`` int64: the row ``shift`` tokens later in the same sequence, -1 past the sequence's end."""
        seq = np.repeat(np.arange(self.num_sequences), np.diff(self.seq_offsets))
        rows = np.arange(self.num_tokens) + shift
        ok = rows < self.seq_offsets[seq + 1]
        return np.where(ok, rows, -1)

    def pairs(self, distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Aligned (source, target) steps ``distance`` apart whose rows are recorded and both exact.

        Returns ``src_row, src_layer, dst_row, dst_layer``, each ``[P]`` int64.
        """
        L = self.num_layers
        n_idx, l_idx = np.meshgrid(np.arange(self.num_tokens), np.arange(L), indexing="ij")  # [N, L]
        shift, dst_layer = divmod(l_idx + distance, L)
        succ = np.stack([self.successor(s) for s in range(int(shift.max()) + 1)])  # [shifts, N]
        dst_row = succ[shift, n_idx]
        recorded = self.experts[..., 0] >= 0  # [N, L]
        ok = (dst_row >= 0) & self.exact & recorded
        ok[ok] &= self.exact[dst_row[ok], dst_layer[ok]] & recorded[dst_row[ok], dst_layer[ok]]
        return n_idx[ok], l_idx[ok], dst_row[ok], dst_layer[ok]


def multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``ids [..., K]`` (negative = none) -> ``[..., E]`` float32 indicator."""
    out = np.zeros((*ids.shape[:-1], num_experts), np.float32)
    valid = ids >= 0
    lead = np.nonzero(valid)
    out[(*lead[:-1], ids[valid])] = 1.0
    return out


def as_router_trace(trace: Any, hidden: np.ndarray | None = None) -> RouterTrace:
    """A `RouterTrace` view of a `prophet.trace.Trace` (or anything with the same arrays)."""
    if isinstance(trace, RouterTrace):
        return trace if hidden is None else RouterTrace(**{**trace.__dict__, "hidden": hidden})
    experts = np.asarray(trace.experts)
    num_experts = int(getattr(trace, "num_experts", 0) or experts.max() + 1)
    return RouterTrace(
        experts=experts.astype(np.int64),
        weights=np.asarray(trace.weights, np.float32),
        seq_offsets=np.asarray(trace.seq_offsets, np.int64),
        exact=np.asarray(trace.exact, bool),
        num_experts=num_experts,
        hidden=hidden,
        name=Path(str(getattr(trace, "source", None) or "trace")).stem,
    )


def load(path: str | Path) -> RouterTrace:
    """Any trace `prophet.trace.load` reads (a shared ``NAME.npz``, a Prophet trace directory, ...)."""
    return as_router_trace(prophet.trace.load(path))
