"""Router look-ahead: run the next layers' routers on the current layer's router input.

The residual stream changes little from one layer to the next, so layer l+d's gate applied to layer l's
input already ranks most of the experts l+d will pick (mixtral-offloading; ~85% at d=1 in the literature).
Online only: it needs the hidden state, which traces keep at most as a sketch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prophet.errors import ConfigError
from prophet.predict.base import RoutingPredictor, union


def router_probabilities(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` softmax of ``router``'s logits for ``hidden [T, H]``.

    transformers v5 routers return ``(logits, top_k_weights, top_k_index)``; a plain gate returns logits.
    """
    out = router(hidden)
    logits = out[0] if isinstance(out, tuple) else out
    return torch.softmax(logits.float().reshape(hidden.shape[0], -1), dim=-1)


class RouterLookahead(RoutingPredictor):
    """Scores layer l+d's experts with ``routers[l+d]`` applied to layer l's router input.

    ``routers`` holds one router module per MoE layer, in order (``MoELayer.router`` of each layer). Steps
    in the next token cannot be looked at this way (its hidden state does not exist yet); they come from
    ``fallback`` when given, else from applying their routers to the current input anyway. Probabilities
    are scaled by top-k so that a confident pick scores near 1.
    """

    name = "router"

    def __init__(
        self,
        routers: Sequence[nn.Module],
        num_experts: int,
        top_k: int,
        fallback: RoutingPredictor | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(len(routers), num_experts, top_k, **kw)
        if fallback is not None and (fallback.num_layers, fallback.num_experts) != (len(routers), num_experts):
            raise ConfigError("the router look-ahead's fallback predictor must model the same layers and experts")
        self.routers = list(routers)
        self.fallback = fallback
        self.hidden: torch.Tensor | None = None  # [T, H] router input of the last observed layer

    def fit(self, traces: Sequence[Any]) -> RouterLookahead:
        if self.fallback is not None:
            self.fallback.fit(traces)
        return self

    def reset(self) -> None:
        super().reset()
        self.hidden = None
        if self.fallback is not None:
            self.fallback.reset()

    def _observe(self, layer: int, rows: list[list[int]], weights: object, hidden: object) -> None:
        if hidden is None:
            raise ConfigError("router look-ahead needs the router input: pass hidden [T, H] to observe")
        h = torch.as_tensor(hidden)
        self.hidden = h.reshape(-1, h.shape[-1])
        if self.fallback is not None:
            self.fallback.feed(layer, rows, weights, hidden)

    @torch.no_grad()
    def _scores(self, distances: np.ndarray, shifts: np.ndarray, layers: np.ndarray) -> np.ndarray:
        out = np.empty((len(distances), self.num_experts))
        later = shifts > 0
        if self.fallback is not None and later.any():
            out[later] = self.fallback.scores(distances[later])
            todo = np.flatnonzero(~later)
        else:
            todo = np.arange(len(distances))
        if self.hidden is None:
            out[todo] = self.top_k / self.num_experts
            return out
        for i in todo:
            router = self.routers[layers[i]]
            param = next(router.parameters(), None)
            h = self.hidden if param is None else self.hidden.to(param.device, param.dtype)
            probs = (self.top_k * router_probabilities(router, h)).clamp_(max=1.0).cpu().numpy()  # [T, E]
            out[i] = union(probs)
        return out
