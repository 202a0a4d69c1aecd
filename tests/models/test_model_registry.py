"""The registry holds the published configurations: sizes match the model cards and ANCHORS.md."""

import pytest
import torch

from prophet.errors import UnsupportedModelError
from prophet.models import SPECS, get_spec
from prophet.models.registry import spec_names

KIB, MB, GB = 1024, 1e6, 1e9


def test_mixtral_8x7b_matches_its_published_config():
    spec = get_spec("mixtral")
    assert spec.name == "Mixtral-8x7B"
    assert spec.hf_repo == "mistralai/Mixtral-8x7B-v0.1"
    assert spec.expert_params == 176_160_768
    assert spec.kv_bytes_per_token(torch.bfloat16) == 131_072
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (32, 8, 2)
    assert spec.context_length == 32768
    assert round(spec.active_params / GB, 1) == 12.9  # "12.9B active parameters"


def test_deepseek_v2_lite_has_one_dense_layer_then_26_moe_layers():
    spec = get_spec("deepseek-v2-lite")
    assert spec.num_dense_layers == 1
    assert spec.moe_layer_indices == tuple(range(1, 27))
    assert (spec.num_experts, spec.num_shared_experts, spec.top_k) == (64, 2, 6)
    # MLA caches the 512-wide latent plus the 64-wide RoPE key per layer, not per-head K and V
    assert spec.kv_bytes_per_token(torch.bfloat16) == (512 + 64) * 27 * 2


@pytest.mark.parametrize(
    "name, expert_mb, all_experts_gb, kv_kib, experts_topk_layers",
    [
        ("Mixtral-8x7B", 352, 90, 128, (8, 2, 32)),
        ("Mixtral-8x22B", 604, 271, 224, (8, 2, 56)),
        ("DeepSeek-V2-Lite", 17.3, 28.8, 30.4, (64, 6, 26)),
        ("Qwen1.5-MoE-A2.7B", 17.3, 24.9, 192, (60, 4, 24)),
        ("OLMoE-1B-7B", 12.6, 12.9, 128, (64, 8, 16)),
    ],
)
def test_anchors_table(name, expert_mb, all_experts_gb, kv_kib, experts_topk_layers):
    # ANCHORS.md rounds to the digits written there; round ours the same way.
    spec = get_spec(name)
    digits = lambda v: len(str(v).partition(".")[2])  # noqa: E731
    assert round(spec.expert_bytes(torch.bfloat16) / MB, digits(expert_mb)) == expert_mb
    assert round(spec.all_expert_bytes(torch.bfloat16) / GB, digits(all_experts_gb)) == all_experts_gb
    assert round(spec.kv_bytes_per_token(torch.bfloat16) / KIB, digits(kv_kib)) == kv_kib
    assert (spec.num_experts, spec.top_k, spec.num_moe_layers) == experts_topk_layers


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_total_parameters_match_the_published_total(spec):
    # 2% catches a structural mistake (a missing shared expert, a wrong layer pattern) in spec or formula;
    # the exact count is checked against the transformers model in test_model_spec.py.
    assert spec.total_params == pytest.approx(spec.published_params, rel=0.02)
    assert spec.total_params == spec.all_expert_params + spec.non_expert_params
    assert spec.expert_bytes(torch.float32) == 2 * spec.expert_bytes(torch.bfloat16)


def test_sizes_of_the_other_families():
    v3 = get_spec("deepseek-v3")
    assert (v3.num_dense_layers, v3.num_moe_layers, v3.num_shared_experts, v3.top_k) == (3, 58, 1, 8)
    assert v3.expert_params == 3 * 7168 * 2048
    switch = get_spec("switch")
    assert (switch.num_moe_layers, switch.num_experts, switch.top_k) == (12, 128, 1)  # 6 encoder + 6 decoder
    assert switch.expert_format.glu is False and switch.expert_format.activation == "relu"
    jamba = get_spec("jamba")
    assert (jamba.num_moe_layers, len(jamba.attention_layer_indices), jamba.num_mamba_layers) == (16, 4, 28)
    assert jamba.kv_bytes_per_token(torch.bfloat16) == 4 * 2 * 8 * 128 * 2
    qwen3 = get_spec("Qwen/Qwen3-30B-A3B")
    assert (qwen3.num_experts, qwen3.top_k, qwen3.num_moe_layers) == (128, 8, 48)


def test_gpt_oss_expert_format_and_sliding_kv():
    spec = get_spec("gpt-oss-20b")
    fmt = spec.expert_format
    assert (fmt.activation, fmt.glu, fmt.has_bias, fmt.storage) == (
        "gpt_oss",
        True,
        True,
        "fused_transposed_interleaved",
    )
    assert (fmt.swiglu_alpha, fmt.swiglu_limit) == (1.702, 7.0)
    assert spec.expert_params == 2 * 2880 * 2880 + 2880 * 2880 + 2 * 2880 + 2880
    assert spec.sliding_layer_indices == tuple(range(0, 24, 2))
    per_layer = 2 * 8 * 64 * 2
    assert spec.kv_bytes_per_token(torch.bfloat16) == 12 * per_layer
    # the 12 sliding layers stop growing at the 128-token window
    assert spec.kv_bytes(100_000) - spec.kv_bytes(50_000) == 50_000 * 12 * per_layer
    assert spec.kv_bytes(1000) == 1000 * 12 * per_layer + 12 * 128 * per_layer


def test_jamba_state_is_counted_once_per_sequence():
    spec = get_spec("jamba")
    state = 28 * 2 * 4096 * (4 + 16) * 2  # 28 Mamba layers: conv (d_conv) and SSM (d_state) state, bf16
    assert spec.kv_bytes(10, batch=3) == 3 * (10 * spec.kv_bytes_per_token() + state)


@pytest.mark.parametrize(
    "alias, name",
    [
        ("mixtral", "Mixtral-8x7B"),
        ("MIXTRAL-8x22B", "Mixtral-8x22B"),
        ("deepseek_v2_lite", "DeepSeek-V2-Lite"),
        ("qwen-moe", "Qwen1.5-MoE-A2.7B"),
        ("olmoe", "OLMoE-1B-7B"),
        ("gpt-oss-20b", "gpt-oss-20b"),
        ("gpt-oss", "gpt-oss-20b"),
        ("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B"),
    ],
)
def test_aliases_and_repo_ids(alias, name):
    assert get_spec(alias).name == name


def test_every_name_points_at_one_spec():
    seen: dict[str, str] = {}
    for spec in SPECS:
        for n in spec_names(spec):
            key = n.lower().replace("_", "-")
            assert seen.setdefault(key, spec.name) == spec.name, (
                f"{n!r} names both {seen[key]} and {spec.name}"
            )


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnsupportedModelError, match="unknown model 'llama-3'.*Mixtral-8x7B.*gpt-oss-120b"):
        get_spec("llama-3")
