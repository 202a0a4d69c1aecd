"""The hidden-state sketch's projection, shared by the recorder (which writes sketches) and the predictors that
learn from them (which must apply the same projection to the live router input).

``sketch = hidden [T, H] @ P [H, D]`` with ``P ~ N(0, 1) / sqrt(D)`` drawn on the CPU by a private
``torch.Generator().manual_seed(seed)``, so the global RNG that sampling uses is never touched.
"""

from __future__ import annotations

import math

import torch

from prophet.errors import TraceError
from prophet.trace.format import SketchInfo


def sketch_projection(hidden_size: int, info: SketchInfo, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[H, D]`` float32 projection of a ``hidden_size``-wide router input, exactly as the recorder draws it."""
    if info.dim <= 0 or hidden_size <= 0:
        raise TraceError(f"sketch of {info.dim} dims of a {hidden_size}-wide hidden state: both must be positive")
    gen = torch.Generator().manual_seed(info.seed)
    return (torch.randn(hidden_size, info.dim, generator=gen) / math.sqrt(info.dim)).to(device)


def sketch_lift(hidden_size: int, info: SketchInfo) -> torch.Tensor:
    """``[D, H]`` pseudo-inverse of the projection: ``sketch @ lift`` is the least-norm hidden state with that
    sketch (the hidden state itself when ``D >= H``)."""
    return torch.linalg.pinv(sketch_projection(hidden_size, info))
