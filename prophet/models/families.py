"""Adapters for the transformers v5 MoE families, registered by ``config.model_type``, and `GenericAdapter`.

Every family is one `GenericAdapter` configured with where its MoE blocks live (module paths relative to a
decoder layer), how its experts are stored (`prophet.models.layouts`), which config keys hold the expert count
and top-k, and how its router is called. Users point a `GenericAdapter` of their own at custom-code models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from prophet.errors import ConfigError, UnsupportedModelError
from prophet.models.adapter import (
    STORAGES,
    Adapter,
    ExpertFormat,
    MoELayer,
    canonical_activation,
    register,
)
from prophet.models.layouts import (
    ExpertAccess,
    flat_split_access,
    fused_access,
    modules_access,
    transposed_interleaved_access,
)

RouteFn = Callable[[nn.Module, nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_MISSING = object()


def _get_path(root: Any, path: str) -> Any:
    """``root.a.b.3`` for ``path='a.b.3'`` (integers index ModuleLists, negative ones too); _MISSING if absent."""
    obj = root
    for part in path.split("."):
        if part.lstrip("-").isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            idx = int(part)
            if not -len(obj) <= idx < len(obj):
                return _MISSING
            obj = obj[idx]
        else:
            obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _config_value(config: Any, key: str) -> Any:
    """A config value by dotted key (``ffn_config.moe_top_k``); dict-valued sub-configs are followed too."""
    obj = config
    for part in key.split("."):
        obj = obj.get(part, _MISSING) if isinstance(obj, dict) else getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def route_topk_router(
    block: nn.Module, router: nn.Module, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers v5 routers: ``router(hidden [T,H]) -> (logits, top_k_weights, top_k_index)``."""
    _, weights, index = router(hidden.reshape(-1, hidden.shape[-1]))
    return index, weights


class GenericAdapter(Adapter):
    """Finds MoE blocks by module path; one instance per registered family, or built by a user for custom code.

    ``layers_path`` is the dotted path from the model to its ModuleList of layers (several paths for
    encoder-decoder stacks, numbered one after the other); a path that starts with the model's
    ``base_model_prefix`` also works on the base model. ``experts_attr``, ``router_attr``, ``shared_attr`` and
    ``shared_gate_attr`` are dotted paths relative to one layer; layers without ``experts_attr`` are dense and
    skipped. ``storage`` is a key of `prophet.models.adapter.STORAGES` or ``"auto"`` (``fused`` when the
    experts module has ``gate_up_proj``, ``modules`` for a ModuleList/ModuleDict, whose projections are found
    by ``expert_names`` or `prophet.models.layouts.KNOWN_EXPERT_NAMES`). ``top_k`` is given, or read from the
    config at ``top_k_key``; the expert count is read from the weights and checked against ``num_experts_key``.
    The activation is ``activation`` (an `ExpertFormat` or transformers name), else the config's
    ``activation_key``; ``fmt`` overrides the whole format (its sizes must match the weights). ``route`` calls
    the model's router (``route(block, router, hidden) -> (top_k_index, top_k_weights)``); without it the
    layers carry no ``route``. ``unpack_call``/``pack_output`` are set for experts modules that are not called
    as ``experts(hidden [T,H], top_k_index, top_k_weights) -> [T,H]``.

    Models whose block indexes ``experts[i](x)`` itself (most custom-code ModuleList models) expose their
    weights and router through this adapter, but replacing their experts module needs a block-level hook.
    """

    def __init__(
        self,
        layers_path: str | Sequence[str] = "model.layers",
        experts_attr: str = "mlp.experts",
        router_attr: str = "mlp.gate",
        *,
        family: str = "generic",
        shared_attr: str | None = None,
        shared_gate_attr: str | None = None,
        storage: str = "auto",
        expert_names: Sequence[str] | None = None,
        fmt: ExpertFormat | None = None,
        activation: str | None = None,
        activation_key: str = "hidden_act",
        num_experts_key: str | None = None,
        top_k: int | None = None,
        top_k_key: str = "num_experts_per_tok",
        route: RouteFn | None = None,
        unpack_call: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        pack_output: Callable[[torch.Tensor, tuple[Any, ...], dict[str, Any]], Any] | None = None,
    ) -> None:
        storages = ("auto", *STORAGES)
        if storage not in storages:
            raise ConfigError(f"storage={storage!r}: choose one of {', '.join(storages)}")
        self.family = family
        self.layers_paths = (layers_path,) if isinstance(layers_path, str) else tuple(layers_path)
        self.experts_attr = experts_attr
        self.router_attr = router_attr
        self.shared_attr = shared_attr
        self.shared_gate_attr = shared_gate_attr
        self.storage = storage
        self.expert_names = tuple(expert_names) if expert_names is not None else None
        self.fmt = fmt
        self.activation = activation
        self.activation_key = activation_key
        self.num_experts_key = num_experts_key
        self.top_k = top_k
        self.top_k_key = top_k_key
        self.route = route
        self.unpack_call = unpack_call
        self.pack_output = pack_output

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, layers_path={self.layers_paths!r}, experts_attr={self.experts_attr!r})"

    # -- pieces a family may override ---------------------------------------------------------------------------
    def access(self, experts: nn.Module, config: Any) -> ExpertAccess:
        """Canonical readers/writers for one experts module."""
        storage = self.storage
        if storage == "auto":
            storage = "fused" if hasattr(experts, "gate_up_proj") else "modules"
        if storage == "fused":
            return fused_access(experts)
        if storage == "fused_transposed_interleaved":
            return transposed_interleaved_access(experts)
        if storage == "flat_split":
            return flat_split_access(experts, self._config_int(config, self.num_experts_key, "num_experts"))
        return modules_access(experts, self.expert_names)

    def format_options(self, config: Any) -> dict[str, Any]:
        """Activation fields of `ExpertFormat` for this model."""
        name = self.activation
        if name is None:
            name = _config_value(config, self.activation_key)
            if name is _MISSING:
                raise UnsupportedModelError(
                    f"config has no {self.activation_key!r}: pass activation= (one of silu, gelu, gelu_tanh, relu)"
                )
        return {"activation": canonical_activation(name)}

    # -- the walk -----------------------------------------------------------------------------------------------
    def _config_int(self, config: Any, key: str | None, what: str) -> int:
        value = _MISSING if key is None or config is None else _config_value(config, key)
        if value is _MISSING or value is None:
            raise UnsupportedModelError(f"config has no {key!r} for the {what}: pass {what}= to the adapter")
        return int(value)

    def _layers(self, model: nn.Module, path: str) -> nn.ModuleList:
        found = _get_path(model, path)
        prefix = getattr(model, "base_model_prefix", "")
        if found is _MISSING and prefix and path.startswith(prefix + ".") and not hasattr(model, prefix):
            found = _get_path(model, path[len(prefix) + 1 :])
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no layer list at {path!r}: pass layers_path= naming the ModuleList "
                "of its layers"
            )
        return found

    def _format(self, access: ExpertAccess, config: Any, where: str) -> ExpertFormat:
        if self.fmt is not None:
            fmt = self.fmt
            if (fmt.hidden_size, fmt.intermediate_size, fmt.glu, fmt.has_bias) != (
                access.hidden_size,
                access.intermediate_size,
                access.glu,
                access.has_bias,
            ):
                raise ConfigError(
                    f"{where}: fmt says H={fmt.hidden_size}, I={fmt.intermediate_size}, glu={fmt.glu}, "
                    f"bias={fmt.has_bias} but the weights have H={access.hidden_size}, I={access.intermediate_size}, "
                    f"glu={access.glu}, bias={access.has_bias}"
                )
            return fmt
        return ExpertFormat(
            hidden_size=access.hidden_size,
            intermediate_size=access.intermediate_size,
            glu=access.glu,
            has_bias=access.has_bias,
            storage=access.storage,
            **self.format_options(config),
        )

    def layers(self, model: nn.Module) -> list[MoELayer]:
        config = getattr(model, "config", None)
        names = {id(m): n for n, m in model.named_modules()}
        top_k = self.top_k
        out: list[MoELayer] = []
        offset = 0
        for path in self.layers_paths:
            stack = self._layers(model, path)
            for i, layer in enumerate(stack):
                experts = _get_path(layer, self.experts_attr)
                if experts is _MISSING:
                    continue
                where = names.get(id(experts), f"{path}.{i}.{self.experts_attr}")
                router = _get_path(layer, self.router_attr)
                if not isinstance(router, nn.Module):
                    raise UnsupportedModelError(
                        f"{where}: no router at {self.router_attr!r}; pass router_attr="
                    )
                parent_path, _, attr = self.experts_attr.rpartition(".")
                parent = _get_path(layer, parent_path) if parent_path else layer
                access = self.access(experts, config)
                if self.num_experts_key is not None:
                    expected = self._config_int(config, self.num_experts_key, "num_experts")
                    if expected != access.num_experts:
                        raise UnsupportedModelError(
                            f"{where} holds {access.num_experts} experts but config.{self.num_experts_key} is "
                            f"{expected}; a sharded (expert-parallel) model cannot be offloaded per process"
                        )
                if top_k is None:
                    top_k = self._config_int(config, self.top_k_key, "top_k")
                if not 0 < top_k <= access.num_experts:
                    raise UnsupportedModelError(
                        f"{where}: top_k={top_k} is outside [1, {access.num_experts}]"
                    )
                shared = _get_path(layer, self.shared_attr) if self.shared_attr else None
                shared_gate = _get_path(layer, self.shared_gate_attr) if self.shared_gate_attr else None
                out.append(
                    MoELayer(
                        layer_index=offset + i,
                        moe_index=len(out),
                        name=where,
                        parent=parent,
                        attr=attr,
                        block=parent,
                        router=router,
                        experts=experts,
                        num_experts=access.num_experts,
                        top_k=top_k,
                        fmt=self._format(access, config, where),
                        get_expert=access.get,
                        set_expert=access.set,
                        shared_experts=None if shared is _MISSING else shared,
                        shared_gate=None if shared_gate is _MISSING else shared_gate,
                        route=partial(self.route, parent, router) if self.route is not None else None,
                        unpack_call=self.unpack_call,
                        pack_output=self.pack_output,
                        extra={"stack": path, "stack_layer": i},
                    )
                )
            offset += len(stack)
        return out


# -- family specifics -------------------------------------------------------------------------------------------


class GptOssAdapter(GenericAdapter):
    """gpt-oss: clamped SwiGLU ``(clamp(up)+1) * g*sigmoid(alpha*g)`` with alpha/limit from the config.

    transformers before ~5.20 has no ``swiglu_alpha`` in the config and fixes alpha at 1.702 in the module."""

    def format_options(self, config: Any) -> dict[str, Any]:
        return {
            "activation": "gpt_oss",
            "swiglu_alpha": float(getattr(config, "swiglu_alpha", 1.702)),
            "swiglu_limit": float(config.swiglu_limit),
        }


class DbrxAdapter(GenericAdapter):
    """DBRX: activation is ``ffn_config.ffn_act_fn['name']``; routing lives in the block, not the router."""

    def format_options(self, config: Any) -> dict[str, Any]:
        act = _config_value(config, "ffn_config.ffn_act_fn")
        return {"activation": canonical_activation(act.get("name", "silu"))}


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str]) -> list[Any]:
    """The call's arguments in ``names`` order, whether passed by position or keyword."""
    values = list(args) + [kwargs[n] for n in names[len(args) :]]
    return values[: len(names)]


def _dbrx_unpack(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, index, weights = _bind(args, kwargs, ("hidden_states", "top_k_index", "top_k_weights"))
    return hidden.reshape(-1, hidden.shape[-1]), index, weights


def _dbrx_pack(out: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    (hidden,) = _bind(args, kwargs, ("hidden_states",))
    return out.view(hidden.shape[0], -1, hidden.shape[-1])  # what DbrxExperts returns, for 2-D and 3-D inputs


def _dbrx_route(
    block: nn.Module, router: nn.Module, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, index = block.route_tokens_to_experts(router(hidden))
    return index, weights


def _switch_mask_to_topk(mask: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch's one-hot dispatch ``mask [T,1,E]`` (all zeros for a token over capacity) and ``probs [T,1]`` as
    ``(index [T,1], weights [T,1])``. A dropped token gets expert 0 with weight 0: it contributes nothing, as in
    the model, and ids stay inside ``[0, E)`` for every consumer."""
    mask = mask.reshape(-1, mask.shape[-1])
    index = mask.argmax(dim=-1, keepdim=True)
    weights = probs.reshape(-1, 1) * mask.sum(dim=-1, keepdim=True).to(probs.dtype)
    return index, weights


def _switch_unpack(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, mask, probs = _bind(args, kwargs, ("hidden_states", "selected_experts", "routing_weights"))
    index, weights = _switch_mask_to_topk(mask, probs)
    return hidden, index, weights


def _switch_route(
    block: nn.Module, router: nn.Module, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mask, probs, _ = router(hidden)  # unflattened: expert capacity counts per sequence
    return _switch_mask_to_topk(mask, probs)


def _std(family: str, num_experts_key: str, **kw: Any) -> GenericAdapter:
    return GenericAdapter(
        family=family, storage="fused", num_experts_key=num_experts_key, route=route_topk_router, **kw
    )


FAMILY_ADAPTERS: dict[str, GenericAdapter] = {
    "mixtral": _std("mixtral", "num_local_experts"),
    "qwen2_moe": _std(
        "qwen2_moe", "num_experts", shared_attr="mlp.shared_expert", shared_gate_attr="mlp.shared_expert_gate"
    ),
    "qwen3_moe": _std("qwen3_moe", "num_experts"),
    "olmoe": _std("olmoe", "num_experts"),
    "deepseek_v2": _std("deepseek_v2", "n_routed_experts", shared_attr="mlp.shared_experts"),
    "deepseek_v3": _std("deepseek_v3", "n_routed_experts", shared_attr="mlp.shared_experts"),
    "jamba": _std(
        "jamba", "num_experts", experts_attr="feed_forward.experts", router_attr="feed_forward.router"
    ),
    "phimoe": _std("phimoe", "num_local_experts", router_attr="mlp.router"),
    "gpt_oss": GptOssAdapter(
        family="gpt_oss",
        router_attr="mlp.router",
        storage="fused_transposed_interleaved",
        num_experts_key="num_local_experts",
        route=route_topk_router,
    ),
    "dbrx": DbrxAdapter(
        "transformer.blocks",
        "ffn.experts",
        "ffn.router",
        family="dbrx",
        storage="flat_split",
        num_experts_key="ffn_config.moe_num_experts",
        top_k_key="ffn_config.moe_top_k",
        route=_dbrx_route,
        unpack_call=_dbrx_unpack,
        pack_output=_dbrx_pack,
    ),
    "switch_transformers": GenericAdapter(
        ("encoder.block", "decoder.block"),
        "layer.-1.mlp.experts",
        "layer.-1.mlp.router",
        family="switch_transformers",
        storage="modules",
        expert_names=("wi", "wo"),
        activation_key="dense_act_fn",
        num_experts_key="num_experts",
        top_k=1,  # SwitchTransformersTop1Router: top-1 by construction, the config has no top-k
        route=_switch_route,
        unpack_call=_switch_unpack,
    ),
}

for _model_type, _adapter in FAMILY_ADAPTERS.items():
    register(_model_type, _adapter)
