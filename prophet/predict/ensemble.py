"""Combining predictors, and the oracle that bounds them all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prophet.errors import ConfigError
from prophet.predict.base import RoutingPredictor
from prophet.predict.data import RouterTrace


class EnsemblePredictor(RoutingPredictor):
    """Weighted mean of member predictors' probabilities: members see every observation and are fitted
    together; a weight says how much a member's probabilities count, not how many experts it adds."""

    name = "ensemble"

    def __init__(self, members: Sequence[RoutingPredictor], weights: Sequence[float] | None = None, **kw: Any) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one member predictor")
        first = members[0]
        shapes = {(m.num_layers, m.num_experts) for m in members}
        if len(shapes) > 1:
            raise ConfigError(f"ensemble members disagree on (layers, experts): {sorted(shapes)}")
        super().__init__(first.num_layers, first.num_experts, first.top_k, **kw)
        self.members = list(members)
        w = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(members),) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"ensemble weights {list(w)}: need one non-negative weight per member, not all zero")
        self.weights = w / w.sum()
        self.name = "+".join(m.name for m in members)

    def fit(self, traces: Sequence[RouterTrace]) -> EnsemblePredictor:
        for m in self.members:
            m.fit(traces)
        return self

    def reset(self) -> None:
        super().reset()
        for m in self.members:
            m.reset()

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        for m in self.members:
            m.feed(layer, rows, weights, hidden)

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        return sum(
            w * m._scores(distances, shifts, layers) for w, m in zip(self.weights, self.members, strict=True) if w > 0
        )


class OraclePredictor(RoutingPredictor):
    """Reads the future from the trace being replayed: probability 1 for the experts that will be used.

    It must be fed the trace's own steps in order (token by token, all layers, sequences in order), as
    `prophet.predict.evaluate` does; it follows along by counting tokens, so `reset` keeps its place. Used
    for bounds: recall 1 by construction, and the best a predictor can do for prefetching or eviction.
    """

    name = "oracle"

    def __init__(self, trace: RouterTrace, **kw: Any) -> None:
        super().__init__(trace.num_layers, trace.num_experts, trace.top_k, **kw)
        self.hot = trace.multi_hot()  # [N, L, E]
        self.trace = trace
        self.row = -1  # trace row of the current token
        self._succ: list[np.ndarray] = [np.arange(trace.num_tokens)]  # [shift] -> [N] successor rows

    def _new_token(self, batch: int) -> None:
        self.row += 1
        if self.row >= self.trace.num_tokens:
            raise ConfigError(f"the oracle was fed more tokens than its trace holds ({self.trace.num_tokens})")

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        truth = sorted(int(e) for e in self.trace.experts[self.row, layer] if e >= 0)
        seen = sorted(set().union(*rows))
        if seen != truth:
            raise ConfigError(
                f"the oracle expected experts {truth} at token {self.row}, layer {layer}, but saw {seen}: "
                "feed it the trace it was built from, in order"
            )

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        while len(self._succ) <= shifts.max():
            self._succ.append(self.trace.successor(len(self._succ)))
        rows = np.array([self._succ[s][max(self.row, 0)] for s in shifts.tolist()])  # [D]
        out = np.zeros((len(distances), self.num_experts))
        ok = (rows >= 0) & (self.row >= 0)
        out[ok] = self.hot[rows[ok], layers[ok]]
        return out
