"""A learned head per MoE layer: hidden-state sketch + this layer's experts -> the experts of the steps ahead.

Why: routing history alone generalizes poorly across sequences, while the router input already carries most
of what the next layers' routers will see. Per layer ``l`` a linear map (optionally low-rank) takes the
standardized sketch of layer l's router input ``[D]`` and the multi-hot of layer l's experts ``[E]`` to logits
of the experts at look-ahead distances ``1..max_distance`` (distances past the token's last layer land in the
next token's first layers). Trained with masked binary cross-entropy on the aligned steps of traces that carry
a sketch (torch, CPU, seconds). Inference must fit the per-layer step budget (issue 16: <= 10 us at batch 1),
so the projection, the standardization and the sigmoid's half-scale are folded into the first and last maps
once (`_compile`), and an observation at batch 1 is one product per map plus a memoized bias;
`ReferenceHead` keeps the unfused path the fused one is tested against.

Cost at batch 1 is mostly per-call overhead, so a head can run at every ``every``-th layer only (``every=L``:
once per token, at the last layer, which is then also the next-token look-ahead): an *anchor* layer's head
predicts the ``max_distance >= every`` steps up to the next anchor, and the layers between are served from
that run (their observation costs the position bookkeeping, their `predict` a lookup in the anchor's top-n).

Traces carry sketches, the runtime has the full router input: give ``projection`` (`prophet.trace.sketch`'s
``sketch_projection`` for the trace's `SketchInfo`) to run a head fitted on sketches on live hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prophet.errors import ConfigError
from prophet.predict.base import Prediction, RoutingPredictor, union
from prophet.predict.data import RouterTrace

_CALL_MACS = 10_000  # multiply-adds that take about as long as one small numpy call at batch 1 on this CPU


class HiddenStateHead(RoutingPredictor):
    """Per-layer head on the sketch and the current experts: linear, low-rank (``rank``) or one ReLU layer of
    ``hidden_units`` (see the module docstring)."""

    name = "head"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        sketch_dim: int,
        max_distance: int = 2,
        rank: int | None = None,
        hidden_units: int | None = None,
        history: bool = True,
        every: int = 1,
        projection: torch.Tensor | None = None,
        steps: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(num_layers, num_experts, top_k, **kw)
        if projection is not None and projection.shape[-1] != sketch_dim:
            raise ConfigError(f"projection maps to {projection.shape[-1]} dims, the head reads {sketch_dim}: "
                              "use the SketchInfo the training traces were recorded with")
        self.sketch_dim = sketch_dim
        self.max_distance = max_distance
        if not 1 <= every <= num_layers or max_distance < every:
            raise ConfigError(f"every={every} with max_distance={max_distance}: the head must run at least once per "
                              f"token (every <= {num_layers} layers) and see up to its next run (max_distance >= every)")
        self.every = every
        # layers where the head runs: every `every`-th and the token's last (its run reaches the next token)
        self.anchors = sorted({layer for layer in range(num_layers) if (layer + 1) % every == 0} | {num_layers - 1})
        self._is_anchor = [layer in self.anchors for layer in range(num_layers)]
        if rank is not None and hidden_units is not None:
            raise ConfigError("give the head a low rank or a hidden layer, not both")
        self.rank = rank
        self.hidden_units = hidden_units
        self.history = history
        self.projection = None if projection is None else projection.detach().float().cpu().numpy()  # [H, D]
        self.steps, self.lr, self.weight_decay, self.seed = steps, lr, weight_decay, seed
        L, E = num_layers, num_experts
        self.num_features = sketch_dim + (E if history else 0)
        self.mean = np.zeros((L, sketch_dim), np.float32)  # feature standardization, per layer
        self.scale = np.ones((L, sketch_dim), np.float32)
        # per MoE layer: the affine maps of the head, ReLU between them ([F, Dd*E] when linear or low-rank)
        self.layers = [
            [(np.zeros((self.num_features, max_distance * E), np.float32), np.zeros(max_distance * E, np.float32))]
            for _ in range(L)
        ]
        self.freq = np.full((L, E), top_k / E)  # [L, E] fitted frequency, for distances beyond max_distance
        self.probs: np.ndarray | None = None  # [Dd, E] predictions from the last anchor's run
        self._run_at = 0  # position (tokens * L + layer) of that run
        self._lag = 0  # layer steps from that run to the last observed layer
        self._tops: dict[int, tuple[list, list, list]] = {}  # n -> the run's top-n per distance, see `predict`
        self._fused: list[tuple[np.ndarray, ...]] | None = None  # see `_compile`

    # the parameters the fused maps derive from: replacing one (as tests and loaders do) recompiles them
    @property
    def mean(self) -> np.ndarray:
        return self._mean

    @mean.setter
    def mean(self, value: np.ndarray) -> None:
        self._mean, self._fused = value, None

    @property
    def scale(self) -> np.ndarray:
        return self._scale

    @scale.setter
    def scale(self, value: np.ndarray) -> None:
        self._scale, self._fused = value, None

    @property
    def layers(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        return self._layers

    @layers.setter
    def layers(self, value: list[list[tuple[np.ndarray, np.ndarray]]]) -> None:
        self._layers, self._fused = value, None

    @property
    def _in_dim(self) -> int:
        """Width of the hidden state `observe` takes: the router input with a projection, else the sketch."""
        return self.sketch_dim if self.projection is None else self.projection.shape[0]

    # ---- fitting ---------------------------------------------------------------------------------------------
    def fit(self, traces: Sequence[RouterTrace]) -> HiddenStateHead:
        """Train every layer's head on the aligned steps of ``traces`` (each needs ``hidden`` = sketches)."""
        L, E, Dd = self.num_layers, self.num_experts, self.max_distance
        feats: list[list[np.ndarray]] = [[] for _ in range(L)]
        targets: list[list[np.ndarray]] = [[] for _ in range(L)]
        masks: list[list[np.ndarray]] = [[] for _ in range(L)]
        counts = np.zeros((L, E))
        for tr in traces:
            if tr.hidden is None or tr.hidden.shape[-1] != self.sketch_dim:
                raise ConfigError(f"{tr.name}: the head needs traces with a {self.sketch_dim}-dim sketch in hidden")
            hot = tr.multi_hot()  # [N, L, E]
            counts += hot.sum(0)
            y = np.zeros((tr.num_tokens, L, Dd, E), np.float32)
            m = np.zeros((tr.num_tokens, L, Dd), bool)
            for d in range(1, Dd + 1):
                src_row, src_layer, dst_row, dst_layer = tr.pairs(d)
                y[src_row, src_layer, d - 1] = hot[dst_row, dst_layer]
                m[src_row, src_layer, d - 1] = True
            for layer in self.anchors:
                rows = np.flatnonzero(m[:, layer].any(1))
                feats[layer].append(self._raw_features(tr.hidden[rows, layer], hot[rows, layer]))
                targets[layer].append(y[rows, layer])
                masks[layer].append(m[rows, layer])
        if counts.sum() > 0:
            self.freq = counts / np.maximum(counts.sum(1, keepdims=True), 1) * self.top_k
        for layer in self.anchors:
            x = np.concatenate(feats[layer]) if feats[layer] else np.zeros((0, self.num_features), np.float32)
            if not len(x):
                continue
            sk = x[:, : self.sketch_dim]
            self.mean[layer] = sk.mean(0)
            self.scale[layer] = sk.std(0) + 1e-6
            x[:, : self.sketch_dim] = (sk - self.mean[layer]) / self.scale[layer]
            y = np.concatenate(targets[layer]).reshape(len(x), -1)  # [n, Dd*E]
            m = np.repeat(np.concatenate(masks[layer]), E, axis=1)  # [n, Dd*E]
            self.layers[layer] = self._train(x, y, m)
        self._fused = None  # mean, scale and layers were updated in place
        return self

    def _train(self, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Full-batch AdamW on masked BCE; returns the affine maps ``(W [in, out], b [out])`` in order (a
        low-rank head collapsed to one ``[F, Dd*E]`` map)."""
        torch.manual_seed(self.seed)
        f, o = x.shape[1], y.shape[1]
        if self.hidden_units is not None:
            net = nn.Sequential(nn.Linear(f, self.hidden_units), nn.ReLU(), nn.Linear(self.hidden_units, o))
        elif self.rank is not None:
            net = nn.Sequential(nn.Linear(f, self.rank, bias=False), nn.Linear(self.rank, o))
        else:
            net = nn.Linear(f, o)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        xt, yt, mt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m).float()
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = (nn.functional.binary_cross_entropy_with_logits(net(xt), yt, reduction="none") * mt).sum() / mt.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            if self.hidden_units is not None:
                return [(lin.weight.T.numpy().copy(), lin.bias.numpy().copy()) for lin in (net[0], net[2])]
            bias = net(torch.zeros(1, f))[0]
            return [((net(torch.eye(f)) - bias).numpy(), bias.numpy())]  # the affine map, whatever its factors

    def _raw_features(self, sketch: np.ndarray, hot: np.ndarray) -> np.ndarray:
        """``[T, D]`` sketch and ``[T, E]`` multi-hot -> ``[T, F]`` unstandardized features."""
        parts = [np.asarray(sketch, np.float32)] + ([np.asarray(hot, np.float32)] if self.history else [])
        return np.concatenate(parts, axis=1)

    # ---- online ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.probs = None
        self._tops = {}

    def _compile(self) -> list[tuple[np.ndarray, ...]]:
        """Per layer ``(W_in [In, out0], W_hot [E, out0], b0 [out0])`` and, for a hidden layer, ``W_out [out0, Dd*E]``,
        with everything affine folded in: on this CPU each small numpy call costs about as much as the product.

        ``[(h - mean) / scale, hot] @ W + b`` with ``h = x @ P`` is ``x @ P (W_s / scale) + hot @ W_h + (b -
        (mean / scale) @ W_s)``; the sigmoid as ``0.5 + 0.5 tanh(0.5 z)`` moves the inner half into the last
        map (exact: a power of two); a hidden layer gains a unit fixed at 1 that carries the output bias as the
        last row of ``W_out``. Folded in float64, stored float32 and contiguous. The projection ``P [H, D]`` is
        folded in unless that makes the first product larger by more than a call costs (``_CALL_MACS``); then
        it stays a product of its own (``_project``), as for a wide model's router input.
        """
        D = self.sketch_dim
        fused = []
        self._project = None
        if self.projection is not None:
            width = self.projection.shape[0]
            out0 = self.layers[0][0][0].shape[1] + (len(self.layers[0]) > 1)  # a hidden layer's extra unit
            if width * out0 > width * D + D * out0 + _CALL_MACS:
                self._project = np.ascontiguousarray(self.projection, np.float32)  # [H, D]
        for layer in range(self.num_layers):
            maps = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in self.layers[layer]]
            if len(maps) > 2:
                raise ConfigError(f"layer {layer} of the head has {len(maps)} maps; it supports one hidden layer")
            w0, b0 = maps[0]
            inv = 1.0 / np.asarray(self.scale[layer], np.float64)  # [D]
            w_in = w0[:D] * inv[:, None]  # [D, out0]
            b0 = b0 - (np.asarray(self.mean[layer], np.float64) * inv) @ w0[:D]
            if self.projection is not None and self._project is None:
                w_in = self.projection.astype(np.float64) @ w_in  # [H, out0]
            w_hot = w0[D:]  # [E, out0], or [0, out0] without history
            if len(maps) == 1:
                parts: tuple[np.ndarray, ...] = (0.5 * w_in, 0.5 * w_hot, 0.5 * b0)
            else:
                w1, b1 = maps[1]
                parts = (np.pad(w_in, ((0, 0), (0, 1))), np.pad(w_hot, ((0, 0), (0, 1))), np.append(b0, 1.0),
                         0.5 * np.vstack([w1, b1]))  # unit out0 is 1 after the ReLU: it carries b1
            fused.append(tuple(np.ascontiguousarray(a, np.float32) for a in parts))
        self._bias: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        return fused

    def _first_bias(self, layer: int, row: list[int]) -> np.ndarray:
        """``b0 + hot @ W_hot`` of one token, memoized per (layer, experts): a token's few experts take few values."""
        key = (layer, tuple(row))
        bias = self._bias.get(key)
        if bias is None:
            if len(self._bias) >= 1 << 16:
                self._bias.clear()
            _, w_hot, b0 = self._fused[layer][:3]
            bias = self._bias[key] = b0 + w_hot[row].sum(0, dtype=np.float32) if self.history else b0
        return bias

    def observe(self, layer: int, expert_ids: object, weights: object, hidden: object = None) -> None:
        """`RoutingPredictor.observe`; a served layer reads neither its ids nor its hidden state."""
        if self._is_anchor[layer]:
            super().observe(layer, expert_ids, weights, hidden)
        else:
            self.feed(layer, [], weights, hidden)

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        position = self.tokens * self.num_layers + layer
        if not self._is_anchor[layer]:  # served from the last anchor's run
            self._lag = position - self._run_at
            return
        self._run_at, self._lag, self._tops = position, 0, {}
        self._run(layer, rows, hidden)

    def _run(self, layer: int, rows: list[list[int]], hidden: object) -> None:
        """The head of anchor ``layer`` on ``hidden [T, In]``: sets ``probs [Dd, E]``."""
        if hidden is None:
            raise ConfigError("the hidden-state head needs the router input: pass hidden [T, H] (or its sketch) to observe")
        if isinstance(hidden, torch.Tensor):  # a CPU float32 tensor outside autograd is read in place (cheapest)
            plain = hidden.dtype == torch.float32 and not hidden.requires_grad and hidden.device.type == "cpu"
            h = hidden.numpy() if plain else hidden.detach().float().cpu().numpy()
        else:
            h = np.asarray(hidden, np.float32)
        width = h.shape[-1]
        if width != self._in_dim:
            if self.projection is not None:
                raise ConfigError(f"hidden of {width} dims, the projection expects {self.projection.shape[0]}")
            raise ConfigError(f"hidden of {width} dims, the head reads {self.sketch_dim}-dim sketches: give "
                              "projection= to run on full router inputs")
        if self._fused is None:
            self._fused = self._compile()
        maps = self._fused[layer]
        n = len(rows)
        h = h.reshape(n, width)
        if self._project is not None:
            h = h @ self._project  # [T, D]
        z = h @ maps[0]  # [T, out0]
        if n == 1:
            z += self._first_bias(layer, rows[0])
        else:
            hot = np.zeros((n, self.num_experts), np.float32)
            for i, row in enumerate(rows):
                hot[i, row] = 1.0
            z += hot[:, : len(maps[1])] @ maps[1] + maps[2]
        if len(maps) == 4:
            np.maximum(z, 0.0, out=z)
            z = z @ maps[3]  # [T, Dd*E]
        np.tanh(z, out=z)  # the sigmoid, without overflow: 0.5 + 0.5 tanh(logits / 2)
        z *= 0.5
        z += 0.5
        probs = z.reshape(n, self.max_distance, self.num_experts)
        self.probs = probs[0] if n == 1 else 1.0 - np.prod(1.0 - probs, axis=0)  # [Dd, E], `union` per distance

    def predict(self, horizon: int | None = None, top: int | None = None) -> list[Prediction]:
        """`RoutingPredictor.predict`, served from the anchor run's top-n per distance: one argsort per run and
        n, each distance's list built when first asked (what a served layer pays is Python, not numpy)."""
        h = min(horizon or self.horizon, self.num_layers)
        n = min(top or self.top, self.num_experts)
        lag = self._lag
        if self.probs is None or lag + h > self.max_distance:
            return super().predict(horizon, top)
        run = self._tops.get(n)
        if run is None:  # [Dd] lists of (expert, score) to fill, the run's top-n order [Dd, n] and scores [Dd, E]
            run = self._tops[n] = ([None] * self.max_distance, np.argsort(self.probs, axis=1)[:, -n:].tolist(),
                                   self.probs.tolist())
        tops, order, vals = run
        base = self.layer + 1
        out = []
        for d in range(h):
            best = tops[lag + d]
            if best is None:
                row = vals[lag + d]
                best = tops[lag + d] = [(e, row[e]) for e in order[lag + d] if row[e] > 0.0]
            # tuple.__new__ is what Prediction(...) runs, without the keyword-handling call (half the cost)
            out += [tuple.__new__(Prediction, (base + d, e, v)) for e, v in best]
        return out

    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        if self.probs is None:
            return self.freq[layers]  # [D, E] (a copy: fancy indexing)
        index = distances + (self._lag - 1)  # rows of the anchor's run
        if max(index.tolist()) < self.max_distance:  # what `predict` asks: only the run's own distances
            return self.probs[index]
        out = self.freq[layers]
        near = index < self.max_distance
        out[near] = self.probs[index[near]]
        return out



class ReferenceHead(HiddenStateHead):
    """`HiddenStateHead` computed the plain way, map by map from the stored parameters: what the fused path is
    tested against and its cost compared with (`experiments/predictors/head_cost.py`)."""

    def predict(self, horizon: int | None = None, top: int | None = None) -> list[Prediction]:
        """The base `predict` from `scores`: what the served one is tested against."""
        return RoutingPredictor.predict(self, horizon, top)

    def _run(self, layer: int, rows: list[list[int]], hidden: object) -> None:
        if hidden is None:
            raise ConfigError("the hidden-state head needs the router input: pass hidden [T, H] (or its sketch) to observe")
        h = hidden.detach().float().cpu().numpy() if isinstance(hidden, torch.Tensor) else np.asarray(hidden, np.float32)
        h = h.reshape(-1, h.shape[-1])
        if h.shape[-1] != self._in_dim:
            raise ConfigError(f"hidden of {h.shape[-1]} dims, the head expects {self._in_dim}")
        if self.projection is not None:
            h = h @ self.projection  # [T, D]
        hot = np.zeros((len(rows), self.num_experts), np.float32)
        for i, row in enumerate(rows):
            hot[i, row] = 1.0
        x = self._raw_features((h - self.mean[layer]) / self.scale[layer], hot)  # [T, F]
        for i, (w, b) in enumerate(self.layers[layer]):
            x = x @ w + b  # [T, out]
            if i + 1 < len(self.layers[layer]):
                np.maximum(x, 0.0, out=x)
        probs = 0.5 * (1.0 + np.tanh(0.5 * x))  # the sigmoid, without overflow
        self.probs = np.stack([union(p) for p in probs.reshape(len(x), self.max_distance, -1).transpose(1, 0, 2)])
