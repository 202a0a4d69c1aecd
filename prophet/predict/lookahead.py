"""Router look-ahead on recorded traces: the live model's routers applied to hidden-state sketches.

`RouterLookahead` scores layer l+d's experts with router l+d on layer l's router input. Online it gets that
input from the runtime; a trace keeps only a sketch ``s = h @ P`` (`prophet.trace.sketch`). `SketchRouter`
lifts the sketch back (``s @ pinv(P)``, exact when the sketch is as wide as the hidden state, a least-norm
approximation otherwise) before the router, so the same predictor class replays traces and runs live.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prophet.trace.format import SketchInfo
from prophet.trace.sketch import sketch_lift


class SketchRouter(nn.Module):
    """``router`` fed from a sketch ``[T, D]`` instead of the hidden state ``[T, H]``."""

    def __init__(self, router: nn.Module, lift: torch.Tensor) -> None:
        super().__init__()
        self.router = router
        param = next(router.parameters(), None)
        self.register_buffer("lift", lift if param is None else lift.to(param.device, param.dtype))  # [D, H]

    def forward(self, sketch: torch.Tensor) -> object:
        return self.router(sketch.to(self.lift.dtype) @ self.lift)


def sketch_routers(routers: Sequence[nn.Module], hidden_size: int, info: SketchInfo) -> list[SketchRouter]:
    """One `SketchRouter` per router, sharing the lift of the recorder's projection ``info``; give them to
    `RouterLookahead` to replay a trace whose ``hidden`` holds the sketches."""
    lift = sketch_lift(hidden_size, info)
    return [SketchRouter(r, lift) for r in routers]
