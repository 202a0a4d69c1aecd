"""`ModelSpec`: formulas equal the transformers models built from it; meta builds allocate nothing; tiny
models keep the family's routing structure and are deterministic."""

import dataclasses

import pytest
import torch

from prophet.errors import ConfigError
from prophet.models import SPECS, get_spec, moe_layers

MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_meta_model_has_the_spec_shape_and_allocates_nothing(spec):
    spec.tiny().meta_model()  # first build of a family imports its modules; keep that out of the measurement
    before = rss_bytes()
    model = spec.meta_model()
    grown = rss_bytes() - before
    assert grown < 64 * MIB, f"meta build grew RSS by {grown / MIB:.0f} MiB"
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert sum(p.numel() for p in model.parameters()) == spec.total_params
    # bf16, except what the model class keeps in fp32 strictly (DeepSeek-V2's router since transformers 5.24)
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if any(k in name for k in keep) else torch.bfloat16), name
    layers = moe_layers(model)
    assert len(layers) == spec.num_moe_layers
    assert {(la.fmt, la.num_experts, la.top_k) for la in layers} == {
        (spec.expert_format, spec.num_experts, spec.top_k)
    }


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_tiny_spec_keeps_the_routing_structure(spec):
    tiny = spec.tiny()
    assert tiny.model_type == spec.model_type
    assert tiny.top_k == spec.top_k < tiny.num_experts <= spec.num_experts
    assert tiny.num_shared_experts == spec.num_shared_experts
    assert (tiny.first_dense_layers, tiny.moe_layer_period, tiny.moe_layer_offset) == (
        spec.first_dense_layers,
        spec.moe_layer_period,
        spec.moe_layer_offset,
    )
    assert tiny.num_moe_layers >= 2 and tiny.hidden_size <= 64 and tiny.vocab_size <= 128
    assert bool(tiny.sliding_layer_indices) == bool(spec.sliding_layer_indices)
    assert bool(tiny.num_mamba_layers) == bool(spec.num_mamba_layers)
    assert tiny.attention_layer_indices, "every tiny model keeps at least one attention layer"
    fmt, tiny_fmt = spec.expert_format, tiny.expert_format
    assert (
        dataclasses.replace(tiny_fmt, hidden_size=fmt.hidden_size, intermediate_size=fmt.intermediate_size)
        == fmt
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_tiny_model_matches_its_spec_and_is_random(spec):
    model = spec.tiny_model(seed=0)
    assert sum(p.numel() for p in model.parameters()) == spec.tiny().total_params
    assert not model.training
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        if p.numel() > 1:
            assert p.std() > 0, f"{name} is constant"


def test_tiny_model_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    spec = get_spec("deepseek-v3")
    state = torch.random.get_rng_state()
    a, b, c = spec.tiny_model(seed=3), spec.tiny_model(seed=3), spec.tiny_model(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.3.mlp.experts.gate_up_proj"], sc["model.layers.3.mlp.experts.gate_up_proj"]
    )
    # transformers leaves the correction bias at zero; the tiny model exercises a real, non-zero one
    assert sa["model.layers.3.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_tiny_model_dtype():
    model = get_spec("olmoe").tiny_model(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"top_k": 8}, "top_k=8 must be below num_experts=8"),
        ({"attention": "linear"}, "attention='linear'"),
        ({"moe_layer_offset": 2, "moe_layer_period": 2}, "moe_layer_offset must lie in"),
        ({"first_dense_layers": 32}, "no layer is MoE"),
        ({"num_shared_experts": 1}, "needs shared_intermediate_size"),
        ({"attn_layer_period": 2}, "mamba"),
        ({"hidden_size": 0}, "hidden_size=0"),
    ],
)
def test_inconsistent_spec_is_refused(change, words):
    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(get_spec("mixtral"), **change)


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("mixtral", {"first_dense_layers": 1}, "dense layers"),
        ("qwen-moe", {"moe_layer_period": 2}, "offset other than period - 1"),
        ("deepseek-v2-lite", {"shared_intermediate_size": 100}, "shared width"),
        ("jamba", {"intermediate_size": 100}, "different width"),
    ],
)
def test_structure_a_family_cannot_express_is_refused(name, change, words):
    spec = dataclasses.replace(get_spec(name), **change)
    with pytest.raises(ConfigError, match=words):
        spec.hf_config()


def test_hf_config_carries_published_values():
    cfg = get_spec("deepseek-v2-lite").hf_config()
    assert (
        cfg.first_k_dense_replace,
        cfg.n_routed_experts,
        cfg.n_shared_experts,
        cfg.num_experts_per_tok,
    ) == (1, 64, 2, 6)
    assert cfg.q_lora_rank is None and cfg.kv_lora_rank == 512
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 40.0
    dbrx = get_spec("dbrx").hf_config()
    assert (dbrx.ffn_config.moe_top_k, dbrx.ffn_config.moe_jitter_eps, dbrx.attn_config.clip_qkv) == (
        4,
        0.01,
        8.0,
    )
    oss = get_spec("gpt-oss-120b").hf_config()
    assert oss.layer_types[:2] == ["sliding_attention", "full_attention"] and oss.sliding_window == 128
