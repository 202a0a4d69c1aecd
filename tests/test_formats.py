"""Expert formats (`prophet.formats`): bytes per expert, quantize/dequantize references, slab layouts."""

from __future__ import annotations

import pytest
import torch

from prophet.errors import ConfigError
from prophet.formats import (
    ExpertFormat,
    dequantize,
    dequantize_expert,
    quantize,
    quantize_expert,
    slab_layout,
    weight_format,
)
from prophet.models.adapter import ExpertFormat as ReExported

MIXTRAL = ExpertFormat(4096, 14336)
QUANTIZED = ["int8", "int4", "fp8", "fp8-channel", "fp8-tensor", "mxfp4"]
# Relative L2 error of quantize -> dequantize on Gaussian weights: what each format's bits allow.
ROUND_TRIP = {"int8": 0.01, "int4": 0.15, "fp8": 0.04, "fp8-channel": 0.04, "fp8-tensor": 0.04, "mxfp4": 0.15}


def test_expert_format_is_still_importable_from_the_adapter_module():
    assert ReExported is ExpertFormat


def test_slots_hold_the_promised_multiple_of_bf16_experts():
    bf16 = MIXTRAL.nbytes(torch.bfloat16)
    ratio = {n: bf16 / slab_layout(MIXTRAL, weight_format(n)).nbytes for n in ("int4", "fp8", "mxfp4", "int8")}
    assert ratio["int4"] >= 3.5 and ratio["mxfp4"] >= 3.5
    assert ratio["fp8"] >= 1.9 and ratio["int8"] >= 1.9


def test_bits_per_parameter_count_the_scales():
    assert weight_format("int4").bits_per_param(4096, 14336) == 4 + 16 / 128
    assert weight_format("int4", group_size=32).bits_per_param(64, 64) == 4 + 16 / 32
    assert weight_format("mxfp4").bits_per_param(64, 64) == 4 + 8 / 32
    assert weight_format("fp8").bits_per_param(256, 256) == 8 + 32 * 4 / 256**2
    assert weight_format("int3").bits_per_param(128, 128) == 3 + 16 / 128  # modelling-only widths count too


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("shape", [(64, 256), (37, 19), (1, 300)], ids=["aligned", "odd", "one_row"])
def test_quantize_round_trip_error_is_within_the_format(name, shape):
    w = torch.randn(shape)
    wf = weight_format(name)
    values, scales = quantize(wf, w)
    assert values.shape == wf.shapes(*shape)[0] and scales.shape == wf.shapes(*shape)[1]
    out = dequantize(wf, values, scales, shape)
    assert ((out - w).norm() / w.norm()).item() < ROUND_TRIP[name]
    requant = quantize(wf, out)  # values on the grid quantize to themselves
    assert torch.equal(dequantize(wf, *requant, shape), out)


def test_int4_packs_the_even_column_in_the_low_nibble():
    wf = weight_format("int4", group_size=0)
    w = torch.tensor([[7.0, -7.0, 1.0]])  # max 7: scale 1, codes value + 8 = 15, 1, 9
    values, scales = quantize(wf, w)
    assert scales.item() == 1.0 and values.tolist() == [[15 | (1 << 4), 9]]
    assert torch.equal(dequantize(wf, values, scales, (1, 3)), w)


def test_mxfp4_matches_the_e2m1_grid_and_e8m0_scales():
    wf = weight_format("mxfp4")
    w = torch.tensor([[0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -6.0] * 4]) * 4  # block max 24 = 6 x 2^2
    values, scales = quantize(wf, w)
    assert scales.tolist() == [[127 + 2]]
    assert values[0, 0].item() == 1 | (2 << 4)  # 0.5 -> code 1 (low), 1.0 -> code 2 (high)
    assert torch.equal(dequantize(wf, values, scales, (1, 32)), w)


def test_fp8_block_scales_follow_the_checkpoint_layout():
    wf = weight_format("fp8")
    values, scales = quantize(wf, torch.randn(300, 130))
    assert values.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 and scales.shape == (3, 2)


def test_zero_blocks_quantize_to_zero():
    for name in QUANTIZED:
        wf = weight_format(name)
        assert torch.equal(dequantize(wf, *quantize(wf, torch.zeros(4, 64)), (4, 64)), torch.zeros(4, 64))


@pytest.mark.parametrize("name", ["bf16", *QUANTIZED])
def test_slab_views_carry_values_scales_and_biases(name):
    fmt = ExpertFormat(40, 24, has_bias=True)
    layout = slab_layout(fmt, weight_format(name))  # biases in bf16
    pool = torch.zeros(3, layout.numel, dtype=layout.storage_dtype)  # [S, slab]
    tensors = {k: torch.randn(s).bfloat16().float() for k, s in fmt.shapes.items()}
    fields = quantize_expert(layout, tensors)
    views = layout.views(pool)
    for key, value in fields.items():
        views[key][1].copy_(value)
    assert set(views) == set(fields)
    back = dequantize_expert(layout, layout.views(pool[1]))
    again = dequantize_expert(layout, fields)
    for key in tensors:
        assert torch.equal(back[key], again[key])
    assert pool[0].count_nonzero() == 0 and pool[2].count_nonzero() == 0  # nothing written outside slot 1
    assert layout.nbytes == pool[0].numel() * pool.element_size()


def test_dense_layout_is_the_historical_one():
    layout = slab_layout(MIXTRAL, weight_format("bf16"))
    assert layout.numel == MIXTRAL.numel and layout.storage_dtype == torch.bfloat16


def test_weights_outside_the_scale_range_are_refused():
    with pytest.raises(ConfigError, match="cannot be quantized"):
        quantize(weight_format("int4"), torch.tensor([[1e6, 1.0]]))
    with pytest.raises(ConfigError, match="NaN"):
        quantize(weight_format("fp8"), torch.tensor([[float("nan"), 1.0]]))


def test_unknown_and_modelling_only_formats_are_refused():
    with pytest.raises(ConfigError, match="unknown"):
        weight_format("nf4")
    with pytest.raises(ConfigError, match="modelling-only"):
        quantize(weight_format("int3"), torch.randn(2, 2))
    with pytest.raises(ConfigError, match="group_size"):
        weight_format("fp8", group_size=64)
