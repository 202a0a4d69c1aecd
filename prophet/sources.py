"""Experts that arrive already quantized: their stored bytes go into the host store as they are.

`prophet.wrap` fills the store from an `ExpertSource` instead of the experts' dense tensors when the experts
modules are transformers' own quantized ones (`fp8_module_source`: FP8Experts with block-wise ``*_scale_inv``,
as FP8 checkpoints load), and `prophet.load` streams a quantized checkpoint's expert tensors straight from its
safetensors shards (`mxfp4_checkpoint_source`: gpt-oss's ``*_blocks``/``*_scales``; `fp8_checkpoint_source`:
block-wise FP8 ``weight_scale_inv`` as DeepSeek-V3 and Qwen3-FP8 ship), one expert at a time, so
no dense copy of the experts ever exists on the host. A source reads one expert's fields in the canonical
layout of `prophet.formats` (a permutation of rows at most: values and scales are never recomputed) and, where
it can, writes them back, which makes `unwrap` restore the quantized modules bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prophet.errors import ConfigError, UnsupportedModelError
from prophet.formats import WeightFormat, dequantize, weight_format
from prophet.models.adapter import MoELayer, moe_layers

Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ExpertSource:
    """Where each expert's stored fields come from: ``read(moe_layer, expert)``, and ``write`` back if possible."""

    weights: WeightFormat
    read: Callable[[int, int], Fields]
    write: Callable[[int, int, Fields], None] | None = None
    description: str = ""


def _fp8_format(block: Sequence[int] | None) -> WeightFormat:
    if block is None:
        raise UnsupportedModelError(
            "FP8Experts with per-tensor scales (block_size=None) keep one scale per gate/up half, which Prophet's "
            "fp8 formats do not hold; use a block-wise FP8 checkpoint (weight_block_size, e.g. [128, 128])"
        )
    rows, cols = block
    if (rows, cols) == (128, 128):
        return weight_format("fp8")
    return WeightFormat(f"fp8-block{rows}x{cols}", "fp8", 8, rows, cols, torch.float32)


def fp8_module_source(layers: Sequence[MoELayer]) -> ExpertSource | None:
    """A source over transformers' FP8Experts modules (``gate_up_proj``/``down_proj`` in float8_e4m3fn with
    fp32 ``*_scale_inv`` per block), or None when the experts are not such modules."""
    experts = [layer.experts for layer in layers]
    if not all(hasattr(m, "gate_up_proj_scale_inv") for m in experts):
        if any(hasattr(m, "gate_up_proj_scale_inv") or hasattr(m, "up_proj_scale_inv") for m in experts):
            raise UnsupportedModelError("only gated FP8Experts (gate_up_proj_scale_inv) in every MoE layer are supported")
        return None
    wf = _fp8_format(getattr(experts[0], "block_size", None))
    fmt = layers[0].fmt
    if fmt.has_bias:
        raise UnsupportedModelError("FP8Experts with biases are not supported (transformers has none either)")
    shape1, shape2 = wf.shapes(fmt.w1_rows, fmt.hidden_size), wf.shapes(fmt.hidden_size, fmt.intermediate_size)
    for m in experts:
        for name in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
            if getattr(m, name).dtype != torch.float32:
                raise UnsupportedModelError(f"{name} is {getattr(m, name).dtype}; Prophet reads fp32 scale_inv "
                                            "(UE8M0 scales are not supported)")

    def read(layer: int, e: int) -> Fields:
        m = experts[layer]
        (r1, c1), (r2, c2) = shape1[1], shape2[1]  # the module may pad the scale rows (min_sf_out)
        return {"w1": m.gate_up_proj[e].detach(), "w1_scale": m.gate_up_proj_scale_inv[e, :r1, :c1].detach(),
                "w2": m.down_proj[e].detach(), "w2_scale": m.down_proj_scale_inv[e, :r2, :c2].detach()}

    def write(layer: int, e: int, fields: Fields) -> None:
        m = experts[layer]
        (r1, c1), (r2, c2) = shape1[1], shape2[1]
        with torch.no_grad():
            m.gate_up_proj[e].copy_(fields["w1"])
            m.gate_up_proj_scale_inv[e].zero_()  # rows past the blocks (min_sf_out padding) are unused: zeros
            m.gate_up_proj_scale_inv[e, :r1, :c1].copy_(fields["w1_scale"])
            m.down_proj[e].copy_(fields["w2"])
            m.down_proj_scale_inv[e].zero_()
            m.down_proj_scale_inv[e, :r2, :c2].copy_(fields["w2_scale"])

    return ExpertSource(wf, read, write, f"transformers FP8Experts ({wf.name})")


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """gpt-oss rows alternate gate and up: ``[2I, ...]`` -> gate rows then up rows (the canonical order)."""
    return torch.cat((t[0::2], t[1::2]))


class SafetensorsReader:
    """Named tensors of a checkpoint folder's shards, opened memory-mapped; ``expert(name, e)`` reads one slice."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            shards = sorted(p.name for p in path.glob("*.safetensors"))
        self._files = [safe_open(path / s, framework="pt") for s in shards]
        self.where = {key: f for f in self._files for key in f.keys()}

    def keys(self) -> list[str]:
        return list(self.where)

    def tensor(self, name: str) -> torch.Tensor:
        return self._get(name).get_tensor(name)

    def expert(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e`` of a stacked ``[E, ...]`` tensor, reading only its bytes."""
        return self._get(name).get_slice(name)[e]

    def _get(self, name: str) -> Any:  # a safetensors file handle
        if name not in self.where:
            raise ConfigError(f"the checkpoint has no tensor {name!r}; is it a quantized checkpoint of this model?")
        return self.where[name]


def mxfp4_checkpoint_source(reader: SafetensorsReader, layers: Sequence[MoELayer], dtype: torch.dtype) -> ExpertSource:
    """gpt-oss's MXFP4 experts (``{experts}.gate_up_proj_blocks [E, 2I, H/32, 16]``, ``*_scales [E, 2I, H/32]``
    e8m0, ``*_bias [E, 2I]``, gate/up rows interleaved; ``down_proj_*`` alike), read one expert at a time."""
    wf = weight_format("mxfp4")

    def read(layer: int, e: int) -> Fields:
        prefix = layers[layer].name
        blocks1 = reader.expert(f"{prefix}.gate_up_proj_blocks", e)  # [2I, H/32, 16]
        blocks2 = reader.expert(f"{prefix}.down_proj_blocks", e)  # [H, I/32, 16]
        return {
            "w1": _deinterleave(blocks1.flatten(-2)),  # [2I, H/2]
            "w1_scale": _deinterleave(reader.expert(f"{prefix}.gate_up_proj_scales", e)),  # [2I, H/32]
            "w2": blocks2.flatten(-2),  # [H, I/2]
            "w2_scale": reader.expert(f"{prefix}.down_proj_scales", e),  # [H, I/32]
            "b1": _deinterleave(reader.expert(f"{prefix}.gate_up_proj_bias", e)).to(dtype),
            "b2": reader.expert(f"{prefix}.down_proj_bias", e).to(dtype),
        }

    return ExpertSource(wf, read, None, "MXFP4 experts streamed from safetensors")


def fp8_checkpoint_source(reader: SafetensorsReader, layers: Sequence[MoELayer], block: Sequence[int]) -> ExpertSource:
    """Block-wise FP8 experts with fp32 ``weight_scale_inv``: stacked under the experts module's path
    (``{experts}.gate_up_proj [E, 2I, H]``, ``.gate_up_proj_scale_inv``, ``.down_proj*``), or one module per
    expert as DeepSeek-V3 and Qwen3-FP8 ship (``{experts}.{e}.gate_proj.weight`` and ``.weight_scale_inv``,
    ``up_proj``, ``down_proj``; gate and up rows are stacked, so I must be a multiple of the block rows)."""
    wf = _fp8_format(block)
    fmt = layers[0].fmt
    (r1, c1), (r2, c2) = wf.shapes(fmt.w1_rows, fmt.hidden_size)[1], wf.shapes(fmt.hidden_size, fmt.intermediate_size)[1]

    def read(layer: int, e: int) -> Fields:
        prefix = layers[layer].name
        if f"{prefix}.gate_up_proj" in reader.where:
            return {"w1": reader.expert(f"{prefix}.gate_up_proj", e),
                    "w1_scale": reader.expert(f"{prefix}.gate_up_proj_scale_inv", e)[:r1, :c1],
                    "w2": reader.expert(f"{prefix}.down_proj", e),
                    "w2_scale": reader.expert(f"{prefix}.down_proj_scale_inv", e)[:r2, :c2]}
        if fmt.intermediate_size % wf.block_rows:
            raise UnsupportedModelError(f"per-expert FP8 gate/up of {fmt.intermediate_size} rows do not fill whole "
                                        f"{wf.block_rows}-row scale blocks, so they cannot share one slab")
        gate, up, down = (f"{prefix}.{e}.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
        return {"w1": torch.cat((reader.tensor(f"{gate}.weight"), reader.tensor(f"{up}.weight"))),
                "w1_scale": torch.cat((reader.tensor(f"{gate}.weight_scale_inv"), reader.tensor(f"{up}.weight_scale_inv"))),
                "w2": reader.tensor(f"{down}.weight"), "w2_scale": reader.tensor(f"{down}.weight_scale_inv")}

    return ExpertSource(wf, read, None, f"FP8 experts ({wf.name}) streamed from safetensors")


def _non_expert_state(reader: SafetensorsReader, experts: tuple[str, ...], dtype: torch.dtype,
                      block: Sequence[int] | None) -> dict[str, torch.Tensor]:
    """Every tensor outside the experts in ``dtype``; FP8 weights with a ``weight_scale_inv`` are dequantized."""
    state = {}
    for key in reader.keys():
        if key.startswith(experts) or key.endswith("_scale_inv"):
            continue
        t = reader.tensor(key)
        if f"{key}_scale_inv" in reader.where:
            if block is None:
                raise UnsupportedModelError(f"{key} has a scale_inv but the checkpoint names no weight_block_size")
            t = dequantize(_fp8_format(block), t, reader.tensor(f"{key}_scale_inv"), tuple(t.shape))
        state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def quantized_checkpoint(path: Path, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, ExpertSource] | None:
    """A checkpoint folder whose experts are quantized (``quantization_config`` with ``quant_method`` mxfp4, as
    gpt-oss ships, or fp8 with ``weight_block_size``, as DeepSeek-V3 and transformers' FP8 saves) as ``(model,
    source)``: the model is built on the meta device, its other weights are read from the shards in ``dtype``
    (FP8 ones dequantized), and the experts stay in the shards for `prophet.wrap` to stream through
    ``source``. None for a checkpoint without ``quantization_config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    if not quant:
        return None
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method not in ("mxfp4", "fp8"):
        raise UnsupportedModelError(f"{path}: quant_method={method!r} checkpoints are not read; Prophet streams MXFP4 "
                                    "(gpt-oss) and block-wise FP8 experts")
    if method == "fp8" and (block is None or quant.get("activation_scheme", "dynamic") != "dynamic"):
        raise UnsupportedModelError(f"{path}: FP8 checkpoints need weight_block_size and dynamic activations "
                                    f"(got {block}, {quant.get('activation_scheme')!r})")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    del config.quantization_config
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = moe_layers(model)
    for layer in layers:  # shaped placeholders that hold no memory (stride 0) until unwrap gives them storage
        for name, p in list(layer.experts.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            empty = torch.zeros((), dtype=p.dtype).expand(p.shape)
            setattr(layer.experts.get_submodule(owner), leaf, nn.Parameter(empty, requires_grad=False))
    experts = tuple(f"{layer.name}." for layer in layers)
    reader = SafetensorsReader(path)
    model.load_state_dict(_non_expert_state(reader, experts, dtype, block), strict=False, assign=True)
    model.tie_weights()
    for name, module in model.named_modules():
        if name.startswith(experts) or f"{name}." in experts:
            continue
        if any(p.is_meta for p in module.parameters(recurse=False)):
            missing = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
            raise ConfigError(f"{path}: the checkpoint has no {name}.{missing[0]}; is it complete?")
        if any(b.is_meta for b in module.buffers(recurse=False)):  # computed buffers, e.g. rotary frequencies
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    if method == "fp8":
        return model.eval(), fp8_checkpoint_source(reader, layers, block)
    return model.eval(), mxfp4_checkpoint_source(reader, layers, dtype)
