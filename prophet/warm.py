"""Warm start: which experts fill a cache's free slots before a sequence decodes.

Why: with misses computed on the host the link fills an empty cache at only a few copies a token (Mixtral at batch
1 over PCIe 5: ~4), so a sequence's first tens of tokens run with free slots. Filling them first, most used
first, from the routing a predictor was fitted on costs link time that the sequence's first tokens then share
(`prophet.cache.ExpertCache.warm` issues ordinary copies), and the same order serves every policy, so a baseline
"with warm start" and Prophet's policy start from the same cache: what remains between them is prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from prophet.errors import ConfigError
from prophet.policies import Key

if TYPE_CHECKING:
    from prophet.predict.data import RouterTrace


def frequencies(traces: Sequence[RouterTrace], num_layers: int, num_experts: int) -> np.ndarray:
    """``[L, E]`` uses per token of every expert over ``traces`` (0 where a layer saw no token)."""
    uses, tokens = np.zeros((num_layers, num_experts)), np.zeros(num_layers)
    for tr in traces:
        uses += tr.multi_hot().sum(axis=0)
        tokens += (tr.experts[..., 0] >= 0).sum(axis=0)
    return np.divide(uses, tokens[:, None], out=np.zeros_like(uses), where=tokens[:, None] > 0)


def warm_order(freq: np.ndarray) -> list[Key]:
    """Every ``(layer, expert)`` by ``freq [L, E]``, most used first (ties: lower layer, then lower expert)."""
    freq = np.asarray(freq, dtype=np.float64)
    if freq.ndim != 2:
        raise ConfigError(f"warm start needs [layers, experts] frequencies; got shape {freq.shape}")
    L, E = freq.shape
    flat = np.argsort(-freq.ravel(), kind="stable")  # [L*E]
    return [(int(i // E), int(i % E)) for i in flat]


def fitted_order(traces: Sequence[RouterTrace]) -> list[Key]:
    """The warm-start order of the routing in ``traces`` (what a predictor fitted on them would load)."""
    if not traces:
        raise ConfigError("warm start needs at least one fitted trace")
    return warm_order(frequencies(traces, traces[0].num_layers, traces[0].num_experts))
