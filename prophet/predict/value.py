"""Expected uses of every expert over the coming tokens: one number that ranks eviction, prefetch and admission.

Why: a resident expert is worth (its expected uses while it stays) x (the cost of a miss), and the link copies
only a few experts a token (Mixtral at batch 1 over PCIe 5: ~4 while a token computes with misses on the host).
Path matching sees the next one or two tokens well and nothing beyond; recency-weighted counts of this sequence
see the experts a request keeps coming back to. `ValuePredictor` adds the two:

    value(l, e) = p_1(l, e) + p_2(l, e) + (span - 2) * rate(l, e)

``p_k``: the near predictor's probability that expert ``e`` is used at the k-th next step of layer ``l`` (this
token's or the next one's); ``rate``: uses per token of ``(l, e)`` in this sequence, each past token weighted
``decay`` per token of age, smoothed towards the fitted frequency with ``prior`` pseudo-tokens. Eviction drops the
lowest value (`eviction_score`), prefetch copies the predicted experts (`predict`, the near predictor's), and
`worth_copying` admits a copy only when it is worth more than the expert it would evict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prophet.errors import ConfigError
from prophet.predict.base import RoutingPredictor
from prophet.predict.data import RouterTrace
from prophet.predict.pathmatch import PathMatchPredictor
from prophet.warm import frequencies, warm_order

# The copy-only setting chosen on sequence 0 of the shared Mixtral trace (`experiments/results/sim_policy.json`,
# both profiles): a shorter, faster-decaying value, a margin against churn, and prefetch one layer ahead.
COPY_ONLY = {"span": 8.0, "decay": 0.9, "margin": 0.5, "horizon": 1}


class ValuePredictor(RoutingPredictor):
    """Near-term predictions (path matching by default) plus a recency-weighted rate per expert (see module).

    ``span``: tokens the value looks ahead (>= 2); ``decay``: weight of a token one token older in the rate;
    ``prior``: pseudo-tokens of the fitted frequency (uniform before `fit`); ``margin``: how much more than its
    victim a copy must be worth (`worth_copying`). The defaults are the setting `experiments/replay/policy_select.py`
    chose for hybrid execution on held-in data (sequence 0 of the shared Mixtral trace); copy-only chose
    `COPY_ONLY` (prefetch only the next layer, within the link budget: there a wrong copy delays demand misses).
    """

    name = "value"
    _prefill_keep = False  # its keep-priority is a value, not the near scores' sum

    def __init__(self, num_layers: int, num_experts: int, top_k: int, near: RoutingPredictor | None = None,
                 span: float = 16.0, decay: float = 0.95, prior: float = 4.0, margin: float = 0.0,
                 **kw: Any) -> None:
        kw.setdefault("horizon", num_layers)  # prefetch a whole token ahead: one layer cannot hide a copy
        super().__init__(num_layers, num_experts, top_k, **kw)
        if not span >= 2 or not 0.0 <= decay <= 1.0 or not prior > 0 or not margin >= 0:
            raise ConfigError(f"ValuePredictor(span={span}, decay={decay}, prior={prior}, margin={margin}): "
                              "span >= 2 tokens, decay in [0, 1], prior > 0 pseudo-tokens, margin >= 0")
        self.near = near or PathMatchPredictor(num_layers, num_experts, top_k)
        self.span, self.decay, self.prior, self.margin = span, decay, prior, margin
        self.base = np.full((num_layers, num_experts), top_k / num_experts)  # [L, E] fitted uses per token
        self.counts = np.zeros((num_layers, num_experts))  # [L, E] decayed uses in this sequence
        self.weight = np.zeros(num_layers)  # [L] decayed tokens counted
        self._near_memo: tuple[int, np.ndarray] = (-1, np.zeros(0))  # (version, [2L, E]) see `_table`
        self.name = f"value[{self.near.name}]"

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def fit(self, traces: Sequence[RouterTrace]) -> ValuePredictor:
        self.near.fit(traces)
        seen = np.zeros(self.num_layers, dtype=bool)
        for tr in traces:
            seen |= (tr.experts[..., 0] >= 0).any(axis=0)
        self.base[seen] = frequencies(traces, self.num_layers, self.num_experts)[seen]
        return self

    def warm_order(self) -> list[tuple[int, int]]:
        """The experts a cache should hold before a sequence starts, most valuable first: by fitted frequency
        (`prophet.warm`), what the value of an expert is before the sequence has any history."""
        return warm_order(self.base)

    def reset(self) -> None:
        super().reset()
        self.near.reset()
        self.counts[:] = 0.0
        self.weight[:] = 0.0

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        self.near.feed(layer, rows, weights, hidden)
        counts = self.counts[layer]
        counts *= self.decay
        self.weight[layer] = self.decay * self.weight[layer] + len(rows)
        for row in rows:
            for e in row:
                counts[e] += 1.0

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        if len(distances) and distances.max() <= 2 * self.num_layers:
            return self._table()[distances - 1]
        return self.near._scores(distances, shifts, layers)

    def _table(self) -> np.ndarray:
        """``[2L, E]`` near probabilities at distances 1..2L, computed once per observation: prefetch (a token
        ahead) and the values of every layer (its next two steps) read the same rows."""
        version, table = self._near_memo
        if version != self.version:
            d = np.arange(1, 2 * self.num_layers + 1)
            table = self.near._scores(d, *np.divmod(self.layer + d, self.num_layers))
            self._near_memo = (self.version, table)
        return table

    # ---- value -------------------------------------------------------------------------------------------
    def rates(self) -> np.ndarray:
        """``[L, E]`` expected uses per token from this sequence's recency-weighted counts and the prior."""
        return (self.counts + self.prior * self.base) / (self.weight + self.prior)[:, None]

    def _keep_block(self, layers: np.ndarray) -> np.ndarray:
        """The value ``[M, E]`` of each of ``layers [M]`` (what `eviction_score` and `keep_table` read): near
        uses at the layer's next two steps plus the rates of the ``span - 2`` tokens after."""
        return super()._keep_block(layers) + (self.span - 2.0) * self.rates()[layers]

    def value(self, layer: int, expert: int) -> float:
        """Expected uses of ``expert`` of ``layer`` over the next ``span`` tokens."""
        return self._keep_rows([layer])[layer][expert]

    def worth_copying(self, key: tuple[int, int], victim: tuple[int, int] | None) -> bool:
        """Whether copying ``key`` in, evicting ``victim`` (None: a free slot), is expected to pay: its value
        beats the victim's by ``margin``."""
        if victim is None:
            return True
        return self.value(*key) > self.value(*victim) + self.margin
