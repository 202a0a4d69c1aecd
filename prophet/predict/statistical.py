"""Predictors built from counting: layer frequency, previous-token reuse, cross-layer co-occurrence, and
activation-matrix matching (MoE-Infinity). All are routing-only and cost a few numpy operations per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prophet.errors import ConfigError
from prophet.predict.base import RoutingPredictor, union
from prophet.predict.data import RouterTrace


class FrequencyPredictor(RoutingPredictor):
    """How often each expert of a layer is used, per token: the baseline every other predictor must beat.

    Counts from `fit` and (``online``) from every observation; they survive `reset`, since popularity is a
    property of the model more than of one sequence. ``prior`` pseudo-tokens of uniform routing keep an
    unfitted predictor well defined.
    """

    name = "frequency"

    def __init__(
        self, num_layers: int, num_experts: int, top_k: int, online: bool = True, prior: float = 1.0, **kw: Any
    ) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.online = online
        self.counts = np.full((num_layers, num_experts), prior * top_k / num_experts)  # [L, E] uses
        self.steps = np.full(num_layers, prior)  # [L] tokens counted
        self.prob = self.probabilities()  # [L, E] kept current, so scoring is one gather

    def fit(self, traces: Sequence[RouterTrace]) -> FrequencyPredictor:
        for tr in traces:
            recorded = tr.experts[..., 0] >= 0  # [N, L]
            self.counts += tr.multi_hot().sum(axis=0)
            self.steps += recorded.sum(axis=0)
        self.prob = self.probabilities()
        return self

    def probabilities(self) -> np.ndarray:
        """``[L, E]`` share of tokens that use each expert."""
        return self.counts / self.steps[:, None]

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        if self.online:
            counts = self.counts[layer]
            for row in rows:
                for e in row:  # scalar updates: cheaper than a fancy-indexed add for a handful of ids
                    counts[e] += 1.0
            self.steps[layer] += len(rows)
            np.divide(counts, self.steps[layer], out=self.prob[layer])  # <= 1: an expert is used once a token

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        return self.prob.take(layers, axis=0)


class ReusePredictor(RoutingPredictor):
    """The experts a layer used at its most recent step (the previous token's, for layers not yet reached).

    ``decay > 0`` turns "the last step" into an exponentially weighted recent frequency, bias-corrected so
    the scores stay probabilities.
    """

    name = "reuse"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, decay: float = 0.0, **kw: Any) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.decay = decay
        self.state = np.zeros((num_layers, num_experts))  # [L, E] decayed use indicator
        self.weight = np.zeros(num_layers)  # [L] 1 - decay^updates, the bias correction
        self.prob = np.zeros((num_layers, num_experts))  # [L, E] state / weight, kept current

    def reset(self) -> None:
        super().reset()
        self.state[:] = 0.0
        self.weight[:] = 0.0
        self.prob[:] = 0.0

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        state = self.state[layer]
        state *= self.decay
        for e in rows[0] if len(rows) == 1 else set().union(*rows):  # any token of the batch
            state[e] += 1.0 - self.decay
        self.weight[layer] = weight = self.decay * self.weight[layer] + (1.0 - self.decay)
        np.divide(state, weight, out=self.prob[layer])

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        return self.prob.take(layers, axis=0)


class CoOccurrencePredictor(RoutingPredictor):
    """P(expert j at distance d | expert i at the current layer), counted on aligned pairs of fitted traces.

    One table per look-ahead distance ``d = 1..max_distance`` and source layer (``[D, L, E, E]``): a direct
    d-hop estimate is sharper than chaining one-hop tables, and the next token's layers are just larger d.
    ``order > 1`` averages the estimates from the last ``order`` layers of the token. Only pairs whose rows
    are both exact count (see the traces README). Rows are smoothed towards the target layer's frequency
    with ``alpha`` pseudo-observations.
    """

    name = "cooccurrence"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        max_distance: int | None = None,
        order: int = 1,
        alpha: float = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.max_distance = max_distance or 2 * num_layers
        self.order = order
        self.alpha = alpha
        d, L, E = self.max_distance + order - 1, num_layers, num_experts
        self.table = np.full((d, L, E, E), top_k / E, dtype=np.float32)  # [D', L, E(src), E(dst)]
        self.freq = np.full((L, E), top_k / E)  # [L, E] fallback beyond the tables
        self.recent: list[tuple[int, list[list[int]]]] = []  # (layer, rows) of this token, newest last

    def fit(self, traces: Sequence[RouterTrace]) -> CoOccurrencePredictor:
        L, E = self.num_layers, self.num_experts
        counts = np.zeros(self.table.shape)
        sources = np.zeros(self.table.shape[:3])  # [D', L, E]
        uses, steps = np.zeros((L, E)), np.zeros(L)
        for tr in traces:
            hot = tr.multi_hot()  # [N, L, E]
            uses += hot.sum(axis=0)
            steps += (tr.experts[..., 0] >= 0).sum(axis=0)
            for d in range(1, self.table.shape[0] + 1):
                src_row, src_layer, dst_row, dst_layer = tr.pairs(d)
                x, y = hot[src_row, src_layer], hot[dst_row, dst_layer]  # [P, E] each
                for layer in range(L):
                    sel = src_layer == layer
                    counts[d - 1, layer] += x[sel].T @ y[sel]
                    sources[d - 1, layer] += x[sel].sum(axis=0)
        self.freq = (uses + self.top_k / E) / (steps[:, None] + 1.0)
        dst = (np.arange(L)[None, :] + np.arange(1, self.table.shape[0] + 1)[:, None]) % L  # [D', L] target layer
        prior = self.freq[dst][:, :, None, :]  # [D', L, 1, E]
        self.table = ((counts + self.alpha * prior) / (sources[..., None] + self.alpha)).astype(np.float32)
        return self

    def reset(self) -> None:
        super().reset()
        self.recent = []

    def _new_token(self, batch: int) -> None:
        self.recent = []

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        self.recent.append((layer, rows))
        del self.recent[: -self.order]

    def _estimate(self, layer: int, row: list[int], dist: np.ndarray) -> np.ndarray:
        """``[D, E]``: expected use at ``dist`` steps after a token used ``row`` at ``layer``."""
        D = self.table.shape[0]
        if len(dist) == 1 and row and dist[0] <= D:  # the common case: one view, one gather, one mean
            return self.table[dist[0] - 1, layer][row].mean(axis=0, keepdims=True)
        out = self.freq[(layer + dist) % self.num_layers]
        inside = dist <= D
        if row and inside.any():
            out[inside] = self.table[dist[inside, None] - 1, layer, np.asarray(row)[None, :]].mean(axis=1)
        return out

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        if not self.recent:
            return self.freq[layers]
        if len(self.recent) == 1 and len(self.recent[0][1]) == 1:  # order 1, batch 1
            layer, rows = self.recent[0]
            return self._estimate(layer, rows[0], distances)
        rows = len(self.recent[-1][1])
        acc = np.zeros((rows, len(distances), self.num_experts))
        for back, (layer, older) in enumerate(reversed(self.recent)):
            for t, row in enumerate(older[:rows]):
                acc[t] += self._estimate(layer, row, distances + back)
        return union(acc / len(self.recent))


class ActivationMatrixPredictor(RoutingPredictor):
    """MoE-Infinity's expert activation matrix: match this sequence's running ``[L, E]`` use counts against
    stored sequences' matrices (cosine similarity) and predict from the ``matches`` most similar.

    Stored matrices come from `fit` and, with ``learn_online``, from every finished sequence (as MoE-Infinity
    grows its collection), at most ``max_online`` of them (the oldest dropped first; fitted ones are kept). A
    sequence's own matrix gains weight as it grows (``tokens / (tokens + trust)``), since its own history
    predicts its future better than any stored one once there is enough of it.
    """

    name = "activation_matrix"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        matches: int = 3,
        trust: float = 16.0,
        learn_online: bool = True,
        max_online: int = 1024,
        **kw: Any,
    ) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        if isinstance(max_online, bool) or not isinstance(max_online, int) or max_online < 1:
            raise ConfigError(f"max_online={max_online!r}: give the most finished sequences to remember (at least 1)")
        self.max_online = max_online
        self.fitted = 0  # library rows [0, fitted) come from `fit` and are never dropped
        self.matches = matches
        self.trust = trust
        self.learn_online = learn_online
        self.library = np.zeros((0, num_layers, num_experts))  # [S, L, E] share of tokens using each expert
        self.counts = np.zeros((num_layers, num_experts))  # [L, E] this sequence's uses
        self.steps = np.zeros(num_layers)  # [L] this sequence's tokens per layer
        self._matched: np.ndarray | None = None

    def fit(self, traces: Sequence[RouterTrace]) -> ActivationMatrixPredictor:
        mats = []
        for tr in traces:
            hot = tr.multi_hot()  # [N, L, E]
            recorded = tr.experts[..., 0] >= 0  # [N, L]
            for s in range(tr.num_sequences):
                a, b = tr.seq_offsets[s], tr.seq_offsets[s + 1]
                mats.append(hot[a:b].sum(axis=0) / np.maximum(recorded[a:b].sum(axis=0), 1)[:, None])
        if mats:
            self.library = np.concatenate([self.library, np.stack(mats)])
        self.fitted = len(self.library)
        return self

    def reset(self) -> None:
        if self.learn_online and self.steps.any():
            kept = self.library[self.fitted :][-(self.max_online - 1) :] if self.max_online > 1 else self.library[:0]
            self.library = np.concatenate([self.library[: self.fitted], kept,
                                           (self.counts / np.maximum(self.steps, 1)[:, None])[None]])
        super().reset()
        self.counts[:] = 0.0
        self.steps[:] = 0.0
        self._matched = None

    def _new_token(self, batch: int) -> None:
        self._matched = None  # match again once per token, as MoE-Infinity does per iteration

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        counts = self.counts[layer]
        for row in rows:
            for e in row:
                counts[e] += 1.0
        self.steps[layer] += len(rows)

    def matched(self) -> np.ndarray:
        """``[L, E]`` the stored matrices most similar to this sequence's so far, similarity-weighted."""
        if self._matched is not None:
            return self._matched
        if not len(self.library):
            self._matched = np.full((self.num_layers, self.num_experts), self.top_k / self.num_experts)
            return self._matched
        flat = self.library.reshape(len(self.library), -1)  # [S, L*E]
        q = self.counts.ravel()
        sim = flat @ q / (np.linalg.norm(flat, axis=1) * max(np.linalg.norm(q), 1e-12) + 1e-12)  # [S] cosine
        best = np.argsort(-sim)[: self.matches]
        w = np.maximum(sim[best], 0.0) + 1e-6
        self._matched = np.tensordot(w / w.sum(), self.library[best], axes=1)
        return self._matched

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        matched = self.matched()
        if len(layers) == 1:  # scalar arithmetic for the common case
            j = int(layers[0])
            steps = float(self.steps[j])
            lam = steps / (steps + self.trust)  # trust in this sequence's own counts
            return ((1.0 - lam) * matched[j] + (lam / max(steps, 1.0)) * self.counts[j])[None]
        steps = self.steps[layers, None]
        lam = steps / (steps + self.trust)  # [D, 1]
        return (1.0 - lam) * matched[layers] + lam * self.counts[layers] / np.maximum(steps, 1.0)
