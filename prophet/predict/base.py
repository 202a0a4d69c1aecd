"""The protocol every predictor follows, online (runtime) and offline (replay) alike."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch


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
