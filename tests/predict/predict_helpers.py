"""Synthetic router traces whose right answers are known."""

from __future__ import annotations

import numpy as np

from prophet.predict.data import RouterTrace


def make_trace(experts: np.ndarray, lengths: list[int], num_experts: int, exact: np.ndarray | None = None) -> RouterTrace:
    """A `RouterTrace` from ``experts [N, L, K]`` split into sequences of ``lengths``."""
    experts = np.asarray(experts, np.int64)
    return RouterTrace(
        experts=experts,
        weights=np.where(experts >= 0, 1.0 / experts.shape[2], np.nan).astype(np.float32),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        exact=np.ones(experts.shape[:2], bool) if exact is None else exact,
        num_experts=num_experts,
    )


def random_trace(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int, seqs: int = 1) -> RouterTrace:
    """Uniformly random top-k routing (distinct experts per row)."""
    ids = np.argsort(rng.random((tokens, layers, experts)), axis=-1)[..., :k]
    lengths = [len(a) for a in np.array_split(np.arange(tokens), seqs)]
    return make_trace(ids, lengths, experts)


def mapped_trace(rng: np.random.Generator, tokens: int, layers: int, experts: int, seqs: int) -> RouterTrace:
    """Top-2 routing where layer l+1's experts are a fixed permutation of layer l's: a deterministic path."""
    perms = [rng.permutation(experts) for _ in range(layers)]
    ids = np.zeros((tokens, layers, 2), np.int64)
    ids[:, 0] = np.argsort(rng.random((tokens, experts)), axis=-1)[:, :2]
    for layer in range(1, layers):
        ids[:, layer] = perms[layer][ids[:, layer - 1]]
    lengths = [len(a) for a in np.array_split(np.arange(tokens), seqs)]
    return make_trace(ids, lengths, experts)
