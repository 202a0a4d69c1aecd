"""Adapters: a uniform view of the MoE layers of a transformers v5 model, whatever its family.

The runtime only ever sees `MoELayer` and `ExpertFormat`. Expert weights are exchanged in one canonical
layout, per expert (the Mixtral layout of transformers v5):

    w1 [N1, H]   N1 = 2*I for gated experts (rows [0, I) are the gate, rows [I, 2I) the up projection),
                 N1 = I for plain ones (a single up projection)
    w2 [H, I]    down projection
    b1 [N1], b2 [H]   biases, only when ``ExpertFormat.has_bias``

and the expert computes ``y = w2 @ act(w1 @ x + b1) + b2`` where ``act`` splits gate and up when gated;
`expert_forward` is that computation in plain PyTorch, the reference every kernel and test is held to.
Converting to and from a family's own storage is exact (a permutation of elements, never arithmetic), so
`unwrap` restores bit-identical parameters. ``ExpertFormat.storage`` names the family's own layout (see
`STORAGES`); the runtime never reads the family's tensors except through ``get_expert``/``set_expert``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prophet.errors import UnsupportedModelError
from prophet.formats import ACTIVATIONS, STORAGES, ExpertFormat, expert_forward  # noqa: F401 (re-exported)

# transformers activation names (``config.hidden_act`` and friends) -> ``ExpertFormat.activation``.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def canonical_activation(name: str) -> str:
    """``ExpertFormat.activation`` for a transformers activation name; raises naming the supported ones."""
    if name in ACTIVATIONS:
        return name
    if name not in HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"expert activation {name!r} is not supported; supported: {', '.join(sorted(HF_ACTIVATIONS))} "
            "(pass fmt=ExpertFormat(...) to the adapter if the model's name for one of them differs)"
        )
    return HF_ACTIVATIONS[name]


@dataclass
class MoELayer:
    """One MoE block of a model, as the runtime sees it.

    ``parent``/``attr`` locate the experts module so the runtime can swap it (``setattr(parent, attr, new)``).
    ``get_expert(e)`` returns expert ``e``'s tensors in the canonical layout; ``set_expert(e, tensors)`` writes
    them back into the family's own storage (used by `unwrap`). ``unpack_call`` turns the experts module's
    call arguments into ``(hidden [T,H], top_k_index [T,k] int64, top_k_weights [T,k])`` and ``pack_output``
    shapes the ``[T,H]`` result as the family's block expects it.

    The block's output is the routed experts' weighted sum over ``route(hidden)`` plus, when present,
    ``shared_experts(hidden)`` (scaled by ``sigmoid(shared_gate(hidden))`` where ``shared_gate`` is set, as in
    Qwen-MoE). ``route`` runs the model's own router on hidden states ``[..., H]`` and returns ``(top_k_index
    [T,k], top_k_weights [T,k])`` over the flattened tokens; predictors can apply a later layer's router with it.
    For encoder-decoder models ``layer_index`` counts encoder layers first, then decoder layers, and ``name``
    says which stack.
    """

    layer_index: int  # index of the layer in the model (encoder layers first, for encoder-decoder models)
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
    shared_gate: nn.Module | None = None
    route: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
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
