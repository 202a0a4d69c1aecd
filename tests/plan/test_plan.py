"""The memory planner's arithmetic, its limits, and the fixes it proposes when a plan cannot fit."""

import json
import logging

import pytest
import torch

from prophet.errors import PlanError
from prophet.models import get_spec
from prophet.plan import GiB, Plan, as_dtype, max_context, plan, resolve_gpu, workspace_breakdown

MIXTRAL_EXPERT = 3 * 4096 * 14336 * 2  # gate, up, down of one expert in bf16
# embeddings + lm_head, 32 x (q, o 4096^2 and k, v 4096x1024), norms 4096 x 65, routers 32 x 4096 x 8; bf16
MIXTRAL_NON_EXPERT = 2 * (2 * 32000 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024) + 4096 * 65 + 32 * 4096 * 8)
MIXTRAL_KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16 = 128 KiB


def test_mixtral_hand_checked_sizes_with_no_workspace():
    p = plan("mixtral", 80 * GiB, ctx=131072, workspace_bytes=0)
    assert p.expert_bytes == MIXTRAL_EXPERT == 352_321_536
    assert p.non_expert_bytes == MIXTRAL_NON_EXPERT == 3_211_272_192
    assert p.kv_bytes == 131072 * MIXTRAL_KV_PER_TOKEN == 16 * GiB
    assert p.expert_slots == (80 * GiB - MIXTRAL_NON_EXPERT - 16 * GiB) // MIXTRAL_EXPERT == 185
    assert p.total_experts == 256 and p.free_bytes < MIXTRAL_EXPERT


def test_workspace_formula_for_mixtral_prefill_chunk():
    ws = workspace_breakdown(get_spec("mixtral"), 80 * GiB, ctx=131072, batch=1, weight_dtype=torch.bfloat16)
    # 2048-token chunk x bf16 x (8 x hidden + 3 x top_k x moe_intermediate) + float32 logits and softmax
    assert ws["activations"] == 2048 * 2 * (8 * 4096 + 3 * 2 * 14336) + 32000 * 4 * 2
    assert ws["allocator_slack"] == int(0.03 * 80 * GiB)
    assert ws["cuda_context"] == 1280 << 20


def test_mixtral_128k_on_h100():
    """ANCHORS: ~158 of 256 on an "80 GB" GPU, counted as 80e9 bytes; that gives 157 here (our workspace reserve
    is about one expert larger). The h100-sxm profile holds the 81559 MiB that NVML reports on a real H100: 172."""
    p = plan("mixtral", "h100-sxm", ctx=131072)
    assert p.gpu_bytes == 81559 << 20
    assert p.expert_slots == 172 and p.total_experts == 256 and not p.fits_all_resident
    assert plan("mixtral", 80 * 10**9, ctx=131072).expert_slots == 157


def test_all_experts_fit_when_the_gpu_is_big_enough():
    p = plan("mixtral", "h200", ctx=131072)
    assert p.fits_all_resident and p.expert_slots == p.total_experts == 256 and p.slots_share == 1.0
    assert p.free_bytes > MIXTRAL_EXPERT


def test_fp8_kv_halves_kv_and_doubles_the_context_that_fits():
    bf16 = max_context("mixtral", "h100-sxm")
    fp8 = max_context("mixtral", "h100-sxm", kv_dtype="fp8")
    assert fp8 in (2 * bf16, 2 * bf16 + 1)
    assert plan("mixtral", "h100-sxm", 65536, kv_dtype=torch.float8_e4m3fn).kv_bytes == 4 * GiB


def test_max_context_is_the_last_context_that_plans():
    ctx = max_context("mixtral", "h100-sxm")
    assert plan("mixtral", "h100-sxm", ctx).expert_slots >= 2
    with pytest.raises(PlanError):
        plan("mixtral", "h100-sxm", ctx + 1)


def test_more_context_or_batch_never_gives_more_slots():
    slots = [plan("mixtral", "h100-sxm", c).expert_slots for c in (1024, 8192, 32768, 131072, 262144, 524288)]
    assert slots == sorted(slots, reverse=True) and slots[0] > slots[-1]
    by_batch = [plan("deepseek-v2-lite", "rtx-4090", 32768, batch=b).expert_slots for b in (1, 2, 4, 8)]
    assert by_batch == sorted(by_batch, reverse=True) and by_batch[0] > by_batch[-1]


def test_mla_latent_makes_deepseek_kv_small():
    p = plan("deepseek-v2-lite", "rtx-4090", 131072)
    assert p.kv_bytes == 131072 * 27 * (512 + 64) * 2  # 27 layers x (latent + RoPE key) x bf16
    assert 0 < p.expert_slots < p.total_experts


def test_context_that_cannot_fit_names_every_fix_with_numbers():
    with pytest.raises(PlanError) as err:
        plan("mixtral", "h100-sxm", ctx=3 << 17, batch=2)
    msg = str(err.value)
    best = max_context("mixtral", "h100-sxm", batch=2)
    assert f"ctx <= {best}" in msg and "fp8 KV (kv_dtype='fp8')" in msg and "batch <= 1" in msg
    assert "GiB (e.g. h200)" in msg and "\n" not in msg


def test_fp8_alone_is_offered_when_it_is_enough():
    with pytest.raises(PlanError, match=r"fp8 KV \(kv_dtype='fp8'\)"):
        plan("mixtral", "h100-sxm", ctx=1 << 20)
    assert plan("mixtral", "h100-sxm", ctx=1 << 20, kv_dtype="fp8").expert_slots >= 2


def test_past_trained_context_warns_in_the_plan_without_logging_it(caplog):
    with caplog.at_level(logging.WARNING, logger="prophet.plan"):
        p = plan("mixtral", "h100-sxm", ctx=65536)
    assert p.needs_rope_scaling and "RoPE scaling" in p.warnings[0] and "32768" in p.warnings[0]
    assert caplog.text == ""  # a pure planner: the caller says it once (prophet-bench printed it twice)
    assert plan("mixtral", "h100-sxm", ctx=32768).warnings == ()


def test_plan_prints_a_table_and_round_trips_json():
    p = plan("mixtral", "h100-sxm", ctx=131072)
    text = str(p)
    assert "172 of 256 experts" in text and "KV cache" in text and "16.00 GiB" in text
    data = json.loads(p.to_json())
    assert data["expert_slots"] == 172 and data["total_experts"] == 256 and data["fits_all_resident"] is False
    fields = {k: v for k, v in data.items() if k in Plan.__dataclass_fields__}
    assert Plan(**{**fields, "warnings": tuple(fields["warnings"])}) == p


def test_explicit_workspace_replaces_the_formula():
    p = plan("mixtral", 80 * GiB, 4096, workspace_bytes=5 * GiB)
    assert p.workspace == {"reserved": 5 * GiB} and p.workspace_bytes == 5 * GiB


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gpu": "h900"}, "unknown GPU profile 'h900'; use one of"),
        ({"gpu": 0}, "gpu_bytes=0"),
        ({"ctx": 0}, "ctx=0"),
        ({"kv_dtype": "int3"}, "dtype 'int3' is unknown"),
        ({"workspace_bytes": -1}, "workspace_bytes=-1"),
    ],
)
def test_bad_arguments_raise_plan_error_naming_the_value(kwargs, match):
    args = {"model": "mixtral", "gpu": "h100-sxm", "ctx": 4096, **kwargs}
    with pytest.raises(PlanError, match=match):
        plan(**args)


def test_gpu_resolves_from_bytes_or_profile():
    assert resolve_gpu(24 * GiB) == ("24.0 GiB", 24 * GiB)
    assert resolve_gpu("l4")[1] < resolve_gpu("h100-sxm")[1] < resolve_gpu("h200")[1]
    assert as_dtype("fp8") is torch.float8_e4m3fn and as_dtype(torch.float16) is torch.float16
