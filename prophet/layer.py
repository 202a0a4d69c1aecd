"""`OffloadedExperts`: the module that replaces a model's experts, with the same call signature.

One call is one step of one MoE layer: dedup the batch's experts, acquire their slots (loading misses), remap
expert ids to slot ids on the device, run the grouped expert kernel over the slot pool, release the slots, then
let the predictor and prefetcher look ahead. A step that needs more distinct experts than the pool holds runs
in waves (load, compute, release, repeat), still exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prophet.models.adapter import ExpertFormat, MoELayer

if TYPE_CHECKING:
    from prophet.runtime import Runtime

# Batches with at most this many (token, k) pairs are deduplicated in Python after one small copy of the ids:
# cheaper than torch.unique's kernel launches at decode sizes.
_SMALL_DEDUP = 256


class OffloadedExperts(nn.Module):
    """Drop-in for a transformers v5 experts module; holds no parameters, only a reference to the runtime."""

    def __init__(self, layer: MoELayer, runtime: Runtime) -> None:
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


def unique_experts(top_k_index: torch.Tensor, num_experts: int) -> tuple[list[int], bool]:
    """Sorted distinct expert ids of a step, and whether any id lies outside ``[0, num_experts)``.

    Out-of-range ids are what some routers emit for "no expert" (transformers treats id ``E`` so); they are
    left out and their pairs contribute nothing.
    """
    if top_k_index.numel() <= _SMALL_DEDUP:
        ids = set(top_k_index.flatten().tolist())
    else:
        ids = set(torch.unique(top_k_index).tolist())
    valid = sorted(e for e in ids if 0 <= e < num_experts)
    return valid, len(valid) != len(ids)
