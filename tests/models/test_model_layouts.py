"""Storage layouts: where each family's gate, up and down weights go in the canonical layout, and refusal of
tensors that do not fit."""

import pytest
import torch

from prophet.errors import ConfigError, UnsupportedModelError
from prophet.models import get_spec, moe_layers
from prophet.models.layouts import fused_access, transposed_interleaved_access


def first_layer(name: str):
    return moe_layers(get_spec(name).tiny_model())[0]


def test_fused_experts_are_read_as_views():
    layer = first_layer("mixtral")
    assert layer.get_expert(2)["w1"].data_ptr() == layer.experts.gate_up_proj[2].data_ptr()


def test_gpt_oss_even_columns_are_gate_and_odd_columns_are_up():
    layer = first_layer("gpt-oss")
    i = layer.fmt.intermediate_size
    t = layer.get_expert(1)
    assert torch.equal(t["w1"][0], layer.experts.gate_up_proj[1][:, 0])
    assert torch.equal(t["w1"][i], layer.experts.gate_up_proj[1][:, 1])
    assert torch.equal(t["b1"][i + 2], layer.experts.gate_up_proj_bias[1][5])
    assert torch.equal(t["w2"], layer.experts.down_proj[1].T)


def test_dbrx_rows_of_expert_e_are_gate_then_up():
    layer = first_layer("dbrx")
    i = layer.fmt.intermediate_size
    t = layer.get_expert(3)
    mlp = layer.experts.mlp
    assert torch.equal(t["w1"][:i], mlp.w1[3 * i : 4 * i]) and torch.equal(t["w1"][i:], mlp.v1[3 * i : 4 * i])
    assert torch.equal(t["w2"], mlp.w2[3 * i : 4 * i].T)


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss", "dbrx", "switch"])
def test_wrong_shapes_and_indices_are_refused(name):
    layer = first_layer(name)
    good = {k: v.clone() for k, v in layer.get_expert(0).items()}
    with pytest.raises(ConfigError, match="do not match the canonical shapes"):
        layer.set_expert(0, {**good, "w2": good["w2"][:, :1]})
    with pytest.raises(ConfigError, match="do not match the canonical shapes"):
        layer.set_expert(0, {"w1": good["w1"]})
    with pytest.raises(ConfigError, match="out of range"):
        layer.get_expert(layer.num_experts)


def test_transposed_storage_is_not_mistaken_for_fused():
    experts = first_layer("gpt-oss").experts  # [E, H, 2I] with H=64, I=32: the fused reading must refuse it
    with pytest.raises(UnsupportedModelError, match="fused_transposed_interleaved"):
        fused_access(experts)
    assert transposed_interleaved_access(experts).num_experts == experts.gate_up_proj.shape[0]
