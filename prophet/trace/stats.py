"""Routing statistics as plain numpy data: what an expert cache and a predictor can hope to exploit.

Conventions: ``-1`` expert ids (not recorded) are ignored everywhere; a *selection* is one (token, layer,
slot) entry; temporal measures never cross sequence boundaries; cross-layer measures use only rows whose
``exact`` flag is set at both layers (converted traces may misalign tokens across layers elsewhere).
Entropies and mutual information are in bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from prophet.trace.format import Trace


def occupancy(trace: Trace, layer: int) -> np.ndarray:
    """[N, E] bool: token t selected expert e at MoE layer ``layer``."""
    ex = np.asarray(trace.experts[:, layer])  # [N, K]
    occ = np.zeros((len(trace), trace.num_experts + 1), bool)  # column E collects the -1 entries
    occ[np.arange(len(trace))[:, None], ex] = True
    return occ[:, : trace.num_experts]


def popularity(trace: Trace) -> np.ndarray:
    """[L, E] share of each layer's selections that went to each expert (rows sum to 1; 0 for empty layers)."""
    ex = np.asarray(trace.experts)
    L, E = trace.num_layers, trace.num_experts
    counts = np.zeros((L, E + 1), np.int64)
    np.add.at(counts, (np.broadcast_to(np.arange(L)[None, :, None], ex.shape), ex), 1)
    counts = counts[:, :E]
    total = counts.sum(1, keepdims=True)
    return np.divide(counts, total, out=np.zeros((L, E)), where=total > 0)


def entropy(trace_or_popularity: Trace | np.ndarray, normalized: bool = False) -> np.ndarray:
    """[L] entropy of each layer's popularity; ``normalized`` divides by log2(E) (1 = perfectly balanced)."""
    pop = popularity(trace_or_popularity) if isinstance(trace_or_popularity, Trace) else trace_or_popularity
    logs = np.log2(pop, out=np.zeros_like(pop), where=pop > 0)
    h = -(pop * logs).sum(-1)
    return h / np.log2(pop.shape[-1]) if normalized else h


def reuse_distances(trace: Trace) -> list[np.ndarray]:
    """Per layer, an int64 array: for every selection whose expert this sequence already used at this layer,
    how many tokens ago (1 = the previous token). First uses in a sequence have no distance."""
    seq = trace.sequence_ids()
    out = []
    for layer in range(trace.num_layers):
        occ = occupancy(trace, layer)
        parts = []
        for e in range(trace.num_experts):
            pos = np.flatnonzero(occ[:, e])
            same = seq[pos[1:]] == seq[pos[:-1]]
            parts.append(np.diff(pos)[same])
        out.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return out


def reuse_rate(trace: Trace, window: int = 1) -> np.ndarray:
    """[L] share of selections (of tokens that have a predecessor in their sequence) whose expert was also
    selected within the previous ``window`` tokens: the hit rate of a per-layer cache holding exactly the
    experts of the last ``window`` tokens."""
    first = np.zeros(len(trace), bool)
    first[trace.seq_offsets[:-1][trace.sequence_lengths > 0]] = True
    out = np.zeros(trace.num_layers)
    seq = trace.sequence_ids()
    for layer in range(trace.num_layers):
        occ = occupancy(trace, layer)
        recent = np.zeros_like(occ)
        for d in range(1, window + 1):
            prev = np.zeros_like(occ)
            prev[d:] = occ[:-d] & (seq[d:] == seq[:-d])[:, None]
            recent |= prev
        denom = occ[~first].sum()
        out[layer] = (occ & recent)[~first].sum() / denom if denom else np.nan
    return out


def cooccurrence(trace: Trace, gap: int = 1) -> np.ndarray:
    """[L-gap, E, E] counts: ``C[l, i, j]`` = tokens that chose i at layer l and j at layer l+gap."""
    L, E = trace.num_layers, trace.num_experts
    ex = np.asarray(trace.experts)
    exact = np.asarray(trace.exact)
    out = np.zeros((max(L - gap, 0), E, E), np.int64)
    for layer in range(L - gap):
        rows = exact[:, layer] & exact[:, layer + gap]
        a, b = ex[rows, layer], ex[rows, layer + gap]  # [n, K] each
        ii = np.repeat(a, a.shape[1], axis=1).reshape(-1)
        jj = np.tile(b, (1, b.shape[1])).reshape(-1)
        ok = (ii >= 0) & (jj >= 0)
        np.add.at(out[layer], (ii[ok], jj[ok]), 1)
    return out


def mutual_information(trace_or_counts: Trace | np.ndarray, gap: int = 1) -> np.ndarray:
    """[L-gap] mutual information between an expert chosen at layer l and one chosen by the same token at
    layer l+gap (plug-in estimate from `cooccurrence`; biased upward when tokens are few relative to E^2)."""
    c = cooccurrence(trace_or_counts, gap) if isinstance(trace_or_counts, Trace) else trace_or_counts
    c = c.astype(np.float64)
    total = c.sum((1, 2), keepdims=True)
    p = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
    pi, pj = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    ratio = np.divide(p, pi * pj, out=np.ones_like(p), where=p > 0)
    return (p * np.log2(ratio)).sum((1, 2))


def next_layer_recall(trace: Trace, fit: Trace | None = None) -> np.ndarray:
    """[L-1] recall@K of predicting layer l+1's experts from this token's layer-l experts by co-occurrence
    counts (fitted on ``fit``, default the trace itself: optimistic). Measures how predictable depth is."""
    c = cooccurrence(fit if fit is not None else trace, 1).astype(np.float64)
    ex, exact, K = np.asarray(trace.experts), np.asarray(trace.exact), trace.top_k
    out = np.full(trace.num_layers - 1, np.nan)
    for layer in range(trace.num_layers - 1):
        rows = (
            exact[:, layer]
            & exact[:, layer + 1]
            & (ex[:, layer] >= 0).all(-1)
            & (ex[:, layer + 1] >= 0).all(-1)
        )
        if not rows.any():
            continue
        scores = c[layer][ex[rows, layer]].sum(1)  # [n, E]
        scores += 1e-9 * c[layer].sum(0)  # ties go to the more popular expert
        pred = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        true = ex[rows, layer + 1]
        hits = (pred[:, :, None] == true[:, None, :]).any(-1).sum()
        out[layer] = hits / true.size
    return out


@dataclass(frozen=True)
class DedupCurve:
    """Distinct experts one batched step touches per layer, by batch size.

    ``mode="random"``: each step is B tokens drawn at random (without replacement) from the whole trace,
    i.e. B unrelated requests. ``mode="sequences"``: B sequences decode side by side and step t holds token t
    of each; only steps where all B are still running count (NaN when the trace has fewer than B sequences).
    ``uniform`` is the expectation E*(1-(1-K/E)^B) if routing were uniform and independent.
    """

    mode: str
    batch_sizes: np.ndarray  # [M]
    distinct: np.ndarray  # [M, L] mean distinct experts per step
    uniform: np.ndarray  # [M]
    num_experts: int
    top_k: int

    @property
    def mean(self) -> np.ndarray:
        """[M] distinct experts per step, averaged over layers (NaN where no layer had a full batch)."""
        valid = ~np.isnan(self.distinct)
        n = valid.sum(1)
        total = np.where(valid, self.distinct, 0.0).sum(1)
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    @property
    def saving(self) -> np.ndarray:
        """[M] share of expert loads a batch-wide dedup saves vs loading K per token: 1 - distinct/(B*K)."""
        return 1 - self.mean / (self.batch_sizes * self.top_k)


def dedup_curve(
    trace: Trace,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    mode: Literal["random", "sequences"] = "random",
    seed: int = 0,
) -> DedupCurve:
    """The dedup curve (see `DedupCurve` for what a step is in each ``mode``)."""
    bs = np.asarray(sorted(set(int(b) for b in batch_sizes)), np.int64)
    if bs.size and bs[0] < 1:
        raise ValueError(f"batch_sizes must be >= 1, got {list(batch_sizes)}")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    distinct = np.full((len(bs), L), np.nan)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(trace))
    lengths = trace.sequence_lengths
    for layer in range(L):
        occ = occupancy(trace, layer)
        for i, b in enumerate(bs):
            if mode == "random":
                g = len(trace) // b
                if g:
                    distinct[i, layer] = occ[perm[: g * b]].reshape(g, b, E).any(1).sum(-1).mean()
            elif mode == "sequences":
                groups = [np.arange(s, s + b) for s in range(0, trace.num_sequences - b + 1, b)]
                counts = []
                for grp in groups:
                    steps = int(lengths[grp].min())
                    rows = trace.seq_offsets[grp][None, :] + np.arange(steps)[:, None]  # [steps, b]
                    counts.append(occ[rows].any(1).sum(-1))
                if counts:
                    distinct[i, layer] = np.concatenate(counts).mean()
            else:
                raise ValueError(f"mode={mode!r}: use 'random' or 'sequences'")
    uniform = E * (1 - (1 - K / E) ** bs.astype(np.float64))
    return DedupCurve(mode=mode, batch_sizes=bs, distinct=distinct, uniform=uniform, num_experts=E, top_k=K)


def summary(trace: Trace, batch_sizes: Sequence[int] = (1, 4, 16, 64)) -> dict[str, Any]:
    """The headline statistics of a trace as JSON-ready plain data."""
    dists = reuse_distances(trace)
    curve = dedup_curve(trace, batch_sizes)
    return {
        "model": trace.model.to_dict(),
        "tokens": len(trace),
        "sequences": trace.num_sequences,
        "exact_fraction": float(np.asarray(trace.exact).mean()) if len(trace) else 0.0,
        "entropy_normalized": entropy(trace, normalized=True).round(4).tolist(),
        "reuse_rate_window1": reuse_rate(trace, 1).round(4).tolist(),
        "median_reuse_distance": [float(np.median(d)) if d.size else None for d in dists],
        "mutual_information_bits_gap1": mutual_information(trace, 1).round(4).tolist(),
        "next_layer_recall": np.round(next_layer_recall(trace), 4).tolist(),
        "dedup_random": {
            int(b): round(float(v), 3) for b, v in zip(curve.batch_sizes, curve.mean, strict=True)
        },
        "dedup_uniform": {
            int(b): round(float(v), 3) for b, v in zip(curve.batch_sizes, curve.uniform, strict=True)
        },
    }
