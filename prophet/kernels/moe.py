"""Mixture-of-Experts expert computation over cache slots: Triton grouped GEMM, launcher and reference.

The runtime (`OffloadedExperts`) calls `moe_experts` with expert weights that are views into the expert
cache's slot pool, ``pool [S, slab_numel]`` with ``w1 = pool[:, :N1*H].view(S, N1, H)`` and so on, so
``w1.stride(0)`` is the slab size: every kernel takes strides and never copies weights. Slot ids are already
remapped by the cache (a slot id is not an expert id). For each (t, j):

    x = hidden[t];  h = x @ w1[s].T (+ b1[s])            s = slot_ids[t, j]
    glu:  gate, up = h[:I], h[I:];  a = act(gate) * up    (gpt_oss: (clamp(up) + 1) * g * sigmoid(alpha g),
    else: a = act(h)                                        g = gate.clamp(max=limit))
    out[t] += weights[t, j] * (a @ w2[s].T (+ b2[s]))

as transformers v5's eager MixtralExperts / GptOssExperts compute it, with fp32 accumulation; ``a`` is
rounded to the weight dtype before the down projection, as the eager model does. The Triton path:
[prefill only: one-launch align of the pairs by slot] -> gate_up GEMM fused with the activation -> down GEMM
scaled by the router weight into ``y [split, T*k, H]`` fp32 -> a fixed-order sum over j (no atomic adds of
results, so they are deterministic). The decode path (T*k <= 64) needs no align step.

Quantized experts (``quant``: int8, int4, fp8, mxfp4, see `prophet.formats`) pass their values as ``w1``/``w2``
(bytes for the packed formats) and their scales in `Quant`, all views into the same slot slabs; the kernels
dequantize each weight tile in registers, the reference with `prophet.formats.dequantize`, and ``a`` is
rounded to the activation dtype.

The Triton kernels live in `kernels.moe_kernels` and are imported on the first Triton launch only.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from prophet.envs import kernel_backend, triton_interpret
from prophet.errors import KernelError
from prophet.formats import ExpertFormat, WeightFormat, dequantize

from .align import max_aligned_blocks
from .tuning import DECODE_MAX_PAIRS, MoEConfig, get_config

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
SUM_BLOCK = 1024  # columns per program of the final sum over k
ALIGN_CHUNK = 1024  # pairs per step of the one-program align kernel


def _workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer every kernel output goes through (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(
    hidden: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    fmt: ExpertFormat,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    quant: Quant | None = None,
) -> None:
    """Raise `KernelError` naming what to change when the inputs break the contract of `moe_experts`."""
    h, i, n1 = fmt.hidden_size, fmt.intermediate_size, fmt.w1_rows
    if hidden.dim() != 2 or hidden.shape[1] != h:
        raise KernelError(f"hidden has shape {tuple(hidden.shape)}; pass [tokens, {h}] (fmt.hidden_size={h})")
    tokens = hidden.shape[0]
    if slot_ids.dim() != 2 or slot_ids.shape[0] != tokens or slot_ids.shape[1] < 1:
        raise KernelError(f"slot_ids has shape {tuple(slot_ids.shape)}; pass [tokens={tokens}, top_k>=1]")
    if weights.shape != slot_ids.shape:
        raise KernelError(f"weights has shape {tuple(weights.shape)}; pass the router weights as {tuple(slot_ids.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"slot_ids dtype is {slot_ids.dtype}; pass int32 or int64 slot ids")
    if not weights.is_floating_point():
        raise KernelError(f"weights dtype is {weights.dtype}; pass floating-point router weights")
    if hidden.dtype not in DTYPES:
        raise KernelError(f"hidden dtype {hidden.dtype} is unsupported; use float32, float16 or bfloat16")
    if quant is not None:
        _check_quantized(w1, w2, fmt, quant)
    else:
        if w1.dim() != 3 or w1.shape[1:] != (n1, h):
            raise KernelError(f"w1 has shape {tuple(w1.shape)}; pass [slots, {n1}, {h}] (gate rows, then up rows)")
        if w2.dim() != 3 or w2.shape != (w1.shape[0], h, i):
            raise KernelError(f"w2 has shape {tuple(w2.shape)}; pass [{w1.shape[0]}, {h}, {i}] (slots, hidden, intermediate)")
        for name, t in (("w1", w1), ("w2", w2)):
            if t.dtype != hidden.dtype:
                raise KernelError(f"{name} dtype {t.dtype} differs from hidden's {hidden.dtype}; cast the activations")
    slots = w1.shape[0]
    for name, t in (("w1", w1), ("w2", w2)):
        if t.stride(2) != 1:
            raise KernelError(f"{name} has inner stride {t.stride(2)}; its rows must be contiguous (stride 1)")
    if fmt.has_bias:
        for name, b, width in (("b1", b1, n1), ("b2", b2, h)):
            if b is None:
                raise KernelError(f"fmt.has_bias is set but {name} is None; pass {name} [{slots}, {width}]")
            if b.shape != (slots, width):
                raise KernelError(f"{name} has shape {tuple(b.shape)}; pass [{slots}, {width}]")
            if b.dtype != hidden.dtype:
                raise KernelError(f"{name} dtype {b.dtype} differs from hidden's {hidden.dtype}")
            if b.stride(1) != 1:
                raise KernelError(f"{name} has inner stride {b.stride(1)}; it must be contiguous (stride 1)")
    elif b1 is not None or b2 is not None:
        raise KernelError("biases were passed but fmt.has_bias is False; set has_bias=True or drop b1/b2")
    tensors = [hidden, slot_ids, weights, w1, w2] + ([b1, b2] if fmt.has_bias else [])
    tensors += [quant.w1_scale, quant.w2_scale] if quant is not None else []
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelError(f"inputs are on several devices {sorted(map(str, devices))}; move them to one")
    if slot_ids.device.type == "cpu" and slot_ids.numel():  # on a GPU this check would cost a host sync
        lo, hi = int(slot_ids.min()), int(slot_ids.max())
        if lo < 0 or hi >= slots:
            raise KernelError(f"slot ids span [{lo}, {hi}] but there are {slots} slots; pass ids in [0, {slots})")


@dataclass(frozen=True)
class Quant:
    """Quantized expert weights: how they are stored and the scale views that go with ``w1``/``w2`` (slot-indexed,
    ``[S, ...]`` as `prophet.formats.WeightFormat.shapes` gives them, from the same slab as the values)."""

    weights: WeightFormat
    w1_scale: torch.Tensor
    w2_scale: torch.Tensor


def _check_quantized(w1: torch.Tensor, w2: torch.Tensor, fmt: ExpertFormat, quant: Quant) -> None:
    wf = quant.weights
    if not wf.quantized or not wf.runnable:
        raise KernelError(f"quant.weights={wf.name!r}: pass a quantized format the kernels run (int8, int4, fp8, mxfp4)")
    slots = w1.shape[0]
    for name, values, scales, shape in (("w1", w1, quant.w1_scale, (fmt.w1_rows, fmt.hidden_size)),
                                        ("w2", w2, quant.w2_scale, (fmt.hidden_size, fmt.intermediate_size))):
        vshape, sshape = wf.shapes(*shape)
        if values.dim() != 3 or tuple(values.shape) != (slots, *vshape) or values.dtype != wf.value_dtype:
            raise KernelError(f"{name} is {values.dtype} {tuple(values.shape)}; {wf.name} needs {wf.value_dtype} "
                              f"[{slots}, {vshape[0]}, {vshape[1]}]")
        if scales.dim() != 3 or tuple(scales.shape) != (slots, *sshape) or scales.dtype != wf.scale_dtype:
            raise KernelError(f"{name}_scale is {scales.dtype} {tuple(scales.shape)}; {wf.name} needs "
                              f"{wf.scale_dtype} [{slots}, {sshape[0]}, {sshape[1]}]")
        if scales.stride(2) != 1:
            raise KernelError(f"{name}_scale has inner stride {scales.stride(2)}; it must be contiguous (stride 1)")


def _slot_weight(values: torch.Tensor, scales: torch.Tensor | None, slot: int, shape: tuple[int, int],
                 quant: Quant | None) -> torch.Tensor:
    """fp32 ``[N, K]`` weights of one slot: upcast, or dequantized by the format's reference."""
    if quant is None:
        return values[slot].float()
    assert scales is not None
    return dequantize(quant.weights, values[slot], scales[slot], shape)


def _activate(h: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """The expert activation on fp32 ``h [M, N1]`` -> ``[M, I]``."""
    act = fmt.activation
    if fmt.glu:
        gate, up = h[:, : fmt.intermediate_size], h[:, fmt.intermediate_size :]
        if act == "gpt_oss":
            gate = gate.clamp(max=fmt.swiglu_limit)
            up = up.clamp(min=-fmt.swiglu_limit, max=fmt.swiglu_limit)
            return (up + 1) * gate * torch.sigmoid(fmt.swiglu_alpha * gate)
    else:
        gate, up = h, None
    if act == "silu":
        out = F.silu(gate)
    elif act == "gelu":
        out = F.gelu(gate)
    elif act == "gelu_tanh":
        out = F.gelu(gate, approximate="tanh")
    else:
        out = F.relu(gate)
    return out * up if up is not None else out


def moe_experts_reference(
    hidden: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    fmt: ExpertFormat,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    quant: Quant | None = None,
) -> torch.Tensor:
    """Pure-PyTorch ground truth (and the CPU path): one fp32 GEMM pair per used slot. Returns ``[T, H]``.

    Loops over the distinct slots (one host sync to list them); each slot's weights are upcast (or, with
    ``quant``, dequantized) to fp32 one slot at a time, so the extra memory is one expert.
    """
    _check_inputs(hidden, slot_ids, weights, w1, w2, fmt, b1, b2, quant)
    tokens, top_k = slot_ids.shape
    flat = slot_ids.reshape(-1)  # [P]
    order = torch.argsort(flat, stable=True)  # [P] pairs grouped by slot
    slots, counts = torch.unique_consecutive(flat[order], return_counts=True)
    contrib = torch.zeros(tokens * top_k, fmt.hidden_size, dtype=torch.float32, device=hidden.device)  # [P, H]
    router = weights.reshape(-1).float()  # [P]
    act_dtype = hidden.dtype if quant is not None else w2.dtype
    s1, s2 = (quant.w1_scale, quant.w2_scale) if quant is not None else (None, None)
    for slot, pairs in zip(slots.tolist(), torch.split(order, counts.tolist()), strict=True):
        x = hidden[pairs // top_k].float()  # [M, H]
        h = x @ _slot_weight(w1, s1, slot, (fmt.w1_rows, fmt.hidden_size), quant).T  # [M, N1]
        if b1 is not None:
            h = h + b1[slot].float()
        a = _activate(h, fmt).to(act_dtype).float()  # [M, I], rounded like the kernels' intermediate
        y = a @ _slot_weight(w2, s2, slot, (fmt.hidden_size, fmt.intermediate_size), quant).T  # [M, H]
        if b2 is not None:
            y = y + b2[slot].float()
        contrib[pairs] = y * router[pairs, None]
    return contrib.view(tokens, top_k, fmt.hidden_size).sum(1).to(hidden.dtype)


@functools.lru_cache(maxsize=1)
def _jit_module() -> ModuleType:
    """Import the @triton.jit kernels (first Triton launch only)."""
    try:
        from . import moe_kernels
    except ImportError as exc:
        raise KernelError(f"backend='triton' needs Triton ({exc}); install triton or use backend='reference'") from exc
    return moe_kernels


def align_pairs(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.align.align_pairs_reference`'s layout in one Triton launch: ``(sorted_pairs, block_slot)``."""
    kernels = _jit_module()
    device = slot_ids.device
    flat = slot_ids.reshape(-1)  # [P]
    num_pairs = flat.numel()
    num_blocks = max_aligned_blocks(num_pairs, num_slots, block_m)
    counts = torch.empty(num_slots, dtype=torch.int32, device=device)  # scratch
    ends = torch.empty(num_slots, dtype=torch.int32, device=device)  # scratch
    ranks = torch.empty(num_pairs, dtype=torch.int32, device=device)  # scratch
    sorted_pairs = _workspace((num_blocks * block_m,), torch.int32, device)
    block_slot = _workspace((num_blocks,), torch.int32, device)
    kernels.align_kernel[(1,)](
        flat, counts, ranks, ends, sorted_pairs, block_slot,
        num_pairs, num_slots, num_blocks, num_slots.bit_length(),
        BLOCK_M=block_m, CHUNK=ALIGN_CHUNK, num_warps=8,
    )
    return sorted_pairs, block_slot


def moe_experts_triton(
    hidden: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    fmt: ExpertFormat,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    quant: Quant | None = None,
    *,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Triton grouped GEMM over cache slots (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``).

    With ``quant`` the kernels dequantize ``w1``/``w2`` from their slot bytes and scales as they read them.
    ``config`` overrides the tuned launch settings (`kernels.tuning.get_config`). Returns ``[T, H]``.
    """
    _check_inputs(hidden, slot_ids, weights, w1, w2, fmt, b1, b2, quant)
    device = hidden.device
    if device.type != "cuda" and not triton_interpret():
        raise KernelError(
            f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before Triton is imported; "
            "move the tensors to CUDA or use backend='reference'"
        )
    tokens, top_k = slot_ids.shape
    num_pairs = tokens * top_k
    num_slots = w1.shape[0]
    hid, inter = fmt.hidden_size, fmt.intermediate_size
    if tokens == 0:
        return torch.zeros_like(hidden)
    kernels = _jit_module()
    cfg = config or get_config(hid, inter, num_pairs, hidden.dtype, device)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()  # activations only; weights are never copied
    flat_slots = slot_ids.reshape(-1)  # [P]
    router = weights.reshape(-1)  # [P]
    decode = cfg.path == "decode" and num_pairs <= DECODE_MAX_PAIRS
    if decode:
        block_m = max(16, _next_pow2(num_pairs))
        grid_m = num_pairs
        sorted_pairs = block_slot = flat_slots  # unused by the decode kernels
    else:
        block_m = cfg.block_m
        sorted_pairs, block_slot = align_pairs(slot_ids, num_slots, block_m)
        grid_m = block_slot.numel()
    bias1 = b1 if b1 is not None else hidden  # dummy pointers when there is no bias
    bias2 = b2 if b2 is not None else hidden
    ieee = hidden.dtype == torch.float32
    q1 = _kernel_weights(w1, quant.w1_scale if quant else None, quant, (fmt.w1_rows, hid))
    q2 = _kernel_weights(w2, quant.w2_scale if quant else None, quant, (hid, inter))

    act = _workspace((num_pairs, inter), hidden.dtype if quant else w2.dtype, device)  # [P, I]
    g = cfg.gate_up
    kernels.gate_up_kernel[(grid_m, -(-inter // g.block_n))](
        hidden, q1.values, q1.scales, bias1, act, flat_slots, sorted_pairs, block_slot,
        num_pairs, top_k, inter, hid,
        hidden.stride(0), q1.values.stride(0), q1.values.stride(1), q1.scales.stride(0), q1.scales.stride(1),
        bias1.stride(0), act.stride(0), float(fmt.swiglu_limit), float(fmt.swiglu_alpha),
        DECODE=decode, GLU=fmt.glu, ACT=ACTIVATION_CODES[fmt.activation], HAS_BIAS=b1 is not None, IEEE=ieee,
        WFMT=q1.code, SB_ROWS=q1.block_rows, SB_COLS=q1.block_cols,
        BLOCK_M=block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, num_warps=g.num_warps, num_stages=g.num_stages,
    )

    d = cfg.down
    split_k = max(1, min(cfg.split_k, -(-inter // d.block_k)))
    per_split = -(-inter // split_k)
    k_chunk = -(-per_split // d.block_k) * d.block_k  # reduction length per split, a multiple of BLOCK_K
    y = _workspace((split_k, num_pairs, hid), torch.float32, device)  # [split, P, H]
    kernels.down_kernel[(grid_m, -(-hid // d.block_n), split_k)](
        act, q2.values, q2.scales, bias2, router, y, flat_slots, sorted_pairs, block_slot,
        num_pairs, hid, inter, k_chunk,
        act.stride(0), q2.values.stride(0), q2.values.stride(1), q2.scales.stride(0), q2.scales.stride(1),
        bias2.stride(0), y.stride(0), y.stride(1),
        DECODE=decode, HAS_BIAS=b2 is not None, IEEE=ieee,
        WFMT=q2.code, SB_ROWS=q2.block_rows, SB_COLS=q2.block_cols,
        BLOCK_M=block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k, num_warps=d.num_warps, num_stages=d.num_stages,
    )

    out = _workspace((tokens, hid), hidden.dtype, device)  # [T, H]
    block = min(SUM_BLOCK, _next_pow2(hid))
    kernels.sum_pairs_kernel[(tokens, -(-hid // block))](
        y, out, top_k, hid, y.stride(0), y.stride(1), out.stride(0), SPLIT_K=split_k, BLOCK_N=block
    )
    return out


@dataclass(frozen=True)
class _KernelWeights:
    """What the kernels take for one weight: values (fp8 as its bytes), scales and the format's constexprs."""

    values: torch.Tensor
    scales: torch.Tensor
    code: int
    block_rows: int
    block_cols: int


def _kernel_weights(values: torch.Tensor, scales: torch.Tensor | None, quant: Quant | None,
                    shape: tuple[int, int]) -> _KernelWeights:
    if quant is None or scales is None:
        return _KernelWeights(values, values, 0, 1, 1)  # dense: the scale pointer is a dummy
    if values.dtype == torch.float8_e4m3fn:
        values = values.view(torch.uint8)  # decoded from its bits in the kernel
    rows, cols = quant.weights.block(*shape)
    return _KernelWeights(values, scales, quant.weights.code, rows, cols)


def _next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def resolve_backend(backend: str, device: torch.device) -> str:
    """"triton" or "reference" for ``backend``; "auto" follows ``PROPHET_KERNELS``, else Triton on CUDA."""
    if backend not in BACKENDS:
        raise KernelError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = kernel_backend()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    return backend


def moe_experts(
    hidden: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    fmt: ExpertFormat,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    quant: Quant | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``[T, H]`` output of the experts ``slot_ids [T, k]`` weighted by ``weights [T, k]`` (see the module doc).

    ``quant``: the weights' format and scales when ``w1``/``w2`` are quantized slot bytes.
    ``backend``: "auto" (``PROPHET_KERNELS`` if set, else Triton for CUDA tensors and the reference
    otherwise), "triton" or "reference".
    """
    if resolve_backend(backend, hidden.device) == "triton":
        return moe_experts_triton(hidden, slot_ids, weights, w1, w2, fmt, b1, b2, quant)
    return moe_experts_reference(hidden, slot_ids, weights, w1, w2, fmt, b1, b2, quant)
