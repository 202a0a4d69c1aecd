"""`prophet.wrap(model, max_context=..., batch=...)` sizes the expert cache from the plan and exposes the KV cache."""

import logging
import math

import pytest
import torch
from transformers import DynamicCache

import prophet
from prophet.compat import cache_keyword
from prophet.errors import ConfigError
from prophet.models import get_spec, list_specs, moe_layers
from prophet.plan import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, workspace_breakdown
from prophet.wrap import model_sizes, runtime_of


def gpu_for_slots(spec, ctx: int, batch: int, slots: float) -> int:
    """Device bytes that leave ``slots`` expert slots, from the spec's formulas alone (fp32 tiny model)."""
    tiny, dt = spec.tiny(), torch.float32
    act = workspace_breakdown(tiny, 0, ctx, batch, dt)["activations"]
    fixed = tiny.non_expert_bytes(dt) + tiny.kv_bytes(ctx, dt, batch) + CUDA_CONTEXT_BYTES + act
    return math.ceil((fixed + slots * tiny.expert_bytes(dt)) / (1 - ALLOCATOR_SLACK))


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss-20b", "qwen3-30b"])
def test_live_model_sizes_agree_with_the_spec(name):
    """Two independent counts: the live model's parameters and StaticCache layers vs the spec's formulas."""
    spec = get_spec(name)
    model = spec.tiny_model()
    sizes = model_sizes(model, moe_layers(model), torch.float32)
    tiny = spec.tiny()
    assert sizes.non_expert_bytes == tiny.non_expert_bytes(torch.float32)
    assert sizes.expert_bytes == tiny.expert_bytes(torch.float32)
    assert sizes.num_moe_layers * sizes.num_experts == tiny.num_moe_layers * tiny.num_experts
    for ctx, batch in ((1, 1), (100, 3), (4096, 2)):
        assert sizes.kv_bytes(ctx, torch.bfloat16, batch) == tiny.kv_bytes(ctx, torch.bfloat16, batch)


def test_planned_slots_run_the_model_exactly():
    spec = get_spec("mixtral")
    ref = spec.tiny_model(seed=1)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = ref(ids).logits
    model = prophet.wrap(spec.tiny_model(seed=1), device="cpu", max_context=256, batch=2,
                         gpu=gpu_for_slots(spec, 256, 2, 5.5))
    runtime = runtime_of(model)
    assert runtime.plan.expert_slots == runtime.cache.num_slots == 5 < runtime.plan.total_experts
    assert isinstance(runtime.kv_cache, DynamicCache)
    with torch.no_grad():
        out = model(ids, **{cache_keyword(model): runtime.kv_cache}, use_cache=True).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert runtime.kv_cache.get_seq_length() == 7


def test_longer_context_leaves_fewer_slots_on_the_same_gpu():
    spec = get_spec("mixtral")
    gpu = gpu_for_slots(spec, 256, 1, 12.5)
    slots = []
    for ctx in (256, 288, 320):
        model = prophet.wrap(spec.tiny_model(), device="cpu", max_context=ctx, gpu=gpu)
        slots.append(runtime_of(model).cache.num_slots)
    assert slots[0] == 12 and slots == sorted(slots, reverse=True) and slots[-1] < slots[0]


def test_context_past_training_warns(caplog):
    spec = get_spec("mixtral")
    ctx = spec.context_length * 2
    with caplog.at_level(logging.WARNING, logger="prophet.wrap"):
        model = prophet.wrap(spec.tiny_model(), device="cpu", max_context=ctx, gpu="h100-sxm")
    assert runtime_of(model).plan.needs_rope_scaling and "RoPE scaling" in caplog.text


def test_without_max_context_there_is_no_plan():
    model = prophet.wrap(get_spec("mixtral").tiny_model(), device="cpu", slots_per_layer=2)
    assert runtime_of(model).plan is None and runtime_of(model).kv_cache is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_context": 256}, "needs gpu="),
        ({"max_context": 256, "gpu": "h100-sxm", "cache_slots": 4}, "max_context sizes the cache itself"),
    ],
)
def test_max_context_misuse_says_what_to_change(kwargs, match):
    model = get_spec("mixtral").tiny_model()
    with pytest.raises(ConfigError, match=match):
        prophet.wrap(model, device="cpu", **kwargs)
    assert not hasattr(model, "_prophet_runtime")


@pytest.mark.parametrize("name", [s.name for s in list_specs() if not s.is_encoder_decoder])
def test_static_kv_cache_decodes_like_a_dynamic_one_for_every_family(name):
    """The GPU path preallocates a StaticCache; its layout must fit every family's attention (MLA included)."""
    from prophet.wrap import allocate_kv_cache

    model = get_spec(name).tiny_model()
    prompt, step = torch.randint(3, 100, (2, 4)), torch.randint(3, 100, (2, 1))
    outs = []
    for static in (False, True):
        kv = allocate_kv_cache(model, torch.device("cpu"), 16, 2, torch.float32, static=static)
        with torch.inference_mode():
            model(prompt, **{cache_keyword(model): kv}, use_cache=True)
            outs.append(model(step, **{cache_keyword(model): kv}, use_cache=True).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
