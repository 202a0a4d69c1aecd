"""Measuring predictors on traces: recall per look-ahead distance.

`recall_report` replays a trace through a predictor, batch 1, token by token and layer by layer, and scores
its top-k guesses against what the trace did. Hit rates on the real cache come from the one decode step
(`prophet.step`) with free copies: `prophet.sim.replay.replay_counts`; predictors only score, they never
drive a cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from prophet.predict.base import RoutingPredictor
from prophet.predict.data import RouterTrace


def distance_label(distance: int, num_layers: int) -> str:
    if distance == num_layers:
        return "next token"
    return f"+{distance} layer" + ("s" if distance > 1 else "")


def recall_report(
    predictor: RoutingPredictor,
    trace: RouterTrace,
    distances: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    progress: bool = False,
) -> dict:
    """Recall@k and precision@k of ``predictor`` on ``trace`` per look-ahead distance and target layer.

    ``distances`` default to 1-4 layers and the next token (``L``); ``ks`` to top-k and 2 x top-k. A distance
    below L counts targets in the same token only (the last layer's +1 is the next token's first layer, a
    different question that ``L`` answers); a step counts only where its source and target rows are
    recorded and exact (cross-layer alignment is certain).
    recall@k = found true experts / true experts; precision@k = found true experts / (k x steps).
    """
    L, E = trace.num_layers, trace.num_experts
    distances = list(distances or [d for d in (1, 2, 3, 4) if d < L] + [L])
    ks = list(ks or sorted({trace.top_k, min(2 * trace.top_k, E)}))
    hot = trace.multi_hot()  # [N, L, E]
    # target[i] [N, L, 2] = (row, layer) reached from each source step at distances[i], row -1 if not counted
    target = np.full((len(distances), trace.num_tokens, L, 2), -1, np.int64)
    for i, d in enumerate(distances):
        src_row, src_layer, dst_row, dst_layer = trace.pairs(d)
        keep = (src_layer + d < L) | (d == L)  # d < L: later layers of the same token only
        target[i, src_row[keep], src_layer[keep]] = np.stack([dst_row[keep], dst_layer[keep]], axis=1)
    wanted = target[..., 0] >= 0  # [D, N, L]
    hits = np.zeros((len(distances), len(ks), L))  # [D, K, L(target)]
    true = np.zeros((len(distances), L))
    steps = np.zeros((len(distances), L))
    dist = np.asarray(distances)
    bar = tqdm(total=trace.num_tokens, desc=f"recall {predictor.name}", disable=not progress, leave=False)
    for s in range(trace.num_sequences):
        predictor.reset()
        for t in range(trace.seq_offsets[s], trace.seq_offsets[s + 1]):
            for layer in range(L):
                h = None if trace.hidden is None else trace.hidden[t, layer][None]
                predictor.observe(layer, trace.experts[t, layer][None], trace.weights[t, layer][None], h)
                sel = np.flatnonzero(wanted[:, t, layer])
                if not len(sel):
                    continue
                scores = predictor.scores(dist[sel])  # [D', E]
                order = np.argsort(-scores, axis=1, kind="stable")
                for i, row in zip(sel, order, strict=True):
                    r, j = target[i, t, layer]
                    truth = hot[r, j]
                    true[i, j] += truth.sum()
                    steps[i, j] += 1
                    for ki, k in enumerate(ks):
                        hits[i, ki, j] += truth[row[:k]].sum()
            bar.update()
    bar.close()
    out: dict = {"predictor": predictor.name, "trace": trace.name, "ks": ks, "distances": {}}
    for i, d in enumerate(distances):
        entry: dict = {"label": distance_label(d, L), "steps": int(steps[i].sum())}
        for ki, k in enumerate(ks):
            tot = true[i].sum()
            per_layer = np.where(true[i] > 0, hits[i, ki] / np.maximum(true[i], 1), np.nan)
            entry[f"recall@{k}"] = float(hits[i, ki].sum() / tot) if tot else float("nan")
            entry[f"precision@{k}"] = float(hits[i, ki].sum() / (k * steps[i].sum())) if tot else float("nan")
            entry[f"recall@{k}_per_layer"] = [None if np.isnan(v) else round(float(v), 4) for v in per_layer]
        out["distances"][str(d)] = entry
    return out
