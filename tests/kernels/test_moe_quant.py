"""Quantized experts in the grouped GEMM: the Triton kernels dequantize int8/int4/fp8/mxfp4 slot bytes in
registers and must match the reference, which dequantizes with `prophet.formats.dequantize`.

The named edge cases are those of test_moe_kernels.py (same inputs, then each slot quantized into a byte slab
as the expert cache holds it). fp8 and e2m1 are decoded from their bits inside the kernel, so the
interpreter runs them too; their bf16 runs at larger shapes are GPU-only.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_moe_kernels import CASES, TOLERANCE, Case, make_inputs, poisoned_workspace, relative_error  # noqa: F401

from prophet.errors import KernelError
from prophet.formats import dequantize_expert, quantize_expert, slab_layout, weight_format
from prophet.kernels.moe import Quant, moe_experts_reference, moe_experts_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantized_args(case: Case, dtype: torch.dtype, name: str, group_size: int | None = None,
                   device: torch.device = DEVICE) -> tuple[tuple, tuple]:
    """``(quantized args, dense args with the dequantized weights)`` for `moe_experts`."""
    inputs = make_inputs(case, dtype, torch.device("cpu"))
    fmt = case.fmt
    wf = weight_format(name, group_size)
    layout = slab_layout(fmt, wf, dtype)
    slots = inputs.w1.shape[0]
    pool = torch.zeros(slots, layout.numel + 16 * case.slab_pad, dtype=torch.uint8)  # [S, slab bytes]
    views = layout.views(pool[:, : layout.numel])
    dense = {k: torch.empty(slots, *s) for k, s in fmt.shapes.items()}
    for s in range(slots):
        tensors = {"w1": inputs.w1[s], "w2": inputs.w2[s]} | ({"b1": inputs.b1[s], "b2": inputs.b2[s]} if case.bias else {})
        fields = quantize_expert(layout, tensors)
        for key, value in fields.items():
            views[key][s].copy_(value)
        for key, value in dequantize_expert(layout, fields).items():
            dense[key][s] = value
    views = layout.views(pool.to(device)[:, : layout.numel])
    head = (inputs.hidden.to(device), inputs.slot_ids.to(device), inputs.weights.to(device))
    quant = Quant(wf, views["w1_scale"], views["w2_scale"])
    biased = case.bias
    qargs = (*head, views["w1"], views["w2"], fmt, views.get("b1"), views.get("b2"), quant)
    dargs = (*head, *(dense[k].to(device, dtype) for k in ("w1", "w2")), fmt,
             *((dense["b1"].to(device, dtype), dense["b2"].to(device, dtype)) if biased else (None, None)))
    return qargs, dargs


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("case", CASES)
def test_integer_formats_triton_matches_reference(case: Case, name: str) -> None:
    qargs, _ = quantized_args(case, torch.float32, name, group_size=16)
    out = moe_experts_triton(*qargs, config=case.config)
    assert torch.isfinite(out).all(), "an output element was never written (still NaN)"
    assert relative_error(out, moe_experts_reference(*qargs)) < TOLERANCE[torch.float32]


# fp16 activations, each format's own scale layout (per-row groups, blocks, per-tensor, e8m0 per 32)
FORMAT_CASES = [
    pytest.param("int4", Case(tokens=1), id="int4_one_token"),
    pytest.param("int8", Case(tokens=21, path="prefill"), id="int8_not_multiple_of_block"),
    pytest.param("fp8", Case(hidden=37, inter=19, path="prefill"), id="fp8_block_odd_sizes"),
    pytest.param("fp8-channel", Case(tokens=6, top_k=3, routing="dup"), id="fp8_channel_duplicate_slots"),
    pytest.param("fp8-tensor", Case(inter=40, bias=True, split_k=3), id="fp8_tensor_split_k_bias"),
    pytest.param("mxfp4", Case(hidden=64, inter=32, activation="gpt_oss", bias=True), id="mxfp4_gpt_oss_bias"),
    pytest.param("mxfp4", Case(hidden=37, inter=19, tokens=9, experts=7, top_k=3, path="prefill"), id="mxfp4_odd"),
]


@pytest.mark.parametrize("name, case", FORMAT_CASES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_every_format_triton_matches_reference(name: str, case: Case, dtype: torch.dtype) -> None:
    qargs, _ = quantized_args(case, dtype, name)
    out = moe_experts_triton(*qargs, config=case.config)
    assert torch.isfinite(out).all()
    assert relative_error(out, moe_experts_reference(*qargs)) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "fp8-channel", "fp8-tensor", "mxfp4"])
def test_quantized_reference_equals_dense_reference_on_dequantized_weights(name: str) -> None:
    case = Case(tokens=7, hidden=40, inter=24, bias=True)
    qargs, dargs = quantized_args(case, torch.float32, name, device=torch.device("cpu"))
    assert relative_error(moe_experts_reference(*qargs), moe_experts_reference(*dargs)) < 1e-6


def test_scales_follow_their_slot_when_experts_move():
    # Two slots swapped, values and scales together: the output is unchanged. Swapping only the values (a cache
    # that remaps experts without their scales) changes it.
    case = Case(tokens=4, experts=2, top_k=1)
    qargs, _ = quantized_args(case, torch.float32, "int4", device=torch.device("cpu"))
    hidden, slot_ids, weights, w1, w2, fmt, b1, b2, quant = qargs
    ref = moe_experts_reference(*qargs)
    swap = torch.tensor([1, 0])
    moved = Quant(quant.weights, quant.w1_scale[swap], quant.w2_scale[swap])
    out = moe_experts_reference(hidden, swap[slot_ids], weights, w1[swap], w2[swap], fmt, b1, b2, moved)
    assert torch.allclose(out, ref)
    wrong = moe_experts_reference(hidden, swap[slot_ids], weights, w1[swap], w2[swap], fmt, b1, b2, quant)
    assert not torch.allclose(wrong, ref)


@pytest.mark.parametrize("fn", [moe_experts_reference, moe_experts_triton], ids=["reference", "triton"])
def test_bad_quantized_inputs_raise_kernel_error(fn) -> None:
    qargs, _ = quantized_args(Case(), torch.float32, "int4", group_size=16, device=torch.device("cpu"))
    *head, quant = qargs
    with pytest.raises(KernelError, match="w1_scale is"):
        fn(*head, replace(quant, w1_scale=quant.w1_scale[:, :, :1]))
    with pytest.raises(KernelError, match="w2 is"):
        fn(*head[:4], head[4].view(torch.int8), *head[5:], quant)
    with pytest.raises(KernelError, match="modelling-only|quantized format"):
        fn(*head, replace(quant, weights=weight_format("int3")))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int4", "int8", "fp8", "mxfp4"])
def test_bf16_formats_at_a_larger_shape_on_gpu(name: str) -> None:
    for tokens in (1, 16, 64):
        case = Case(tokens=tokens, experts=8, hidden=1024, inter=704)
        qargs, _ = quantized_args(case, torch.bfloat16, name)
        out = moe_experts_triton(*qargs)
        assert relative_error(out, moe_experts_reference(*qargs)) < TOLERANCE[torch.bfloat16]
