"""Adapters for the transformers v5 MoE families, registered by ``config.model_type``."""

from __future__ import annotations

import torch
from torch import nn

from prophet.models.adapter import Adapter, ExpertFormat, MoELayer, register


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    return inner.layers


class FusedExpertsAdapter(Adapter):
    """Families whose experts are ``gate_up_proj [E,2I,H]`` and ``down_proj [E,H,I]`` in one module.

    ``block_attr`` is the MoE block's attribute on the decoder layer, ``router_attr`` the router's on the block.
    """

    def __init__(self, family: str, block_attr: str = "mlp", router_attr: str = "gate", shared_attr: str | None = None):
        self.family = family
        self.block_attr = block_attr
        self.router_attr = router_attr
        self.shared_attr = shared_attr

    def activation(self, model: nn.Module) -> str:
        act = getattr(model.config, "hidden_act", "silu")
        return {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)

    def layers(self, model: nn.Module) -> list[MoELayer]:
        out: list[MoELayer] = []
        for li, decoder_layer in enumerate(_decoder_layers(model)):
            block = getattr(decoder_layer, self.block_attr, None)
            experts = getattr(block, "experts", None)
            if experts is None or not hasattr(experts, "gate_up_proj"):
                continue
            e, n1, h = experts.gate_up_proj.shape
            fmt = ExpertFormat(hidden_size=h, intermediate_size=n1 // 2, glu=True, activation=self.activation(model))
            router = getattr(block, self.router_attr)
            out.append(
                MoELayer(
                    layer_index=li,
                    moe_index=len(out),
                    name=f"model.layers.{li}.{self.block_attr}.experts",
                    parent=block,
                    attr="experts",
                    block=block,
                    router=router,
                    experts=experts,
                    num_experts=e,
                    top_k=int(getattr(router, "top_k", getattr(block, "top_k", 0))),
                    fmt=fmt,
                    get_expert=_fused_getter(experts),
                    set_expert=_fused_setter(experts),
                    shared_experts=getattr(block, self.shared_attr, None) if self.shared_attr else None,
                )
            )
        return out


def _fused_getter(experts: nn.Module):
    def get(e: int) -> dict[str, torch.Tensor]:
        return {"w1": experts.gate_up_proj[e], "w2": experts.down_proj[e]}

    return get


def _fused_setter(experts: nn.Module):
    def set_(e: int, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            experts.gate_up_proj[e].copy_(tensors["w1"])
            experts.down_proj[e].copy_(tensors["w2"])

    return set_


register("mixtral", FusedExpertsAdapter("mixtral", block_attr="mlp", router_attr="gate"))
