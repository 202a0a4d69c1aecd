"""Adapters: a uniform view of the MoE layers of a transformers v5 model, whatever its family.

The runtime only ever sees `MoELayer` and `ExpertFormat`. Expert weights are exchanged in one canonical
layout, per expert (the Mixtral layout of transformers v5):

    w1 [N1, H]   N1 = 2*I for gated experts (rows [0, I) are the gate, rows [I, 2I) the up projection),
                 N1 = I for plain ones (a single up projection)
    w2 [H, I]    down projection
    b1 [N1], b2 [H]   biases, only when ``ExpertFormat.has_bias``

and the expert computes ``y = w2 @ act(w1 @ x + b1) + b2`` where ``act`` splits gate and up when gated.
Converting to and from a family's own storage is exact (a permutation of elements, never arithmetic), so
`unwrap` restores bit-identical parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prophet.errors import ConfigError, UnsupportedModelError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")


@dataclass(frozen=True)
class ExpertFormat:
    """Shape and arithmetic of one expert in the canonical layout."""

    hidden_size: int
    intermediate_size: int
    glu: bool = True
    activation: str = "silu"
    has_bias: bool = False
    swiglu_alpha: float = 1.702  # gpt_oss activation only
    swiglu_limit: float = 7.0  # gpt_oss activation only

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: supported are {', '.join(ACTIVATIONS)}")
        if self.hidden_size <= 0 or self.intermediate_size <= 0:
            raise ConfigError(f"expert sizes must be positive (H={self.hidden_size}, I={self.intermediate_size})")

    @property
    def w1_rows(self) -> int:
        return 2 * self.intermediate_size if self.glu else self.intermediate_size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor shapes of one expert, in slab order."""
        h, i, n1 = self.hidden_size, self.intermediate_size, self.w1_rows
        out: dict[str, tuple[int, ...]] = {"w1": (n1, h), "w2": (h, i)}
        if self.has_bias:
            out["b1"] = (n1,)
            out["b2"] = (h,)
        return out

    @property
    def numel(self) -> int:
        """Elements of one expert (all its tensors)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def params(self) -> int:
        return self.numel

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()


@dataclass
class MoELayer:
    """One MoE block of a model, as the runtime sees it.

    ``parent``/``attr`` locate the experts module so the runtime can swap it (``setattr(parent, attr, new)``).
    ``get_expert(e)`` returns expert ``e``'s tensors in the canonical layout; ``set_expert(e, tensors)`` writes
    them back into the family's own storage (used by `unwrap`). ``unpack_call`` turns the experts module's
    call arguments into ``(hidden [T,H], top_k_index [T,k] int64, top_k_weights [T,k])`` and ``pack_output``
    shapes the ``[T,H]`` result as the family's block expects it.
    """

    layer_index: int  # index of the decoder layer in the model
    moe_index: int  # index among the model's MoE layers, 0-based
    name: str  # dotted module path of the experts module
    parent: nn.Module
    attr: str
    block: nn.Module  # the whole MoE block (router, experts, shared experts)
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    fmt: ExpertFormat
    get_expert: Callable[[int], dict[str, torch.Tensor]]
    set_expert: Callable[[int, dict[str, torch.Tensor]], None]
    shared_experts: nn.Module | None = None
    unpack_call: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    pack_output: Callable[[torch.Tensor, tuple[Any, ...], dict[str, Any]], Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The parameters of the experts module (what offloading moves off the device)."""
        return list(self.experts.parameters())


class Adapter:
    """Finds the MoE layers of one model family. Subclasses implement `layers`."""

    family: str = ""

    def layers(self, model: nn.Module) -> list[MoELayer]:
        raise NotImplementedError


ADAPTERS: dict[str, Adapter] = {}


def register(model_type: str, adapter: Adapter) -> None:
    """Register ``adapter`` for transformers ``config.model_type == model_type``."""
    ADAPTERS[model_type] = adapter


def get_adapter(model: nn.Module, adapter: Adapter | None = None) -> Adapter:
    """The adapter for ``model`` (by ``model.config.model_type``), or ``adapter`` if the caller gives one."""
    if adapter is not None:
        return adapter
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    supported = ", ".join(sorted(ADAPTERS))
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not a supported MoE family. Supported: {supported}. "
        "For a custom-code MoE model, pass adapter=prophet.models.GenericAdapter(...) naming its module paths."
    )


def moe_layers(model: nn.Module, adapter: Adapter | None = None) -> list[MoELayer]:
    """All MoE layers of ``model``, in order; raises `UnsupportedModelError` when there are none."""
    found = get_adapter(model, adapter).layers(model)
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(
            f"model of type {model_type!r} has no MoE layers (a dense configuration?); Prophet offloads experts "
            "only, so there is nothing to wrap"
        )
    return found
