"""`prophet.wrap(model, expert_dtype=...)`: experts quantized at wrap, stored, cached and computed in their format.

The wrapped model must equal the same model with every expert replaced by its dequantized weights (the
format's reference), at any cache size, so the slots, copies and id->slot remaps carry the scales correctly.
"""

import copy

import pytest
import torch
from test_wrap import rel_diff, tiny_mixtral

import prophet
from prophet.errors import ConfigError
from prophet.formats import dequantize_expert, quantize_expert, slab_layout, weight_format
from prophet.models import moe_layers
from prophet.wrap import is_wrapped, runtime_of

FORMATS = ["int8", "int4", "fp8", "fp8-channel", "mxfp4"]
# Max logit error of the quantized model vs the original (random tiny weights, relative to the largest logit)
LOGIT_ERROR = {"int8": 0.02, "int4": 0.2, "fp8": 0.08, "fp8-channel": 0.08, "mxfp4": 0.25}


def dequantized_copy(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model`` with every expert replaced by quantize -> dequantize in format ``name``."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(ref):
            layout = slab_layout(layer.fmt, weight_format(name), torch.float32)
            for e in range(layer.num_experts):
                fields = quantize_expert(layout, layer.get_expert(e))
                layer.set_expert(e, dequantize_expert(layout, fields))
    return ref


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("cache", [{}, {"slots_per_layer": 1}, {"cache_slots": 3}], ids=["all", "one_per_layer", "shared3"])
def test_quantized_wrap_equals_the_dequantized_model(name, cache):
    model = tiny_mixtral()
    ids = torch.randint(0, 96, (3, 9))
    with torch.no_grad():
        original = model(ids).logits
        expected = dequantized_copy(model, name)(ids).logits
        prophet.wrap(model, device="cpu", expert_dtype=name, **cache)
        out = model(ids).logits
    assert rel_diff(out, expected) <= 1e-5
    assert rel_diff(out, original) <= LOGIT_ERROR[name]


def test_slots_and_copies_hold_the_format_bytes():
    model = prophet.wrap(tiny_mixtral(), device="cpu", expert_dtype="int4", slots_per_layer=2)
    runtime = runtime_of(model)
    layout = runtime.store.layout
    assert runtime.store.slab_bytes == layout.nbytes
    assert runtime.cache.nbytes == runtime.cache.num_slots * layout.nbytes
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 6)))
    total = prophet.stats(model).total
    assert total.bytes_h2d == total.misses * layout.nbytes
    assert runtime.store.nbytes < 0.3 * layout.expert.nbytes(torch.float32) * 2 * 4  # < 30% of fp32 experts


def test_gpt_oss_experts_quantized_to_mxfp4():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"] * 2)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = dequantized_copy(model, "mxfp4")(ids).logits
        prophet.wrap(model, device="cpu", expert_dtype="mxfp4", slots_per_layer=2)
        out = model(ids).logits
    assert rel_diff(out, expected) <= 1e-5


def test_unwrap_restores_the_dequantized_weights():
    model = tiny_mixtral()
    expected = dequantized_copy(model, "int8")
    prophet.unwrap(prophet.wrap(model, device="cpu", expert_dtype="int8"))
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("expert_dtype, words", [
    ("int3", "modelling-only"),
    ("nf4", "unknown"),
    ("bf16", "differs from the model"),
])
def test_bad_expert_dtype_is_refused_and_the_model_left_as_it_was(expert_dtype, words):
    model = tiny_mixtral()
    ids = torch.randint(0, 96, (1, 4))
    with torch.no_grad():
        ref = model(ids).logits
        with pytest.raises(ConfigError, match=words):
            prophet.wrap(model, device="cpu", expert_dtype=expert_dtype)
        assert torch.equal(model(ids).logits, ref)
    assert not is_wrapped(model)

