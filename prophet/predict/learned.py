"""A small learned predictor: an MLP from the recent routing history to the experts of the steps ahead.

Input at layer m, from routing only: the multi-hot experts of the last ``window`` steps in execution order
(layer m, m-1, ..., reaching back into the previous token), plus a one-hot of m. Output: logits for the
experts at look-ahead distances 1..``max_distance``; further distances fall back to the fitted layer
frequency. Trained with masked binary cross-entropy on the aligned steps of fitted traces (torch, CPU,
seconds); inference runs in numpy from the exported weights, several times cheaper than a torch call at
batch 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from prophet.predict.base import RoutingPredictor, union
from prophet.predict.data import RouterTrace


class MLPPredictor(RoutingPredictor):
    """Per-step MLP over the last ``window`` routing steps (see the module docstring)."""

    name = "mlp"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        window: int = 4,
        hidden_size: int = 128,
        max_distance: int = 4,
        epochs: int = 30,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        self.window = window
        self.max_distance = max_distance
        self.hidden_size = hidden_size
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.seed = seed
        L, E = num_layers, num_experts
        self.num_features = window * E + L
        self.w1 = np.zeros((self.num_features, hidden_size), np.float32)  # [F, Hd]
        self.b1 = np.zeros(hidden_size, np.float32)
        self.w2 = np.zeros((max_distance, hidden_size, E), np.float32)  # [D, Hd, E]
        self.b2 = np.zeros((max_distance, E), np.float32)
        self.freq = np.full((L, E), top_k / E)  # [L, E] fitted use frequency, for distances beyond D
        self.recent: list[list[list[int]]] = []  # rows of the last `window` steps, newest first
        self._memo: tuple[int, np.ndarray] | None = None

    # ---- training -------------------------------------------------------------------------------------------
    def _dataset(self, tr: RouterTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features ``[P, F]``, targets ``[P, D, E]`` and target mask ``[P, D]`` of every step of ``tr``."""
        L, E, W, D = self.num_layers, self.num_experts, self.window, self.max_distance
        N = tr.num_tokens
        hot = tr.multi_hot().reshape(N * L, E)  # [N*L, E] steps in execution order
        step = np.arange(N * L)
        first = tr.seq_offsets[np.searchsorted(tr.seq_offsets, step // L, side="right") - 1] * L  # [N*L]
        parts = []
        for back in range(W):
            src = step - back
            parts.append(np.where((src >= first)[:, None], hot[np.maximum(src, 0)], 0.0))
        onehot = np.eye(L, dtype=np.float32)[step % L]
        x = np.concatenate([*parts, onehot], axis=1).astype(np.float32)  # [N*L, F]
        y = np.zeros((N * L, D, E), np.float32)
        mask = np.zeros((N * L, D), bool)
        full = tr.multi_hot()
        for d in range(1, D + 1):
            src_row, src_layer, dst_row, dst_layer = tr.pairs(d)
            sample = src_row * L + src_layer
            y[sample, d - 1] = full[dst_row, dst_layer]
            mask[sample, d - 1] = True
        keep = mask.any(axis=1)
        return x[keep], y[keep], mask[keep]

    def fit(self, traces: Sequence[RouterTrace], progress: bool = False) -> MLPPredictor:
        L, E, D = self.num_layers, self.num_experts, self.max_distance
        uses, steps = np.zeros((L, E)), np.ones(L)
        data = []
        for tr in traces:
            uses += tr.multi_hot().sum(axis=0)
            steps += (tr.experts[..., 0] >= 0).sum(axis=0)
            data.append(self._dataset(tr))
        self.freq = (uses + self.top_k / E) / steps[:, None]
        x = torch.from_numpy(np.concatenate([d[0] for d in data]))
        y = torch.from_numpy(np.concatenate([d[1] for d in data]))
        mask = torch.from_numpy(np.concatenate([d[2] for d in data])).float()
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        model = nn.Sequential(
            nn.Linear(self.num_features, self.hidden_size), nn.ReLU(), nn.Dropout(self.dropout),
            nn.Linear(self.hidden_size, D * E),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        batch = 128
        for _ in tqdm(range(self.epochs), desc="fit mlp", disable=not progress, leave=False):
            perm = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], batch):
                idx = perm[i : i + batch]
                loss = (loss_fn(model(x[idx]).view(-1, D, E), y[idx]).mean(-1) * mask[idx]).sum()
                opt.zero_grad()
                (loss / mask[idx].sum().clamp(min=1)).backward()
                opt.step()
        self.w1 = model[0].weight.detach().numpy().T.copy()
        self.b1 = model[0].bias.detach().numpy().copy()
        self.w2 = model[-1].weight.detach().numpy().T.reshape(self.hidden_size, D, E).transpose(1, 0, 2).copy()
        self.b2 = model[-1].bias.detach().numpy().reshape(D, E).copy()
        return self

    # ---- online ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.recent = []

    def _new_token(self, batch: int) -> None:
        if self.recent and len(self.recent[0]) != batch:
            self.recent = []  # a different batch: the window's rows no longer belong to these tokens

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        self.recent.insert(0, rows)
        del self.recent[self.window :]

    def _hidden_activations(self) -> np.ndarray:
        """``[T, Hd]`` first-layer activations at the current step (memoized per observation).

        The input is multi-hot, so ``x @ w1`` is the sum of the rows its ones select: a gather, not a GEMM.
        """
        if self._memo is not None and self._memo[0] == self.version:
            return self._memo[1]
        E = self.num_experts
        base = self.b1 + self.w1[self.window * E + max(self.layer, 0)]  # bias + layer one-hot
        out = np.empty((len(self.recent[0]) if self.recent else 1, self.hidden_size), np.float32)
        for t in range(out.shape[0]):
            idx = [w * E + e for w, step in enumerate(self.recent) for e in step[t]]
            out[t] = base + self.w1[idx].sum(axis=0)
        h = np.maximum(out, 0.0)
        self._memo = (self.version, h)
        return h

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        if distances.max() > self.max_distance:
            out = self.freq[layers]
            near = distances <= self.max_distance
            if near.any():
                out[near] = self._scores(distances[near], shifts[near], layers[near])
            return out
        h = self._hidden_activations()  # [T, Hd]
        if len(distances) == 1 and h.shape[0] == 1:  # batch-1 prefetch: one matrix-vector product
            d = int(distances[0]) - 1
            return 1.0 / (1.0 + np.exp(-(h @ self.w2[d] + self.b2[d])))
        d = distances - 1
        logits = np.einsum("th,dhe->tde", h, self.w2[d]) + self.b2[d]  # [T, D, E]
        return union(1.0 / (1.0 + np.exp(-logits)))
