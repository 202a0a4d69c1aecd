"""`OffloadedExperts`: the module that replaces a model's experts, with the same call signature.

One call is one step of one MoE layer, run by the runtime (`prophet.runtime`, in the order of `prophet.step`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from prophet.models.adapter import ExpertFormat, MoELayer


class LayerRunner(Protocol):
    """What runs a layer's step (`prophet.runtime.Runtime`); the layer knows nothing else of it."""

    def run_layer(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor: ...


class OffloadedExperts(nn.Module):
    """Drop-in for a transformers v5 experts module; holds no parameters, only a reference to the runtime."""

    def __init__(self, layer: MoELayer, runtime: LayerRunner) -> None:
        super().__init__()
        self.moe_index = layer.moe_index
        self.num_experts = layer.num_experts
        self.fmt: ExpertFormat = layer.fmt
        self._unpack = layer.unpack_call
        self._pack = layer.pack_output
        # Not a submodule: the runtime is shared by every layer and must not appear in state_dict or .to().
        self.__dict__["runtime"] = runtime

    def extra_repr(self) -> str:
        return f"layer={self.moe_index}, experts={self.num_experts}, fmt={self.fmt}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._unpack is not None:
            hidden, top_k_index, top_k_weights = self._unpack(*args, **kwargs)
        else:
            hidden, top_k_index, top_k_weights = _standard_args(*args, **kwargs)
        out = self.runtime.run_layer(self.moe_index, hidden, top_k_index, top_k_weights)
        return self._pack(out, args, kwargs) if self._pack is not None else out


def _standard_args(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hidden_states, top_k_index, top_k_weights

