"""The planner and the simulator's cost model count the bytes of the chosen expert format (scales included)."""

import pytest
import torch
from test_wrap_plan import gpu_for_slots

import prophet
from prophet.errors import ConfigError
from prophet.formats import expert_nbytes, weight_format
from prophet.models.registry import get_spec
from prophet.plan import plan
from prophet.sim import CostModel, get_profile
from prophet.wrap import runtime_of


def test_int4_plan_holds_about_four_times_the_bf16_slots():
    spec = get_spec("mixtral-8x7b")
    bf16 = plan(spec, "rtx-4090", 32 << 10)
    int4 = plan(spec, "rtx-4090", 32 << 10, expert_dtype="int4")
    assert int4.expert_bytes == expert_nbytes(spec.expert_format, weight_format("int4"))
    assert int4.expert_slots >= 3.5 * bf16.expert_slots
    assert int4.expert_dtype == "int4" and "int4 experts" in int4.table()


@pytest.mark.parametrize("name, bits", [("int3", 3 + 16 / 128), ("int2", 2 + 16 / 128), ("fp8", 8.0), ("mxfp4", 4.25),
                                        ("2.6bit", 2.6)])
def test_any_bit_width_is_modelled_in_the_cost_model(name, bits):
    spec = get_spec("mixtral-8x7b")
    cost = CostModel(spec, get_profile("rtx-4090"), expert_dtype=name)
    assert cost.expert_bytes * 8 / spec.expert_params == pytest.approx(bits, rel=1e-3)
    bf16 = CostModel(spec, get_profile("rtx-4090"))
    assert cost.copy_seconds() < bf16.copy_seconds()


def test_unknown_expert_format_is_refused():
    with pytest.raises(ConfigError, match="unknown"):
        plan(get_spec("mixtral-8x7b"), "rtx-4090", 4096, expert_dtype="q4_k")


def test_planned_wrap_sizes_slots_by_the_quantized_bytes():
    spec = get_spec("mixtral")
    gpu = gpu_for_slots(spec, 256, 1, 4.5)  # four fp32 tiny experts fit
    dense = runtime_of(prophet.wrap(spec.tiny_model(), device="cpu", max_context=256, gpu=gpu))
    int4 = runtime_of(prophet.wrap(spec.tiny_model(), device="cpu", max_context=256, gpu=gpu, expert_dtype="int4"))
    assert dense.plan.expert_slots == 4
    assert int4.plan.expert_bytes == int4.store.slab_bytes < dense.plan.expert_bytes / 6  # fp32 -> int4 + scales
    assert int4.plan.expert_slots >= min(6 * 4, dense.plan.total_experts) and int4.cache.num_slots == int4.plan.expert_slots
    assert dense.store.compute_dtype == int4.store.compute_dtype == torch.float32
