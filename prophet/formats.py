"""Expert formats: the shape and arithmetic of one expert, and how its weights are stored (dense or quantized).

`ExpertFormat` is what an expert computes, in the canonical layout (per expert, the Mixtral layout of
transformers v5)::

    w1 [N1, H]   N1 = 2*I for gated experts (rows [0, I) are the gate, rows [I, 2I) the up projection),
                 N1 = I for plain ones (a single up projection)
    w2 [H, I]    down projection
    b1 [N1], b2 [H]   biases, only when ``ExpertFormat.has_bias``

and `expert_forward` is that computation in plain PyTorch, the reference every kernel and test is held to.

`WeightFormat` is how each weight matrix ``[N, K]`` (K the reduction dim, contiguous) is stored: dense
(bf16/fp16/fp32) or quantized values with one scale per block of ``block_rows x block_cols`` elements:

    int8 / int4   symmetric integers, one fp16 scale per ``group_size`` columns of a row (int4: two values a
                  byte, the even column in the low nibble, stored as value + 8)
    fp8           e4m3 values with fp32 ``scale_inv`` per tensor, per row (channel) or per 128x128 block, as
                  FP8 checkpoints (DeepSeek-V3, Qwen3-FP8) and transformers' FP8 expert modules hold them
    mxfp4         e2m1 values (two a byte, low nibble first) with one e8m0 scale (2^(e-127)) per 32 columns,
                  as gpt-oss ships its experts
    int2 .. int7  other bit widths, for the planner and simulator only (no kernel, no quantizer)

`SlabLayout` places one expert's values, scales and biases in one contiguous byte slab (each field 16-byte
aligned), so the host store keeps it, a cache slot holds the same bytes, one copy moves them, and a slot's
views carry the scales with the values: remapping an expert id to a slot remaps its scales too.
`dequantize` is the pure-PyTorch reference of every format; the kernels are held to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prophet.errors import ConfigError, DtypeError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")

# How a family stores its experts, i.e. what ``get_expert``/``set_expert`` convert from and to.
STORAGES = {
    "fused": "gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I] (Mixtral, Qwen-MoE, "
    "OLMoE, DeepSeek, Jamba, PhiMoE): canonical as is",
    "fused_transposed_interleaved": "gate_up_proj [E, H, 2I] with gate/up in alternating columns, "
    "gate_up_proj_bias [E, 2I] alike, down_proj [E, I, H], down_proj_bias [E, H] (gpt-oss)",
    "flat_split": "mlp.w1 (gate), mlp.v1 (up), mlp.w2 (down) each [E*I, H] (DBRX)",
    "modules": "one module per expert holding nn.Linear gate/up/down (or up/down) projections, e.g. Switch "
    "Transformers' ModuleDict of wi/wo, or custom-code ModuleLists (Grok-1, Arctic, DeepSeek-MoE 16B)",
}




@dataclass(frozen=True)
class ExpertFormat:
    """Shape and arithmetic of one expert in the canonical layout."""

    hidden_size: int
    intermediate_size: int
    glu: bool = True
    activation: str = "silu"
    has_bias: bool = False
    swiglu_alpha: float = 1.702  # gpt_oss activation only
    swiglu_limit: float = 7.0  # gpt_oss activation only
    storage: str = "fused"  # the family's own layout, a key of STORAGES

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: supported are {', '.join(ACTIVATIONS)}")
        if self.hidden_size <= 0 or self.intermediate_size <= 0:
            raise ConfigError(f"expert sizes must be positive (H={self.hidden_size}, I={self.intermediate_size})")
        if self.activation == "gpt_oss" and not self.glu:
            raise ConfigError("activation='gpt_oss' is a gated activation: it needs glu=True")
        if self.storage not in STORAGES:
            raise ConfigError(f"storage={self.storage!r}: known layouts are {', '.join(STORAGES)}")

    @property
    def w1_rows(self) -> int:
        return 2 * self.intermediate_size if self.glu else self.intermediate_size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor shapes of one expert, in slab order."""
        return canonical_shapes(self.hidden_size, self.intermediate_size, self.glu, self.has_bias)

    @property
    def numel(self) -> int:
        """Elements of one expert (all its tensors)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def params(self) -> int:
        return self.numel

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()


_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def expert_forward(fmt: ExpertFormat, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert applied to ``x [..., H]`` from its canonical tensors, in plain PyTorch.

    This is the arithmetic every family's experts module performs per expert (tests hold each adapter to it),
    so a runtime that reproduces it from the canonical tensors reproduces the model.
    """
    h = F.linear(x, tensors["w1"], tensors["b1"] if fmt.has_bias else None)
    if fmt.glu:
        gate, up = h[..., : fmt.intermediate_size], h[..., fmt.intermediate_size :]
        if fmt.activation == "gpt_oss":
            gate = gate.clamp(max=fmt.swiglu_limit)
            up = up.clamp(min=-fmt.swiglu_limit, max=fmt.swiglu_limit)
            act = (up + 1) * (gate * torch.sigmoid(gate * fmt.swiglu_alpha))
        else:
            act = _ELEMENTWISE[fmt.activation](gate) * up
    else:
        act = _ELEMENTWISE[fmt.activation](h)
    return F.linear(act, tensors["w2"], tensors["b2"] if fmt.has_bias else None)


def canonical_shapes(hidden: int, inter: int, glu: bool, has_bias: bool) -> dict[str, tuple[int, ...]]:
    """Canonical tensor shapes of one expert (the same as `ExpertFormat.shapes`)."""
    n1 = 2 * inter if glu else inter
    out: dict[str, tuple[int, ...]] = {"w1": (n1, hidden), "w2": (hidden, inter)}
    if has_bias:
        out["b1"], out["b2"] = (n1,), (hidden,)
    return out


# ---- weight formats --------------------------------------------------------------------------------------------

DENSE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8_MAX = 448.0  # largest finite e4m3fn value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of the 8 e2m1 codes (bit 3 is the sign)
KERNEL_CODES = {"dense": 0, "int8": 1, "int4": 2, "fp8": 3, "mxfp4": 4}  # `kernels.moe_kernels` constexprs
ALIGN = 16  # bytes: every slab field starts at a multiple, so views of any dtype are aligned


@dataclass(frozen=True)
class WeightFormat:
    """How one weight matrix ``[N, K]`` is stored: values of ``value_bits`` and one scale per block.

    ``block_rows``/``block_cols`` of 0 mean the whole dimension (per-tensor: 0, 0; per-row: 1, 0).
    """

    name: str  # "bf16" | "fp16" | "fp32" | "int8" | "int4" | "fp8" | "mxfp4" | "int2" .. "int7" | "<b>bit"
    kind: str  # "dense" | "int" | "fp8" | "mxfp4" | "bits" (a modelled width, scales included)
    value_bits: float
    block_rows: int = 1
    block_cols: int = 0
    scale_dtype: torch.dtype | None = None  # None for dense; torch.uint8 holds e8m0 exponents

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"

    @property
    def runnable(self) -> bool:
        """Whether quantize, the kernels and the store support it (other bit widths are for modelling only)."""
        return self.kind != "bits" and (self.kind != "int" or self.value_bits in (4, 8))

    @property
    def code(self) -> int:
        """The kernels' constexpr for this format."""
        return KERNEL_CODES[self.name if self.kind == "int" else self.kind]

    @property
    def value_dtype(self) -> torch.dtype:
        """dtype of the values field in a slab (packed 4-bit values are bytes)."""
        if self.kind == "dense":
            return DENSE[self.name]
        if self.kind == "fp8":
            return torch.float8_e4m3fn
        return torch.int8 if self.value_bits == 8 else torch.uint8

    def block(self, rows: int, cols: int) -> tuple[int, int]:
        """Effective ``(block_rows, block_cols)`` for a ``[rows, cols]`` matrix."""
        return (self.block_rows or rows, self.block_cols or cols)

    def shapes(self, rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """``(values shape, scales shape or None)`` of a ``[rows, cols]`` matrix."""
        if not self.quantized:
            return (rows, cols), None
        width = -(-cols * int(self.value_bits) // 8)  # packed bytes per row
        br, bc = self.block(rows, cols)
        return (rows, width), (-(-rows // br), -(-cols // bc))

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of a ``[rows, cols]`` matrix in this format, scales included."""
        if self.kind == "bits":
            return math.ceil(rows * cols * self.value_bits / 8)
        if not self.quantized:
            return rows * cols * DENSE[self.name].itemsize
        values, scales = self.shapes(rows, cols)
        assert scales is not None and self.scale_dtype is not None
        return math.prod(values) + math.prod(scales) * self.scale_dtype.itemsize

    def bits_per_param(self, rows: int, cols: int) -> float:
        return 8 * self.nbytes(rows, cols) / (rows * cols)


def weight_format(name: str, group_size: int | None = None) -> WeightFormat:
    """A named format: ``bf16``/``fp16``/``fp32``; ``int8``, ``int4`` (``group_size`` columns per fp16
    scale, default 128; 0 for one scale per row); ``fp8`` (128x128 block ``scale_inv``), ``fp8-channel``,
    ``fp8-tensor``; ``mxfp4``; modelling only: ``int2`` .. ``int7`` and ``<b>bit`` (``b`` bits per parameter,
    scales included, e.g. ``2.6bit`` for llama.cpp-style k-quants)."""
    if name in DENSE:
        return WeightFormat(name, "dense", DENSE[name].itemsize * 8, 0, 0)
    if group_size is not None and not (name.startswith("int") and group_size >= 0):
        raise ConfigError(f"group_size applies to the int formats only (got {name!r}); drop it")
    if name.startswith("int") and name[3:].isdigit() and 2 <= int(name[3:]) <= 8:
        group = 128 if group_size is None else group_size
        return WeightFormat(name, "int", int(name[3:]), 1, group, torch.float16)
    fp8 = {"fp8": (128, 128), "fp8-block": (128, 128), "fp8-channel": (1, 0), "fp8-tensor": (0, 0)}
    if name in fp8:
        return WeightFormat(name, "fp8", 8, *fp8[name], torch.float32)
    if name == "mxfp4":
        return WeightFormat(name, "mxfp4", 4, 1, 32, torch.uint8)
    bits = name.removesuffix("bit")
    if name.endswith("bit") and bits.replace(".", "", 1).isdigit() and 0 < float(bits) <= 32:
        return WeightFormat(name, "bits", float(bits), 0, 0)
    known = [*DENSE, "int8", "int4", "fp8", "fp8-channel", "fp8-tensor", "mxfp4", "int2..int7", "<b>bit"]
    raise ConfigError(f"expert format {name!r} is unknown; use one of {', '.join(known)}")


def dense_format(dtype: torch.dtype) -> WeightFormat:
    """The dense `WeightFormat` of a floating-point ``dtype``."""
    for name, dt in DENSE.items():
        if dt == dtype:
            return weight_format(name)
    raise DtypeError(f"experts in {dtype} cannot be stored dense; use float32, float16 or bfloat16")


def _blocks(w: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """``w [N, K]`` zero-padded and viewed as ``[N/br, br, K/bc, bc]`` blocks."""
    n, k = w.shape
    nb, kb = -(-n // br), -(-k // bc)
    return F.pad(w, (0, kb * bc - k, 0, nb * br - n)).view(nb, br, kb, bc)


def _expand(scales: torch.Tensor, br: int, bc: int, n: int, k: int) -> torch.Tensor:
    """Per-block ``scales [N/br, K/bc]`` -> one per element ``[N, K]``."""
    return scales.repeat_interleave(br, 0)[:n].repeat_interleave(bc, 1)[:, :k]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in [0, 16) -> ``[N, ceil(K/2)]`` bytes, the even column in the low nibble."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `_pack_nibbles`: ``[N, ceil(K/2)]`` bytes -> ``[N, K]`` int64 codes."""
    p = packed.long()
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)[:, :k]


def _e2m1_table() -> torch.Tensor:
    mags = torch.tensor(E2M1_VALUES)
    return torch.cat((mags, -mags))  # code = sign << 3 | magnitude index


def quantize(wf: WeightFormat, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w [N, K]`` (any float dtype) -> ``(values, scales)`` in ``wf``, round to nearest.

    Scales are chosen from each block's largest magnitude, so no value clips (mxfp4: the block's exponent
    as the OCP MX spec sets it, values above 6 x 2^e saturate)."""
    if not wf.runnable:
        raise ConfigError(f"{wf.name} is a modelling-only format (no quantizer or kernel); use int4, int8, fp8 or mxfp4")
    if not wf.quantized:
        return w.to(DENSE[wf.name]), None
    n, k = w.shape
    br, bc = wf.block(n, k)
    w = w.detach().float().contiguous()
    amax = _blocks(w.abs(), br, bc).amax(dim=(1, 3))  # [N/br, K/bc]
    if not torch.isfinite(amax).all() or (wf.kind == "int" and amax.max() > 60000):
        raise ConfigError(f"weights of {amax.max().item():.3g} in magnitude (or NaN) cannot be quantized to "
                          f"{wf.name}; check the checkpoint, or keep these experts dense")
    if wf.kind == "int":
        qmax = 2 ** (wf.value_bits - 1) - 1
        scales = torch.where(amax > 0, amax / qmax, 1.0).to(torch.float16)  # [N/br, K/bc]
        q = torch.round(w / _expand(scales.float(), br, bc, n, k)).clamp(-qmax - 1, qmax)
        values = q.to(torch.int8) if wf.value_bits == 8 else _pack_nibbles(q.long() + 8)
        return values, scales
    if wf.kind == "fp8":
        scales = torch.where(amax > 0, amax / FP8_MAX, 1.0)
        values = (w / _expand(scales, br, bc, n, k)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return values, scales
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-127))) - 2, -127.0)
    exponent = exponent.clamp(-127, 127)
    scaled = w / _expand(torch.exp2(exponent), br, bc, n, k)
    mags = torch.tensor(E2M1_VALUES, device=w.device)
    index = torch.bucketize(scaled.abs().clamp(max=6.0), (mags[1:] + mags[:-1]) / 2)  # nearest magnitude
    codes = index + 8 * (scaled < 0)
    return _pack_nibbles(codes), (exponent + 127).to(torch.uint8)


def dequantize(wf: WeightFormat, values: torch.Tensor, scales: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """The reference: stored ``values``/``scales`` -> float32 ``[N, K]`` (``shape``)."""
    if not wf.quantized:
        return values.float()
    n, k = shape
    br, bc = wf.block(n, k)
    assert scales is not None
    if wf.kind == "int":
        q = values.float() if wf.value_bits == 8 else (_unpack_nibbles(values, k) - 8).float()
        return q * _expand(scales.float(), br, bc, n, k)
    if wf.kind == "fp8":
        return values.float() * _expand(scales.float(), br, bc, n, k)
    q = _e2m1_table().to(values.device)[_unpack_nibbles(values, k)]
    return q * _expand(torch.exp2(scales.float() - 127), br, bc, n, k)


# ---- one expert's slab --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One tensor of a slab: its byte offset, shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class SlabLayout:
    """Where each tensor of one expert lies in its slab, in the slab's storage dtype.

    Dense formats keep the historical layout (w1, w2[, b1, b2] back to back in the weight dtype, no padding);
    quantized ones store bytes (``storage_dtype`` uint8): w1, w1_scale, w2, w2_scale[, b1, b2], each field
    16-byte aligned. Biases are kept in ``bias_dtype``.
    """

    expert: ExpertFormat
    weights: WeightFormat
    bias_dtype: torch.dtype
    fields: Mapping[str, Field]
    storage_dtype: torch.dtype
    numel: int  # elements of storage_dtype per slab

    @property
    def nbytes(self) -> int:
        """Bytes of one expert, scales and padding included (what a slot holds and a copy moves)."""
        return self.numel * self.storage_dtype.itemsize

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.expert.numel

    def views(self, slab: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``slab [..., numel]`` of storage dtype; leading dims (slots) are kept."""
        size = self.storage_dtype.itemsize
        out: dict[str, torch.Tensor] = {}
        for name, f in self.fields.items():
            lo, n = f.offset // size, f.nbytes // size
            part = slab[..., lo : lo + n]
            if f.dtype != self.storage_dtype:
                part = part.view(f.dtype)
            out[name] = part.unflatten(-1, f.shape)
        return out


def slab_layout(expert: ExpertFormat, weights: WeightFormat, bias_dtype: torch.dtype | None = None) -> SlabLayout:
    """The `SlabLayout` of ``expert`` stored in ``weights`` (biases in ``bias_dtype``, default the dense dtype)."""
    if not weights.runnable:
        raise ConfigError(f"{weights.name} is a modelling-only format; the store holds int4, int8, fp8, mxfp4 or dense")
    if not weights.quantized:
        dtype = DENSE[weights.name]
        if bias_dtype not in (None, dtype):
            raise ConfigError(f"dense {weights.name} experts keep their biases in {dtype}, not {bias_dtype}")
        fields, offset = {}, 0
        for name, shape in expert.shapes.items():
            fields[name] = Field(offset, shape, dtype)
            offset += math.prod(shape) * dtype.itemsize
        return SlabLayout(expert, weights, dtype, fields, dtype, offset // dtype.itemsize)
    bias_dtype = bias_dtype or torch.bfloat16
    fields, offset = {}, 0

    def add(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        nonlocal offset
        fields[name] = Field(offset, shape, dtype)
        offset += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN

    for name, shape in expert.shapes.items():
        if name.startswith("w"):
            values, scales = weights.shapes(*shape)
            add(name, values, weights.value_dtype)
            assert scales is not None and weights.scale_dtype is not None
            add(f"{name}_scale", scales, weights.scale_dtype)
        else:
            add(name, shape, bias_dtype)
    return SlabLayout(expert, weights, bias_dtype, fields, torch.uint8, offset)


def expert_nbytes(expert: ExpertFormat, weights: WeightFormat) -> int:
    """Bytes of one expert stored in ``weights``, scales included: the slab size for the formats the store holds,
    the packed size (bf16 biases) for modelling-only bit widths."""
    if weights.runnable:
        return slab_layout(expert, weights).nbytes
    shapes = expert.shapes.items()
    biases = sum(math.prod(s) for name, s in shapes if name.startswith("b")) * torch.bfloat16.itemsize
    return sum(weights.nbytes(*s) for name, s in shapes if name.startswith("w")) + biases


def quantize_expert(layout: SlabLayout, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's canonical dense tensors -> the fields of ``layout`` (values, scales, biases)."""
    out: dict[str, torch.Tensor] = {}
    for name in layout.expert.shapes:
        if name.startswith("w") and layout.weights.quantized:
            out[name], out[f"{name}_scale"] = quantize(layout.weights, tensors[name])
        else:
            out[name] = tensors[name]
    return out


def dequantize_expert(layout: SlabLayout, fields: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's stored fields -> canonical float32 tensors (w1, w2[, b1, b2]), the reference weights."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in layout.expert.shapes.items():
        if name.startswith("w"):
            out[name] = dequantize(layout.weights, fields[name], fields.get(f"{name}_scale"), shape)  # type: ignore[arg-type]
        else:
            out[name] = fields[name].float()
    return out
