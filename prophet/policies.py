"""Eviction policies for the expert cache.

A policy only ranks keys; the cache decides what may be evicted (pinned and in-flight slots never are). Keys
are ``(layer, expert)`` tuples. `victim` receives the evictable keys and returns the one to drop.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from prophet.errors import ConfigError

Key = tuple[int, int]  # (moe layer index, expert id)
_FEW = 16  # up to this many candidates `ScoredPolicy.choose` finds the lowest scores in Python


def keys(layers: np.ndarray, experts: np.ndarray) -> list[Key]:
    """``[C]`` layer and expert arrays as a list of keys."""
    return list(zip(layers.tolist(), experts.tolist(), strict=True))


def gather(table: np.ndarray, layers: np.ndarray, experts: np.ndarray, missing: float | int) -> np.ndarray:
    """``[C]`` entries ``table[layer, expert]`` of a per-key table, ``missing`` for keys beyond its shape."""
    inside = (layers < table.shape[0]) & (experts < table.shape[1])
    out = np.full(len(layers), missing, table.dtype)
    out[inside] = table[layers[inside], experts[inside]]
    return out


def _grown(table: np.ndarray, layer: int, expert: int, fill: float) -> np.ndarray:
    """``table`` enlarged (new entries ``fill``) to hold key ``(layer, expert)``."""
    out = np.full((max(layer + 1, table.shape[0]), max(expert + 1, table.shape[1])), fill)
    out[: table.shape[0], : table.shape[1]] = table
    return out


class EvictionPolicy:
    """Interface every policy implements; the cache calls these as keys enter, are used and leave."""

    name = "base"

    def insert(self, key: Key) -> None:
        """``key`` was loaded into a slot (demand load or prefetch)."""

    def touch(self, key: Key) -> None:
        """``key`` was used by a step."""

    def remove(self, key: Key) -> None:
        """``key`` left the cache."""

    def victim(self, candidates: Sequence[Key]) -> Key:
        """Which of ``candidates`` (non-empty, all resident and evictable) to evict."""
        raise NotImplementedError

    def choose(self, layers: np.ndarray, experts: np.ndarray) -> Key:
        """`victim` of the candidates given as arrays ``layers [C]``, ``experts [C]`` (what the cache keeps);
        policies that rank arrays faster than key lists override it, with the same answer."""
        return self.victim(keys(layers, experts))

    def order(self) -> Iterable[Key] | None:
        """Resident keys in eviction order (first = evicted first), when the policy ranks by a total order that
        `victim` follows; None when it must see the candidates."""
        return None


class LRU(EvictionPolicy):
    """Least recently used: a load counts as a use, so fresh prefetches are not evicted first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first
        self._clock = itertools.count()
        self._stamp = np.full((0, 0), np.inf)  # [layer, expert] when each key entered the order's end; inf: absent

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)
        self._restamp(key)

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)
        self._restamp(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)
        if key[0] < self._stamp.shape[0] and key[1] < self._stamp.shape[1]:
            self._stamp[key] = np.inf

    def _restamp(self, key: Key) -> None:
        """``key`` moved to the order's end: its stamp becomes the largest, so stamps sort as the order does."""
        if key[0] >= self._stamp.shape[0] or key[1] >= self._stamp.shape[1]:
            self._stamp = _grown(self._stamp, *key, np.inf)
        self._stamp[key] = next(self._clock)

    def order(self) -> Iterable[Key]:
        return self._order

    def victim(self, candidates: Sequence[Key]) -> Key:
        if len(candidates) == 1:
            return candidates[0]
        allowed = set(candidates)
        for key in self._order:  # oldest first
            if key in allowed:
                return key
        return candidates[0]

    def choose(self, layers: np.ndarray, experts: np.ndarray) -> Key:
        """`victim` by the keys' stamps instead of a walk over the whole order: the oldest stamp; a key not in
        the order ranks last, and with none in it the first candidate is chosen."""
        if len(layers) <= _FEW:  # a pool per layer: a few scalar reads cost less than gather's array steps
            stamp, (rows, cols) = self._stamp, self._stamp.shape
            got = [stamp[lay, e] if lay < rows and e < cols else np.inf
                   for lay, e in zip(layers.tolist(), experts.tolist(), strict=True)]
            i = got.index(min(got))  # the first minimum
        else:
            i = int(np.argmin(gather(self._stamp, layers, experts, np.inf)))  # the first minimum
        return int(layers[i]), int(experts[i])


class FIFO(LRU):
    """First in, first out: uses do not refresh a key."""

    name = "fifo"

    def touch(self, key: Key) -> None:
        if key not in self._order:
            self._order[key] = None
            self._restamp(key)


class LFU(EvictionPolicy):
    """Least frequently used, counting uses over the whole run (ties broken by least recent use).

    Counts survive eviction: an expert that was popular before is likely popular again, which is what makes
    frequency beat recency on router traces.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        self._clock = itertools.count()

    def insert(self, key: Key) -> None:
        self._last[key] = next(self._clock)

    def touch(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = next(self._clock)

    def victim(self, candidates: Sequence[Key]) -> Key:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, -1)))


class ScoredPolicy(EvictionPolicy):
    """Evicts the key a scoring function rates lowest; ties fall back to a base policy's order.

    The prediction-aware policy (a predictor's probability that a key is needed soon) and Belady (the
    negated distance to next use, from a known future) are both this with a different ``score``.
    """

    name = "scored"

    def __init__(self, score: Callable[[Key], float], base: EvictionPolicy | None = None) -> None:
        self.score = score
        self.base = base or LRU()

    def insert(self, key: Key) -> None:
        self.base.insert(key)

    def touch(self, key: Key) -> None:
        self.base.touch(key)

    def remove(self, key: Key) -> None:
        self.base.remove(key)

    def scores(self, candidates: Sequence[Key]) -> list[float]:
        return [self.score(k) for k in candidates]

    def score_array(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """``[C]`` `scores` of the candidates given as arrays (subclasses score them without key tuples)."""
        return np.asarray(self.scores(keys(layers, experts)), dtype=np.float64)

    def victim(self, candidates: Sequence[Key]) -> Key:
        scores = np.asarray(self.scores(candidates), dtype=np.float64)  # [C]: one pass, a pool may hold thousands
        tied = np.flatnonzero(scores == scores.min())
        return candidates[tied[0]] if len(tied) == 1 else self.base.victim([candidates[j] for j in tied])

    def choose(self, layers: np.ndarray, experts: np.ndarray) -> Key:
        scores = self.score_array(layers, experts)  # [C]
        if len(scores) <= _FEW:  # a pool per layer: a few Python floats cost less than numpy's min and compare
            vals = scores.tolist()
            low = min(vals)
            tied = [i for i, v in enumerate(vals) if v == low]
        else:
            tied = (scores == scores.min()).nonzero()[0]
        if len(tied) == 1:
            return int(layers[tied[0]]), int(experts[tied[0]])
        return self.base.choose(layers[tied], experts[tied])


POLICY_FACTORIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "fifo": FIFO}


def make_policy(name: str | EvictionPolicy) -> EvictionPolicy:
    """A fresh policy from its name, or ``name`` itself when it already is a policy object."""
    if isinstance(name, EvictionPolicy):
        return name
    try:
        return POLICY_FACTORIES[name]()
    except KeyError:
        raise ConfigError(
            f"policy={name!r} is not known here: use one of {', '.join(sorted(POLICY_FACTORIES))} "
            "or pass an EvictionPolicy object"
        ) from None


class PredictionAware(ScoredPolicy):
    """Evicts the key a predictor rates least likely to be needed soon; ties fall back to ``base``.

    ``scorer(layer, expert)`` is the predicted keep-priority, e.g. a `prophet.predict` predictor's
    ``eviction_score`` (expected uses over the layer's next steps). The predictor is shared by every pool
    and fed by the runtime; the policy only reads it.
    """

    name = "predicted"

    def __init__(self, scorer: Callable[[int, int], float], base: EvictionPolicy | None = None,
                 batch: Callable[[Sequence[Key]], list[float]] | None = None,
                 table: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        super().__init__(lambda key: scorer(*key), base)
        self._batch = batch  # scorer of many keys at once (same values), for pools of many slots
        # ``table(layers [C]) -> [L, E]`` scores whose rows ``layers`` are current (same values): `score_array`
        # gathers from it, no key tuples (a predictor's `keep_table`)
        self._table = table
        # A bound method of a predictor that counts its observations (``version``, as RoutingPredictor does) gives
        # the same score for a key until the count moves: `score_array` then scores each key once per version.
        owner = getattr(batch if batch is not None else scorer, "__self__", None)
        self._version = (lambda: owner.version) if isinstance(getattr(owner, "version", None), int) else None
        self._memo_version: int | None = None
        self._memo = np.empty((0, 0))  # [layer, expert] scores of this version, NaN where not yet scored

    def scores(self, candidates: Sequence[Key]) -> list[float]:
        return self._batch(candidates) if self._batch is not None else super().scores(candidates)

    def score_array(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        if self._table is not None:
            return self._table(layers)[layers, experts]  # [C]
        if self._version is None:
            return super().score_array(layers, experts)
        version = self._version()
        if version != self._memo_version:
            self._memo.fill(np.nan)
            self._memo_version = version
        out = gather(self._memo, layers, experts, np.nan)  # [C]
        new = np.isnan(out).nonzero()[0]
        if new.size:
            out[new] = super().score_array(layers[new], experts[new])
            if layers.max() >= self._memo.shape[0] or experts.max() >= self._memo.shape[1]:
                self._memo = _grown(self._memo, int(layers.max()), int(experts.max()), np.nan)
            self._memo[layers[new], experts[new]] = out[new]
        return out


class Belady(ScoredPolicy):
    """Belady's optimum for replay: evicts the key whose next use lies furthest in the known future.

    ``uses`` maps each key to the sorted positions at which the cache will `touch` it (see
    `access_positions`); every touch must follow that stream, so a replay that strays from the future it
    was given fails loudly instead of reporting a wrong bound. Several pools may share one ``uses``.
    """

    name = "belady"

    def __init__(self, uses: dict[Key, list[int]], base: EvictionPolicy | None = None) -> None:
        super().__init__(self._next_use, base)
        self.uses = uses
        # the future as arrays, so a pool of thousands of candidates is scored in one pass
        self._index = {key: i for i, key in enumerate(uses)}  # key -> row
        self._count = np.array([len(v) for v in uses.values()], dtype=np.int64)  # [K] uses of each key
        self._first = np.concatenate([[0], np.cumsum(self._count)[:-1]]).astype(np.int64)  # [K] offset in _flat
        self._flat = np.array([p for v in uses.values() for p in v], dtype=np.float64)  # positions, key by key
        self._seen = np.zeros(len(self._count), dtype=np.int64)  # [K] touches of each key so far
        shape = tuple(max((k[i] for k in uses), default=-1) + 1 for i in (0, 1))
        self._rows = np.full(shape, -1, np.int64)  # [layer, expert] -> row of the key, -1 if it is never used
        for key, i in self._index.items():
            self._rows[key] = i

    def touch(self, key: Key) -> None:
        i = self._index.get(key)
        if i is None or self._seen[i] >= self._count[i]:
            raise ConfigError(
                f"Belady: key {key} used more often than the access stream it was built from says; "
                "build it from the same trace, in the same order, that the cache replays"
            )
        self._seen[i] += 1
        super().touch(key)

    def scores(self, candidates: Sequence[Key]) -> np.ndarray:
        """``[C]`` negated next-use positions of ``candidates`` (-inf for never again)."""
        return self._next_uses(np.fromiter((self._index.get(k, -1) for k in candidates), np.int64, len(candidates)))

    def score_array(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return self._next_uses(gather(self._rows, layers, experts, -1))

    def _next_uses(self, rows: np.ndarray) -> np.ndarray:
        """``[C]`` negated next-use positions of the keys at ``rows [C]`` of the future (-1: never used)."""
        known = rows >= 0
        seen = np.where(known, self._seen[rows], 0)
        left = known & (seen < np.where(known, self._count[rows], 0))
        out = np.full(len(rows), -np.inf)
        out[left] = -self._flat[self._first[rows[left]] + seen[left]]
        return out

    def _next_use(self, key: Key) -> float:
        """Negated position of ``key``'s next use (-inf if never again): the furthest scores lowest."""
        return float(self.scores([key])[0])


def access_positions(accesses: Sequence[Key]) -> dict[Key, list[int]]:
    """Positions of each key in an access stream, ascending: what `Belady` needs to know the future."""
    out: dict[Key, list[int]] = {}
    for i, key in enumerate(accesses):
        out.setdefault(key, []).append(i)
    return out
