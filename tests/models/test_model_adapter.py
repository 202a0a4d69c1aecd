"""Adapter interface: `ExpertFormat`, `expert_forward`, the adapter table's errors, and `GenericAdapter` on
Mixtral's paths and on hand-made custom-code MoE models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM
from transformers.activations import ACT2FN

from prophet.errors import ConfigError, UnsupportedModelError
from prophet.models import ExpertFormat, GenericAdapter, expert_forward, get_adapter, get_spec, moe_layers
from prophet.models.adapter import HF_ACTIVATIONS, canonical_activation

H, INTER, E = 16, 12, 6


class GrokExpert(nn.Module):
    """Grok-1's expert naming: ``linear_1(act(linear(x)) * linear_v(x))``."""

    def __init__(self, act: str = "gelu") -> None:
        super().__init__()
        self.linear, self.linear_v, self.linear_1 = (
            nn.Linear(H, INTER, bias=False),
            nn.Linear(H, INTER, bias=False),
            nn.Linear(INTER, H, bias=False),
        )
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(self.act(self.linear(x)) * self.linear_v(x))


class PlainExpert(nn.Module):
    """A non-gated expert with biases and its own projection names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(H, INTER), nn.Linear(INTER, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.relu(self.fc_in(x)))


class CustomMoE(nn.Module):
    """Custom-code style: the block routes and indexes ``experts[e](x)`` itself."""

    def __init__(self, expert: type[nn.Module], top_k: int) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(expert() for _ in range(E))
        self.shared = GrokExpert()
        self.top_k = top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        return index, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index, weights = self.route(x)
        out = self.shared(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                out[t] += weights[t, j] * self.experts[int(index[t, j])](x[t])
        return out


class CustomLayer(nn.Module):
    def __init__(self, moe: nn.Module | None) -> None:
        super().__init__()
        self.attn = nn.Linear(H, H)
        if moe is not None:
            self.block_moe = moe
        else:
            self.mlp = nn.Linear(H, H)


class CustomModel(nn.Module):
    """Layers 1 and 3 are MoE, 0 and 2 dense, under ``transformer.h`` like many custom-code models."""

    def __init__(self, expert: type[nn.Module] = GrokExpert, **config) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="grok-1", **config)
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(
            CustomLayer(CustomMoE(expert, 2) if i % 2 else None) for i in range(4)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)


def custom_adapter(**kw) -> GenericAdapter:
    return GenericAdapter(
        "transformer.h",
        "block_moe.experts",
        "block_moe.router",
        shared_attr="block_moe.shared",
        route=lambda block, router, hidden: block.route(hidden),
        **kw,
    )


def canonical_experts(layer, x, index, weights):
    out = torch.zeros_like(x)
    for e in index.unique().tolist():
        rows, slot = (index == e).nonzero(as_tuple=True)
        out.index_add_(
            0, rows, expert_forward(layer.fmt, layer.get_expert(e), x[rows]) * weights[rows, slot, None]
        )
    return out


# -- ExpertFormat and expert_forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("hf_name", sorted(HF_ACTIVATIONS))
def test_expert_forward_matches_transformers_activations(hf_name):
    # Each transformers activation name maps to the canonical activation that computes the same function.
    expert = GrokExpert(act=hf_name)
    with torch.no_grad():
        for p in expert.parameters():
            p.normal_(0, 0.5)
    fmt = ExpertFormat(hidden_size=H, intermediate_size=INTER, activation=canonical_activation(hf_name))
    w1 = torch.cat([expert.linear.weight, expert.linear_v.weight])
    x = torch.randn(7, H)
    torch.testing.assert_close(expert_forward(fmt, {"w1": w1, "w2": expert.linear_1.weight}, x), expert(x))


def test_gpt_oss_activation_clamps_and_adds_one_to_up():
    fmt = ExpertFormat(
        hidden_size=1, intermediate_size=1, activation="gpt_oss", swiglu_alpha=2.0, swiglu_limit=3.0
    )
    x = torch.tensor([[10.0]])
    w1 = torch.tensor([[1.0], [-1.0]])  # gate = 10 -> clamped to 3; up = -10 -> clamped to -3
    y = expert_forward(fmt, {"w1": w1, "w2": torch.ones(1, 1)}, x)
    assert y.item() == pytest.approx((-3 + 1) * 3 * torch.sigmoid(torch.tensor(6.0)).item())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"activation": "mish"}, "activation='mish'"),
        ({"storage": "packed"}, "storage='packed'"),
        ({"activation": "gpt_oss", "glu": False}, "needs glu=True"),
        ({"intermediate_size": 0}, "must be positive"),
    ],
)
def test_bad_expert_format_is_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ExpertFormat(**{"hidden_size": H, "intermediate_size": INTER, **kwargs})


def test_unknown_activation_name_is_refused():
    assert canonical_activation("gelu_pytorch_tanh") == "gelu_tanh"
    with pytest.raises(UnsupportedModelError, match="'mish'.*pass fmt="):
        canonical_activation("mish")


# -- the adapter table -----------------------------------------------------------------------------------------------


def test_dense_model_is_refused_naming_the_families_and_the_generic_adapter():
    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(
        UnsupportedModelError, match="'mistral'.*deepseek_v3.*mixtral.*switch_transformers.*GenericAdapter"
    ):
        moe_layers(MistralForCausalLM(cfg))


def test_moe_family_configured_without_moe_layers_is_refused():
    import dataclasses

    spec = dataclasses.replace(
        get_spec("qwen3-moe").tiny(), moe_layer_period=4, moe_layer_offset=3, num_layers=4
    )
    cfg = spec.hf_config()
    cfg.mlp_only_layers = [3]  # the only sparse layer made dense: a dense model with an MoE model_type
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        moe_layers(model)


def test_base_model_without_lm_head_is_found_too():
    model = get_spec("mixtral").tiny_model()
    layers = moe_layers(model.model)
    assert [la.name for la in layers] == ["layers.0.mlp.experts", "layers.1.mlp.experts"]


# -- GenericAdapter ----------------------------------------------------------------------------------------------------


def test_generic_adapter_on_mixtral_paths_equals_the_mixtral_adapter():
    model = get_spec("mixtral").tiny_model()
    generic = GenericAdapter("model.layers", "mlp.experts", "mlp.gate", num_experts_key="num_local_experts")
    mine, theirs = moe_layers(model, adapter=generic), moe_layers(model)
    assert get_adapter(model, generic) is generic
    assert [(a.name, a.layer_index, a.num_experts, a.top_k, a.fmt) for a in mine] == [
        (b.name, b.layer_index, b.num_experts, b.top_k, b.fmt) for b in theirs
    ]
    for a, b in zip(mine, theirs, strict=True):
        assert a.router is b.router and a.experts is b.experts and a.route is None
        assert all(torch.equal(a.get_expert(3)[k], b.get_expert(3)[k]) for k in ("w1", "w2"))


def test_generic_adapter_on_a_custom_module_list_model():
    model = CustomModel(num_experts_per_tok=2, hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="'grok-1'.*GenericAdapter"):
        moe_layers(model)
    layers = moe_layers(model, adapter=custom_adapter())
    assert [la.layer_index for la in layers] == [1, 3]
    assert [la.name for la in layers] == [
        "transformer.h.1.block_moe.experts",
        "transformer.h.3.block_moe.experts",
    ]
    fmt = ExpertFormat(hidden_size=H, intermediate_size=INTER, glu=True, activation="gelu", storage="modules")
    assert all((la.fmt, la.num_experts, la.top_k) == (fmt, E, 2) for la in layers)
    x = torch.randn(9, H)
    for la in layers:
        assert la.shared_experts is la.block.shared
        with torch.no_grad():
            for e in range(E):
                torch.testing.assert_close(expert_forward(la.fmt, la.get_expert(e), x), la.experts[e](x))
            index, weights = la.route(x)
            rebuilt = canonical_experts(la, x, index, weights) + la.shared_experts(x)
            torch.testing.assert_close(rebuilt, la.block(x))


def test_generic_adapter_plain_experts_with_bias_and_own_names():
    model = CustomModel(expert=PlainExpert, moe_top_k=2, hidden_act="silu")
    adapter = custom_adapter(expert_names=("fc_in", "fc_out"), activation="relu", top_k_key="moe_top_k")
    layer = moe_layers(model, adapter=adapter)[0]
    assert (layer.fmt.glu, layer.fmt.has_bias, layer.fmt.activation) == (False, True, "relu")
    x = torch.randn(5, H)
    with torch.no_grad():
        torch.testing.assert_close(expert_forward(layer.fmt, layer.get_expert(4), x), layer.experts[4](x))
        b = {k: v.clone() for k, v in layer.get_expert(5).items()}
        layer.set_expert(4, b)
    assert torch.equal(layer.experts[4].fc_in.bias, layer.experts[5].fc_in.bias)
    assert torch.equal(layer.experts[4].fc_out.weight, layer.experts[5].fc_out.weight)


def test_generic_adapter_round_trip_is_bit_exact():
    model = CustomModel(num_experts_per_tok=2, hidden_act="gelu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for la in moe_layers(model, adapter=custom_adapter()):
        for e in range(E):
            la.set_expert(e, {k: v.clone() for k, v in la.get_expert(e).items()})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "adapter, config, error, words",
    [
        (
            GenericAdapter("model.layers", "block_moe.experts"),
            {"num_experts_per_tok": 2, "hidden_act": "gelu"},
            UnsupportedModelError,
            "no layer list at 'model.layers'",
        ),
        (
            custom_adapter(),
            {"hidden_act": "gelu"},
            UnsupportedModelError,
            "no 'num_experts_per_tok'.*pass top_k=",
        ),
        (custom_adapter(top_k=7), {"hidden_act": "gelu"}, UnsupportedModelError, "top_k=7 is outside"),
        (
            custom_adapter(),
            {"num_experts_per_tok": 2},
            UnsupportedModelError,
            "no 'hidden_act'.*pass activation=",
        ),
        (
            custom_adapter(expert_names=("up", "down")),
            {"num_experts_per_tok": 2, "hidden_act": "gelu"},
            UnsupportedModelError,
            "children.*linear_v.*pass expert_names=",
        ),
        (
            custom_adapter(num_experts_key="n_experts"),
            {"num_experts_per_tok": 2, "hidden_act": "gelu", "n_experts": 8},
            UnsupportedModelError,
            "holds 6 experts but config.n_experts is 8",
        ),
        (
            custom_adapter(fmt=ExpertFormat(hidden_size=H, intermediate_size=INTER + 1)),
            {"num_experts_per_tok": 2},
            ConfigError,
            "fmt says H=16, I=13",
        ),
        (
            GenericAdapter("transformer.h", "block_moe.experts", "block_moe.gate"),
            {"num_experts_per_tok": 2, "hidden_act": "gelu"},
            UnsupportedModelError,
            "no router at 'block_moe.gate'",
        ),
    ],
)
def test_generic_adapter_errors_say_what_to_pass(adapter, config, error, words):
    with pytest.raises(error, match=words):
        moe_layers(CustomModel(**config), adapter=adapter)


def test_generic_adapter_refuses_an_unknown_storage():
    with pytest.raises(ConfigError, match="storage='sharded'"):
        GenericAdapter(storage="sharded")


def test_explicit_fmt_overrides_the_activation():
    fmt = ExpertFormat(hidden_size=H, intermediate_size=INTER, activation="gelu_tanh", storage="modules")
    layer = moe_layers(CustomModel(num_experts_per_tok=2), adapter=custom_adapter(fmt=fmt))[0]
    assert layer.fmt is fmt
