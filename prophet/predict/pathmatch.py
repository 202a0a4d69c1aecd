"""Nearest routing paths: find stored tokens whose experts at this token's layers so far match best, and
predict what those tokens used next.

A token's routing path through the layers is a fingerprint of the token in its context: tokens with the same
path up to layer l mostly continue alike, far more than one layer's co-occurrence says (Mixtral next-layer
recall@2 0.29 for co-occurrence out of sample, 0.49-0.68 for path matching). The stored tokens come from `fit`
and, online, from the sequence being generated (a repeated phrase finds its earlier occurrence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prophet.errors import ConfigError
from prophet.predict.base import RoutingPredictor, union
from prophet.predict.data import RouterTrace
from prophet.predict.pathmatch_kernel import PathMatchKernel


# `PathMatchPredictor` remembers how at most this many sets of look-ahead distances group by layer.
_MAX_GROUPS = 4096


def nearest(sim: np.ndarray, n: int) -> np.ndarray:
    """The rows of the ``n`` largest ``(similarity, row)`` pairs of ``sim [M]`` (all rows when ``n >= M``).

    The one tie rule of every path (numpy and `prophet/pathmatch.c`): among rows tied at the cut the latest
    win, the most recent context, so the neighbours do not depend on how a partial sort orders ties."""
    m = len(sim)
    if n >= m:
        return np.arange(m)
    top = sim.argpartition(m - n)[m - n :]
    cut = sim.take(top).min()
    tied = sim == cut
    if np.count_nonzero(tied) == np.count_nonzero(sim.take(top) == cut):
        return top  # every row at the cut is in: no choice was made
    above = np.flatnonzero(sim > cut)
    return np.concatenate([above, np.flatnonzero(tied)[len(above) - n :]])


class PathMatchReference(RoutingPredictor):
    """k-nearest-neighbour prediction over routing paths, the plain version (`PathMatchPredictor` is the same
    with faster batch-1 paths; tests hold the two to the same predictions).

    Similarity of a stored token ``u`` to the current one is ``sum_l decay^(m-l) * |experts_u(l) & experts(l)|``
    over the layers ``l <= m`` seen so far, plus ``carry`` times the previous token's similarity to ``u``'s
    predecessor (so the first layers of a token are not matched blind). The ``neighbours`` most similar
    tokens vote for the experts at each look-ahead distance, weighted by ``similarity ** power``, smoothed
    towards the layer's frequency with ``prior`` votes. Entries of fitted traces that are not exact are
    left out, so misaligned rows neither match nor vote. ``online`` (batch 1 only) adds each finished token
    of the current sequence to the memory; the memory outlives `reset` (finished sequences stay matchable),
    so a measurement must start from a freshly fitted instance. Cost grows with the memory (one gather and
    one partial sort over it per layer), so the online part is a window: at most ``max_online`` decoded
    tokens (``L * (E + 1) * 4`` bytes each) are kept, the oldest dropped first; fitted tokens are always kept.
    """

    name = "pathmatch"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        neighbours: int = 8,
        decay: float = 0.7,
        carry: float = 0.3,
        power: float = 2.0,
        prior: float = 0.5,
        online: bool = True,
        max_online: int = 16384,
        **kw: Any,
    ) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        if isinstance(max_online, bool) or not isinstance(max_online, int) or max_online < 1:
            raise ConfigError(f"max_online={max_online!r}: give the most decoded tokens to remember (at least 1)")
        self.max_online = max_online
        self.fitted = 0  # memory rows [0, fitted) come from `fit` and are never dropped
        self.neighbours = neighbours
        self.decay = decay
        self.carry = carry
        self.power = power
        self.prior = prior
        self.online = online
        L, E = num_layers, num_experts
        self.size = 0
        # Column -1 of every memory array is a null token (no experts, not valid, its own successor), so
        # following "no successor" (-1) needs no masking. Capacity always exceeds size by at least one.
        # [L, E+1, capacity]: rows 0..E-1 the use indicator (expert-major for gathers), row E 1 where the entry
        # is usable (recorded and exact), so one gather and one product give votes and their total weight.
        self.mem = np.zeros((L, E + 1, 64), np.float32)
        self.succ = np.full(64, -1, np.int64)  # [capacity] next token of the same sequence, -1 if none
        self.pred = np.full(64, -1, np.int64)  # [capacity] previous token of the same sequence
        self.uses = np.full((L, E), top_k / E)  # [L, E] use counts of valid entries (+ one uniform pseudo-token)
        self.steps = np.ones(L)  # [L]
        self.freq = self.uses / self.steps[:, None]  # [L, E] the prior votes go to
        self.prior_votes = prior * self.freq  # [L, E]
        self.sim = np.zeros((1, 0), np.float32)  # [T, M] similarity of the current tokens to memory rows
        self._row = np.zeros((L, E), np.float32)  # this token's multi-hot, for online memory
        self._seen = np.zeros(L, bool)
        self._last_row = -1  # memory row of the previous token of this sequence
        self._top: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None  # (version, (rows [T,n], weights [T,n]))

    # ---- memory ---------------------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = self.mem.shape[2]
        if need < cap:
            return
        extra = max(need + 1, 2 * cap) - cap
        self.mem = np.concatenate([self.mem, np.zeros((*self.mem.shape[:2], extra), np.float32)], axis=2)
        self.succ = np.concatenate([self.succ, np.full(extra, -1, np.int64)])
        self.pred = np.concatenate([self.pred, np.full(extra, -1, np.int64)])

    def _append(self, hot: np.ndarray, valid: np.ndarray, seq_starts: np.ndarray) -> None:
        """Add tokens ``hot [n, L, E]`` with ``valid [n, L]``; ``seq_starts [n]`` marks a sequence's first token."""
        n = hot.shape[0]
        a = self.size
        self._grow(a + n)
        rows = np.arange(a, a + n)
        hot = hot * valid[..., None]
        self.mem[:, :-1, a : a + n] = hot.transpose(1, 2, 0)
        self.mem[:, -1, a : a + n] = valid.T
        linked = ~seq_starts[1:]
        self.succ[rows[:-1][linked]] = rows[1:][linked]
        self.pred[rows[1:][linked]] = rows[:-1][linked]
        self.uses += hot.sum(axis=0)
        self.steps += valid.sum(axis=0)
        self.freq = self.uses / self.steps[:, None]
        self.prior_votes = self.prior * self.freq
        self.size = a + n

    def fit(self, traces: Sequence[RouterTrace]) -> PathMatchReference:
        for tr in traces:
            starts = np.zeros(tr.num_tokens, bool)
            starts[tr.seq_offsets[:-1][np.diff(tr.seq_offsets) > 0]] = True
            self._append(tr.multi_hot(), tr.exact & (tr.experts[..., 0] >= 0), starts)
        self.fitted = self.size
        return self

    def _forget(self, count: int) -> None:
        """Drop the ``count`` oldest online tokens: later rows move down, links into the dropped rows end."""
        a, b, m = self.fitted, self.fitted + count, self.size - count
        self.mem[:, :, a:m] = self.mem[:, :, b : self.size]
        self.mem[:, :, m : self.size] = 0.0

        def moved(rows: np.ndarray) -> np.ndarray:  # old row ids -> new ones (-1 for dropped rows)
            return np.where(rows >= b, rows - count, np.where(rows >= a, -1, rows))

        for links in (self.succ, self.pred):
            links[:m] = moved(np.concatenate([links[:a], links[b : self.size]]))
            links[m : self.size] = -1
        self.sim = np.delete(self.sim, np.s_[a:b], axis=1)
        self._last_row = int(moved(np.array(self._last_row)))
        self.size = m
        self._top = None

    # ---- tracking -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._store_token()
        super().reset()
        self._last_row = -1
        self.sim = np.zeros((1, self.size), np.float32)

    def _store_token(self) -> None:
        """Move the finished batch-1 token into the memory (online learning)."""
        if not (self.online and self._seen.any()):
            return
        if self.size - self.fitted >= self.max_online:
            self._forget(max(1, self.max_online // 4))  # a quarter at a time: the move is paid once per many tokens
        first = np.array([self._last_row < 0])
        self._append(self._row[None], self._seen[None], first)
        if self._last_row >= 0:
            self.succ[self._last_row] = self.size - 1
            self.pred[self.size - 1] = self._last_row
        self._last_row = self.size - 1
        self._row[:] = 0.0
        self._seen[:] = False

    def _new_token(self, batch: int) -> None:
        self._store_token()
        old = self.sim
        sim = np.zeros((batch, self.size), np.float32)
        if self.carry and old.shape[0] == batch and old.shape[1]:
            pred = self.pred[: self.size]  # [M] each row's predecessor, whose old similarity carries over
            has = (pred >= 0) & (pred < old.shape[1])
            sim[:, has] = self.carry * old[:, pred[has]]
        self.sim = sim

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        m = self.size
        if self.sim.shape != (len(rows), m):
            self.sim = np.zeros((len(rows), m), np.float32)
        col = self.mem[layer, :, :m]  # [E+1, M]; expert ids select use rows only
        self.sim *= self.decay
        if len(rows) == 1:
            self.sim[0] += col[rows[0]].sum(axis=0)
        else:  # every token at once: its multi-hot row times the layer's memory
            hot = np.zeros((len(rows), self.num_experts + 1), np.float32)  # [T, E+1]
            tok = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
            hot[tok, np.concatenate(rows).astype(np.int64) if len(tok) else tok] = 1.0
            self.sim += hot @ col
        if self.online and len(rows) == 1:
            self._row[layer] = 0.0
            self._row[layer, rows[0]] = 1.0
            self._seen[layer] = True

    def neighbours_of(self) -> tuple[np.ndarray, np.ndarray]:
        """The most similar memory rows of each current token ``[T, n]`` and their vote weights ``[T, n]``."""
        if self._top is not None and self._top[0] == self.version:
            return self._top[1]
        top = np.stack([nearest(row, self.neighbours) for row in self.sim])  # [T, n]
        found = (top, np.take_along_axis(self.sim, top, axis=1) ** self.power)
        self._top = (self.version, found)
        return found

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        if not self.sim.shape[1]:
            return self.freq[layers]
        top, w = self.neighbours_of()  # [T, n] each
        out = np.empty((len(top), len(distances), self.num_experts))  # [T, D, E]
        chain = [top]  # chain[s]: the rows s tokens after the neighbours (-1, the null row, past the end)
        for i, (s, j) in enumerate(zip(shifts.tolist(), layers.tolist(), strict=True)):
            while len(chain) <= s:
                chain.append(self.succ[chain[-1]])
            if len(top) == 1:  # [1, E+1]: votes per expert, then their total weight
                votes = (self.mem[j][:, chain[s][0]] @ w[0])[None]
            else:  # [T, E+1]
                votes = np.einsum("etn,tn->te", self.mem[j][:, chain[s]], w)
            out[:, i] = (votes[:, :-1] + self.prior_votes[j]) / (votes[:, -1:] + self.prior)
        return union(out)


class PathMatchPredictor(PathMatchReference):
    """`PathMatchReference` with batch-1 decode paths cut to a few numpy calls per layer (the step's budget is
    tens of microseconds, and at batch 1 per-call overhead, not arithmetic, is what costs).

    Same similarities and votes bit for bit (the same float32 operations in the same order), so the same
    neighbours and scores; the distances landing on one layer share a gather, a row's few floats are finished
    in Python, and the finished token's path is kept as lists until it is stored. Batches larger than one take
    the reference paths.

    Where a C compiler is found (`prophet.native`, off with ``PROPHET_NATIVE=0``) the batch-1 paths are
    `prophet/pathmatch.c` instead: one call observes and picks the neighbours, one scores every distance, one
    carries the similarities into a new token. Its similarities and neighbours are the numpy paths'; its votes
    differ in the last float32 bits (summation order), which tests bound. The kernel's votes read ``row_ids``,
    each memory row's few entries per layer, instead of the dense ``E + 1`` rows (at 128-256 experts most of a
    step's time): the same float32 adds in the same order, less the zeros, so the same votes bit for bit.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, native: bool = True, **kw: Any) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.native = native  # False: the numpy fast paths even where the kernel builds (to compare them)
        self._path: list[list[int] | None] = [None] * num_layers  # this token's experts per layer (batch 1)
        self._near: tuple[int, np.ndarray, np.ndarray] | None = None  # (version, rows [n], weights [n])
        self._groups: dict[bytes, tuple] = {}  # distances (as shifts and layers) -> `_group`
        self._priors: tuple[Any, list[list[float]]] = (None, [])  # (prior_votes, the same as lists)
        # [L, capacity, top_k + 1] int16: memory row r's experts at layer l, then E where it may vote (ascending,
        # -1 padded): mem[l, :, r]'s nonzero rows, kept wherever mem is written. None once a row does not fit
        # (more entries, or one not 0/1): the kernel then reads mem.
        self.row_ids: np.ndarray | None = (np.full((num_layers, self.mem.shape[2], top_k + 1), -1, np.int16)
                                           if num_experts < 2**15 - 1 else None)
        self._attach()

    def _attach(self) -> None:
        """Bind the compiled kernel, if any (again after a copy or unpickling: addresses do not travel)."""
        self._kernel = PathMatchKernel.for_predictor(self) if self.native else None
        if self._kernel is not None:
            self._kernel.restore(self._path)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_kernel"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach()

    def fit(self, traces: Sequence[RouterTrace]) -> PathMatchPredictor:
        super().fit(traces)
        return self

    def _store_token(self) -> None:
        kernel = self._kernel
        if kernel is not None and self.online and self._path.count(None) < self.num_layers:
            if self.size - self.fitted >= self.max_online:
                self._forget(max(1, self.max_online // 4))  # as the reference slides its window
            self._grow(self.size + 1)
            kernel.store(self)  # the reference's `_append` of one token and its link, in one call
            self.size += 1
            self._last_row = self.size - 1
            self._path = [None] * self.num_layers
            self._priors = (None, [])  # the prior votes changed in place
            return
        seen = [layer for layer, row in enumerate(self._path) if row is not None]
        if seen:  # the reference's multi-hot row, in two assignments
            self._row[[layer for layer in seen for _ in self._path[layer]],
                      [e for layer in seen for e in self._path[layer]]] = 1.0
            self._seen[seen] = True
            self._path = [None] * self.num_layers
        super()._store_token()

    def _grow(self, need: int) -> None:
        if need >= self.mem.shape[2] and self._kernel is not None:
            self._kernel.bound = None
        super()._grow(need)
        ids = self.row_ids
        if ids is not None and ids.shape[1] < self.mem.shape[2]:
            extra = np.full((ids.shape[0], self.mem.shape[2] - ids.shape[1], ids.shape[2]), -1, np.int16)
            self.row_ids = np.concatenate([ids, extra], axis=1)

    def _append(self, hot: np.ndarray, valid: np.ndarray, seq_starts: np.ndarray) -> None:
        a = self.size
        super()._append(hot, valid, seq_starts)
        self._index_rows(a, self.size)
        if self._kernel is not None:
            self._kernel.bound = None

    def _index_rows(self, a: int, b: int) -> None:
        """``row_ids[:, a:b]`` from ``mem[:, :, a:b]`` (off, None, when a row has more than ``top_k + 1`` entries
        or one that is not 0/1: weighted rows keep the dense votes)."""
        ids = self.row_ids
        if ids is None or b <= a:
            return
        for layer in range(self.num_layers):
            block = self.mem[layer, :, a:b].T  # [n, E+1]
            tok, entry = np.nonzero(block)  # token-major, entries ascending
            counts = np.bincount(tok, minlength=b - a)  # [n]
            if len(tok) and (counts.max() > ids.shape[2] or not (block[tok, entry] == 1.0).all()):
                self.row_ids = None
                return
            ids[layer, a:b] = -1
            ids[layer, a + tok, np.arange(len(tok)) - np.repeat(np.cumsum(counts) - counts, counts)] = entry

    def _new_token(self, batch: int) -> None:
        if self._kernel is None or batch != 1:
            super()._new_token(batch)
            return
        self._store_token()
        self._kernel.carry(self)

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        m = self.size
        kernel = self._kernel
        if kernel is not None and len(rows) == 1:
            if self.sim is not kernel.view or kernel.bound is None:  # not where the kernel reads it
                if self.sim.shape != (1, m):
                    self.sim = np.zeros((1, m), np.float32)
                kernel.ready(self)
            kernel.observe(layer, rows[0], self.version)
            if self.online:
                self._path[layer] = rows[0]
            return
        if len(rows) != 1 or self.sim.shape != (1, m):
            super()._observe(layer, rows, weights, hidden)
            return
        row = rows[0]
        col = self.mem[layer]  # [E+1, capacity]
        sim = self.sim
        sim *= self.decay
        if len(row) == 2:  # Mixtral's top-2; 0/1 sums are exact, so the order of the adds is the reference's
            sim += col[row[0], :m] + col[row[1], :m]
        elif len(row) == 1:
            sim += col[row[0], :m]
        elif row:
            sim += col[row, :m].sum(axis=0)
        if self.online:
            self._path[layer] = row

    def _neighbours1(self) -> tuple[np.ndarray, np.ndarray]:
        """Batch 1: `neighbours_of` without the batch dimension: rows ``[n]`` and weights ``[n]``."""
        near = self._near
        if near is not None and near[0] == self.version:
            return near[1], near[2]
        sim = self.sim[0]
        top = nearest(sim, self.neighbours)
        near = sim.take(top)
        w = near * near if self.power == 2.0 else near**self.power  # x * x is what numpy's x ** 2 computes
        self._near = (self.version, top, w)
        return top, w

    def _forget(self, count: int) -> None:
        a, b, size = self.fitted, self.fitted + count, self.size
        super()._forget(count)
        ids = self.row_ids
        if ids is not None:  # the rows move as mem's do
            ids[:, a : size - count] = ids[:, b:size]
            ids[:, size - count : size] = -1
        self._near = None
        if self._kernel is not None:
            self._kernel.bound = None
            self._kernel.picked = -1

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        if self.sim.shape[0] != 1 or not self.sim.shape[1]:
            return super()._scores(distances, shifts, layers)
        if self._kernel_ready():
            return self._kernel.score_array(self.layer, distances, self.version)
        return np.array(self._score_lists(distances, shifts, layers))

    def _kernel_ready(self) -> bool:
        """True when this batch-1 step's neighbours and scores come from the kernel."""
        return self._kernel is not None and self.sim.shape[0] == 1 and self._kernel.ready(self)

    def neighbours_of(self) -> tuple[np.ndarray, np.ndarray]:
        if not (self.sim.shape[1] and self._kernel_ready()):
            return super().neighbours_of()
        self._kernel.pick(self.version)
        top, w = self._kernel.neighbours()
        return top[None], w[None]

    def _score_lists(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> list[list[float]]:
        kernel = self._kernel
        if kernel is not None and self.sim is kernel.view and kernel.bound is not None and self.size:
            return kernel.scores(self.layer, distances, self.version)
        if self.sim.shape[0] != 1 or not self.sim.shape[1]:
            return super()._score_lists(distances, shifts, layers)
        if self._kernel_ready():
            return self._kernel.scores(self.layer, distances, self.version)
        top, w = self._neighbours1()
        key = shifts.tobytes() + layers.tobytes()
        look = self._groups.get(key)
        if look is None:  # once per set of distances from a layer (a few per layer)
            if len(self._groups) >= _MAX_GROUPS:  # callers asking for ever new sets: keep the memo bounded
                self._groups.clear()
            look = self._groups[key] = self._group(shifts, layers)
        last, groups = look
        priors = self._priors
        if priors[0] is not self.prior_votes:  # once per token
            priors = self._priors = (self.prior_votes, self.prior_votes.tolist())
        chain = [top]  # chain[s]: the rows s tokens after the neighbours (-1, the null row, past the end)
        succ = self.succ
        while len(chain) <= last:
            chain.append(succ.take(chain[-1]))
        mem, prior, n = self.mem, self.prior, len(top)
        out: list[list[float]] = [[]] * len(layers)
        for j, members in groups:  # the distances landing on layer j: one gather and one product
            # float32 votes per expert, then their total weight, gathered ([E+1, n] per distance) and summed as
            # the reference gathers and sums them, so the numbers are the same bit for bit
            if len(members) == 1:
                votes = mem[j][:, chain[members[0][1]]] @ w  # [E+1]
            else:
                block = mem[j][:, np.concatenate([chain[s] for _, s in members])]  # [E+1, c*n]
                votes = block.reshape(-1, len(members), n).transpose(1, 0, 2) @ w  # [c, E+1]
            votes[..., -1] += prior  # the denominators, in float32 as the reference's array arithmetic
            rows = votes.tolist()
            prior_votes = priors[1][j]
            for (i, _), row in zip(members, [rows] if len(members) == 1 else rows, strict=True):
                total = row[-1]
                out[i] = [(v + p) / total for v, p in zip(row, prior_votes)]  # zip drops the total
        return out

    @staticmethod
    def _group(shifts: np.ndarray, layers: np.ndarray) -> tuple[int, list[tuple[int, list[tuple[int, int]]]]]:
        """The largest shift, and the distances grouped by the layer they land on: ``(layer, [(position,
        shift), ...])``."""
        groups: dict[int, list[tuple[int, int]]] = {}
        for i, (s, j) in enumerate(zip(shifts.tolist(), layers.tolist(), strict=True)):
            groups.setdefault(j, []).append((i, s))
        return int(shifts.max()), list(groups.items())
