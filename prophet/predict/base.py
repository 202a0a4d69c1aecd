"""The protocol every predictor follows, online (runtime) and offline (replay) alike, and the shared base.

Every predictor here derives from `RoutingPredictor`, which tracks where the model is (token, layer), turns
the runtime's id tensors into plain lists at once (batch-1 decode is dominated by per-call overhead, so
predictors work on lists and small numpy arrays, never on the device), and answers three questions from one
method, `scores`: which experts to prefetch (`predict`), how likely a resident expert is needed soon
(`eviction_score`, for `prophet.policies.PredictionAware`), and what the evaluation harness measures.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from prophet.errors import ConfigError
from prophet.policies import EvictionPolicy, PredictionAware

if TYPE_CHECKING:
    from prophet.predict.data import RouterTrace


# Up to this many experts per layer `predict` ranks a row with a Python sort; more with numpy's argpartition.
_SMALL_E = 32


class Prediction(NamedTuple):
    """Expert ``expert`` of MoE layer ``layer`` is expected soon, with confidence ``score`` in [0, 1].

    ``layer`` counts MoE layers from the current token's first; ``layer >= L`` (L MoE layers) means layer
    ``layer - L`` of the next token.
    """

    layer: int
    expert: int
    score: float


@runtime_checkable
class Predictor(Protocol):
    """``observe`` what a layer routed to; ``predict`` scores experts of the layers to come."""

    def observe(
        self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> None:
        """Layer ``layer`` routed its tokens to ``expert_ids [T,k]`` with ``weights [T,k]`` (router input ``hidden [T,H]``)."""
        ...

    def predict(self) -> list[Prediction]:
        """Experts expected for the next layers of this token and the first layers of the next token."""
        ...


def check_predictor(predictor: object, num_layers: int, num_experts: int, top_k: int) -> None:
    """Raise `ConfigError` unless ``predictor`` is a predictor instance built for a model of this shape.

    Checked where a predictor meets a model (`prophet.wrap`), so one of the wrong shape, or fitted on another
    model, fails there with what to change instead of with an ``IndexError`` inside ``generate``."""
    name = type(predictor).__name__
    if isinstance(predictor, type):
        raise ConfigError(f"predictor={predictor.__name__} is a class: pass an instance, e.g. "
                          f"{predictor.__name__}(num_layers, num_experts, top_k).fit(traces)")
    if not all(callable(getattr(predictor, m, None)) for m in ("observe", "predict")):
        raise ConfigError(f"predictor={name} is not a predictor: it needs observe(layer, expert_ids, weights, hidden) "
                          "and predict(); use one of prophet.predict's, fitted on this model's traces")
    for field, want, what in (("num_layers", num_layers, "MoE layers"), ("num_experts", num_experts, "experts per layer"),
                              ("top_k", top_k, "experts per token (top-k)")):
        got = getattr(predictor, field, want)
        if got != want:
            raise ConfigError(f"predictor {name} has {field}={got!r} but the model has {want} {what}: build it with "
                              f"{field}={want} and fit it on this model's traces")


def valid_rows(expert_ids: torch.Tensor | np.ndarray | Sequence) -> list[list[int]]:
    """``[T, k]`` ids (tensor, array or nested list; ``[k]`` means T = 1) -> per-token lists of ids >= 0.

    Plain lists: at batch 1 one ``tolist`` and a comprehension cost less than any numpy round trip.
    """
    raw = expert_ids.tolist() if hasattr(expert_ids, "tolist") else list(expert_ids)
    if raw and not isinstance(raw[0], list):
        raw = [raw]
    return [[e for e in row if e >= 0] for row in raw]


def union(probs: np.ndarray) -> np.ndarray:
    """``[T, E]`` per-token probabilities -> ``[E]`` probability that any of the T tokens uses each expert."""
    return probs[0] if probs.shape[0] == 1 else 1.0 - np.prod(1.0 - probs, axis=0)


class RoutingPredictor:
    """Base of Prophet's predictors: position tracking, `predict` and `eviction_score` from `scores`.

    Subclasses implement ``_observe(layer, rows, weights, hidden)`` (``rows``: per-token lists of expert ids)
    and ``_scores(distances, shifts, layers) -> [D, E]`` (probability that each expert is used at each
    distance, counted in layer steps from the last observed layer, landing ``shifts`` tokens ahead at
    ``layers``; see `prophet.predict.data`). ``fit(traces)`` learns
    from recorded traces where the predictor has anything to learn; ``reset()`` starts a new sequence.
    """

    name = "base"
    # `predict` may fill keep-priorities from its own scores (False where `_keep_block` is not their sum)
    _prefill_keep = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, horizon: int = 1, top: int | None = None) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.horizon = horizon  # layer steps `predict` looks ahead by default
        self.top = top or top_k  # experts per layer `predict` returns by default
        self.layer = -1  # last observed layer; -1 before the first observation of a sequence
        self.tokens = 0  # tokens begun in this sequence
        self.version = 0  # bumped by every observation, to memoize derived scores
        # keep-priorities (two occurrences) of the version ``_keep_version``, held two ways with the same values:
        # a table ``[L, E]`` whose filled rows ``_kept [L]`` say (what a policy gathers from) and rows as lists
        # (what `predict` fills and the list interfaces read; lists cost less than numpy at a few experts)
        self._keep_table = np.zeros((num_layers, num_experts))
        self._kept = np.zeros(num_layers, bool)
        self._keep_lists: dict[int, list[float]] = {}
        self._kept_any = False  # some row of ``_kept`` is set
        self._keep_version = -1
        self._plans: dict[tuple, tuple] = {}  # (layer, horizon, top, keep) -> `_plan`
        self._experts = range(num_experts)
        self._evicting = False  # eviction scores were asked for: `predict` scores the next occurrences too

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def fit(self, traces: Sequence[RouterTrace]) -> RoutingPredictor:
        """Learn from recorded traces; predictors with nothing to learn ignore them."""
        return self

    def reset(self) -> None:
        """Start a new sequence: forget the current token and everything only this sequence taught."""
        self.layer = -1
        self.tokens = 0
        self.version += 1

    # ---- the protocol ----------------------------------------------------------------------------------------
    def observe(
        self,
        layer: int,
        expert_ids: torch.Tensor | np.ndarray,
        weights: torch.Tensor | np.ndarray,
        hidden: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Layer ``layer`` routed ``expert_ids [T,k]`` (negative ids are ignored) with ``weights [T,k]``."""
        self.feed(layer, valid_rows(expert_ids), weights, hidden)

    def feed(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        """`observe` after the ids were turned into per-token lists (ensembles feed members this way)."""
        if layer <= self.layer or self.layer < 0:
            self.tokens += 1
            self._new_token(len(rows))
        self.layer = layer
        self.version += 1
        self._observe(layer, rows, weights, hidden)

    def predict(self, horizon: int | None = None, top: int | None = None) -> list[Prediction]:
        """The ``top`` likeliest experts of each of the next ``horizon`` layer steps (at most L).

        Once eviction scores have been asked for, the same call also scores the next occurrence of each of
        those layers (distance + L) and keeps both as their keep-priorities (`eviction_scores`), so a step's
        predictions and its victims' scores come from one scoring pass instead of two."""
        keep = self._evicting
        plan = self._plans.get((self.layer, horizon, top, keep))
        if plan is None:
            plan = self._plans[self.layer, horizon, top, keep] = self._plan(horizon, top, keep)
        arrays, h, n, keep_layers = plan
        vals = self._score_lists(*arrays)  # [h][E], or [2h][E] with the next occurrences
        if keep_layers and self._prefill_keep:
            lists = self._keep_state()[2]
            for d, layer in enumerate(keep_layers):
                lists[layer] = [a + b for a, b in zip(vals[d], vals[h + d])]  # as `_keep_block` sums them
        base = self.layer + 1
        if self.num_experts > _SMALL_E:
            best = np.argpartition(np.array(vals[:h]), self.num_experts - n, axis=1)[:, -n:].tolist()
        else:  # a Python sort of a few floats costs less than argpartition and tolist
            best = [sorted(self._experts, key=vals[d].__getitem__, reverse=True)[:n] for d in range(h)]
        return [Prediction(base + d, e, vals[d][e]) for d in range(h) for e in best[d] if vals[d][e] > 0.0]

    def _plan(self, horizon: int | None, top: int | None, keep: bool) -> tuple:
        """What `predict` asks `_score_lists` from the current layer: ``((distances, shifts, layers), h, n, the
        layers whose keep-priorities it also fills)``; made once per layer and arguments."""
        h = min(horizon or self.horizon, self.num_layers)
        n = min(top or self.top, self.num_experts)
        d = np.arange(1, h + 1)
        if keep:  # the same layers one token later
            d = np.concatenate([d, d + self.num_layers])
        shifts, layers = np.divmod(self.layer + d, self.num_layers)
        return (d, shifts, layers), h, n, layers[:h].tolist() if keep else []

    # ---- scores --------------------------------------------------------------------------------------------
    def scores(self, distances: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[D, E]`` float probabilities of use at each look-ahead distance (layer steps, >= 1)."""
        d = np.asarray(distances, dtype=np.int64)
        return self._scores(d, *np.divmod(self.layer + d, self.num_layers))

    def eviction_score(self, layer: int, expert: int, occurrences: int = 2) -> float:
        """Expected uses of ``expert`` at the next ``occurrences`` steps of ``layer``, as a keep-priority.

        The first occurrence is the next step of ``layer`` after the last observed one; the runtime observes
        a layer after acquiring it, so during a demand miss that is the step being acquired, which is why a
        second occurrence (one token later) is counted too.
        """
        self._evicting = True
        if occurrences != 2:  # not what a policy asks: scored afresh, not memoized
            return float(self._sum_occurrences(np.array([layer]), occurrences)[0, expert])
        return self._keep_rows([layer])[layer][expert]

    def eviction_scores(self, keys: Sequence[tuple[int, int]]) -> list[float]:
        """`eviction_score` of many ``(layer, expert)`` keys at once (the list form of `keep_table`)."""
        rows = self._keep_rows({layer for layer, _ in keys})
        return [rows[layer][expert] for layer, expert in keys]

    def keep_table(self, layers: np.ndarray) -> np.ndarray:
        """``[L, E]`` keep-priorities (`eviction_score`) whose rows ``layers [C]`` (repeats allowed) are those of
        the current observation; other rows may be stale. Rows are scored once per observation, the missing
        ones in one `_keep_block` call however many slots ask: what choosing a victim among a pool reads."""
        self._evicting = True
        table, kept, lists = self._keep_state()
        if np.count_nonzero(kept[layers]) != len(layers):  # else the usual case once a pool of this observation asked
            want = np.zeros(self.num_layers, bool)
            want[layers] = True
            need = (want & ~kept).nonzero()[0].tolist()
            for layer in need:
                if layer in lists:  # filled by `predict`
                    table[layer] = lists[layer]
                    kept[layer] = self._kept_any = True
            self._fill_keep([layer for layer in need if layer not in lists])
        return table

    def _keep_rows(self, layers: Collection[int]) -> dict[int, list[float]]:
        """The keep-priority rows ``[E]`` of ``layers`` as lists, the missing ones scored in one call."""
        self._evicting = True
        table, kept, lists = self._keep_state()
        self._fill_keep(sorted(layer for layer in layers if layer not in lists and not kept[layer]))
        for layer in layers:
            if layer not in lists:
                lists[layer] = table[layer].tolist()
        return lists

    def _fill_keep(self, layers: list[int]) -> None:
        """Score the keep table's rows ``layers`` (distinct, in neither form yet) in one call."""
        if layers:
            missing = np.array(layers, dtype=np.int64)  # [M]
            self._keep_table[missing] = self._keep_block(missing)
            self._kept[missing] = True
            self._kept_any = True

    def _keep_state(self) -> tuple[np.ndarray, np.ndarray, dict[int, list[float]]]:
        """The keep table, its filled-rows mask and the rows as lists, emptied when an observation moved the
        version."""
        if self._keep_version != self.version:
            if self._keep_lists or self._kept_any:  # (a numpy fill costs more than the check)
                self._kept[:] = False
                self._kept_any = False
                self._keep_lists = {}
            self._keep_version = self.version
        return self._keep_table, self._kept, self._keep_lists

    def _keep_block(self, layers: np.ndarray) -> np.ndarray:
        """``[M, E]`` keep-priorities of ``layers [M]`` (distinct), unmemoized: uses at their next two steps."""
        return self._sum_occurrences(layers, 2)

    def _sum_occurrences(self, layers: np.ndarray, occurrences: int) -> np.ndarray:
        """``[M, E]`` expected uses at the next ``occurrences`` steps of each of ``layers [M]``, one scores() call."""
        first = (layers - self.layer - 1) % self.num_layers + 1  # [M]
        dist = (first[:, None] + self.num_layers * np.arange(occurrences)).ravel()  # [M * occurrences]
        return self.scores(dist).reshape(len(layers), occurrences, -1).sum(axis=1)

    def policy_factory(self, base: Callable[[], EvictionPolicy] | None = None) -> Callable[[], PredictionAware]:
        """Prediction-aware eviction reading this predictor, as the ``policy`` factory `ExpertCache` takes
        (the runtime must feed this same predictor); ties go to a policy from ``base`` (LRU by default)."""
        return lambda: PredictionAware(self.eviction_score, base() if base is not None else None,
                                       batch=self.eviction_scores, table=self.keep_table)

    # ---- for subclasses --------------------------------------------------------------------------------------
    def _new_token(self, batch: int) -> None:
        """A new token (batch of ``batch`` rows) starts at the layer about to be observed."""

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        """``rows``: each token's valid expert ids; ``weights`` and ``hidden`` exactly as the caller gave them."""
        raise NotImplementedError

    def _score_lists(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> list[list[float]]:
        """`_scores` as nested lists, what `predict` reads (a predictor may produce them without an array)."""
        return self._scores(distances, shifts, layers).tolist()

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """``[D, E]`` for ``distances [D]``, which land ``shifts [D]`` tokens ahead at ``layers [D]``."""
        raise NotImplementedError
