"""The @triton.jit kernels behind `prophet.kernels.moe` (its launcher, reference and docs live there).

Imported only on the first Triton launch, never at package import: Triton may be missing, and
``TRITON_INTERPRET`` is read when the decorators run, so a late import honours a late setting.

Weights are read through `_load_weight`: dense tiles as stored, quantized ones (int8, int4, fp8 e4m3, mxfp4;
codes in `prophet.formats.KERNEL_CODES`) dequantized in registers from the slot's bytes and its scales, with
the arithmetic of `prophet.formats.dequantize` (fp8 and e2m1 are decoded from their bits, so the interpreter
runs every format).

`align_kernel` groups the (token, k) pairs by slot for the prefill path in one launch. Both GEMMs handle one
group of pair rows that share a cache slot per program, in one of two modes:
  decode (DECODE=True): no align step; program ``p`` owns the slot of pair ``p`` if ``p`` is that slot's
    first pair, and computes all pairs of the slot at once (up to BLOCK_M = pow2 >= T*k rows, masked), so
    each needed expert's weights are read once and the work is split over N only;
  prefill (DECODE=False): program ``m`` takes block ``m`` of the aligned layout (`kernels.align`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation codes (constexpr); `moe.ACTIVATION_CODES` maps `ExpertFormat.activation` to these.
SILU: tl.constexpr = tl.constexpr(0)
GELU: tl.constexpr = tl.constexpr(1)
GELU_TANH: tl.constexpr = tl.constexpr(2)
RELU: tl.constexpr = tl.constexpr(3)
GPT_OSS: tl.constexpr = tl.constexpr(4)

# Weight formats (constexpr), `prophet.formats.KERNEL_CODES`.
DENSE: tl.constexpr = tl.constexpr(0)
INT8: tl.constexpr = tl.constexpr(1)
INT4: tl.constexpr = tl.constexpr(2)
FP8: tl.constexpr = tl.constexpr(3)
MXFP4: tl.constexpr = tl.constexpr(4)


@triton.jit
def _group_rows(slot_ptr, sorted_ptr, block_slot_ptr, num_pairs, DECODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """(slot, pair [BLOCK_M], valid [BLOCK_M], active: 0 or 1) of this program's group."""
    pid_m = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    if DECODE:
        slots = tl.load(slot_ptr + rows, mask=rows < num_pairs, other=-1)  # [BLOCK_M] slot of every pair
        slot = tl.load(slot_ptr + pid_m)
        first = tl.min(tl.where(slots == slot, rows, BLOCK_M), axis=0)
        active = (first == pid_m).to(tl.int32)
        pair = rows
        valid = slots == slot
    else:
        slot = tl.load(block_slot_ptr + pid_m)
        active = (slot >= 0).to(tl.int32)
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + rows)
        valid = pair < num_pairs
    return slot.to(tl.int64), pair, valid, active


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; fp32 operands use exact fp32 products (not tf32) so they match the reference."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_weight(w_ptr, s_ptr, rows, cols, mask, stride_wn, stride_sn,
                 WFMT: tl.constexpr, SB_ROWS: tl.constexpr, SB_COLS: tl.constexpr):
    """Tile ``w[rows, cols]`` of one slot (``w_ptr``/``s_ptr`` at the slot): dense as stored, else fp32 values x
    scales, one scale per ``SB_ROWS x SB_COLS`` block. ``rows`` and ``cols`` broadcast to the tile's shape."""
    if WFMT == DENSE:
        w = tl.load(w_ptr + rows * stride_wn + cols, mask=mask, other=0.0)
    else:
        if WFMT == INT4 or WFMT == MXFP4:
            byte = tl.load(w_ptr + rows * stride_wn + cols // 2, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((cols % 2) * 4)) & 15  # the even column in the low nibble
        else:
            code = tl.load(w_ptr + rows * stride_wn + cols, mask=mask, other=0).to(tl.int32)  # int8 loads signed
        scale = tl.load(s_ptr + (rows // SB_ROWS) * stride_sn + cols // SB_COLS, mask=mask, other=0).to(tl.float32)
        if WFMT == INT8:
            w = code.to(tl.float32) * scale
        elif WFMT == INT4:
            w = (code - 8).to(tl.float32) * scale
        elif WFMT == FP8:
            exp = (code >> 3) & 15  # e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits
            man = (code & 7).to(tl.float32)
            mag = tl.where(exp == 0, man * 0.001953125, (8.0 + man) * tl.exp2((exp - 10).to(tl.float32)))
            w = tl.where(code >= 128, -mag, mag) * scale
        else:
            exp = (code >> 1) & 3  # e2m1: sign, 2 exponent bits (bias 1), 1 mantissa bit; scale is e8m0
            man = (code & 1).to(tl.float32)
            mag = tl.where(exp == 0, man * 0.5, (2.0 + man) * tl.exp2((exp - 2).to(tl.float32)))
            w = tl.where(code >= 8, -mag, mag) * tl.exp2(scale - 127.0)
    return w


@triton.jit
def _activate(g, ACT: tl.constexpr):
    """Elementwise activation in fp32 (gpt_oss is handled by the caller: it needs gate and up)."""
    if ACT == SILU:
        out = g * tl.sigmoid(g)
    elif ACT == GELU:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == GELU_TANH:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = g * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    else:
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def gate_up_kernel(
    x_ptr,  # hidden [T, H]
    w_ptr,  # w1 [S, N1, H] (quantized: [S, N1, H bytes]), inner stride 1
    s_ptr,  # w1 scales [S, N1/SB_ROWS, H/SB_COLS] (unused when dense)
    b_ptr,  # b1 [S, N1] (unused without HAS_BIAS)
    act_ptr,  # out: act [P, I], activation dtype
    slot_ptr,  # slot ids [P]
    sorted_ptr,  # prefill: sorted pairs [NB*BLOCK_M]
    block_slot_ptr,  # prefill: slot per block [NB]
    num_pairs,
    top_k,
    inter,  # I: act width (gate rows [0, I), up rows [I, 2I) when GLU)
    hidden,  # H: reduction length
    stride_xt,
    stride_ws,
    stride_wn,
    stride_ss,
    stride_sn,
    stride_bs,
    stride_at,
    limit,
    alpha,
    DECODE: tl.constexpr,
    GLU: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    WFMT: tl.constexpr,
    SB_ROWS: tl.constexpr,
    SB_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """act[pair, n] = act(x[token] @ w1[slot, n].T (+ b1)) for one group of pairs and BLOCK_N columns of I."""
    slot, pair, valid, active = _group_rows(slot_ptr, sorted_ptr, block_slot_ptr, num_pairs, DECODE, BLOCK_M)
    if active == 0:
        return
    token = (pair // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_slot = w_ptr + slot * stride_ws
    s_slot = s_ptr + slot * stride_ss
    rows = offs_n[None, :]  # [1, BLOCK_N] gate rows; up rows are inter further
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k < hidden - k0
        x = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        cols = k0 + offs_k[:, None]  # [BLOCK_K, 1]
        g = _load_weight(w_slot, s_slot, rows, cols, w_mask, stride_wn, stride_sn, WFMT, SB_ROWS, SB_COLS)
        acc_g = _mma(x, g.to(x.dtype), acc_g, IEEE)
        if GLU:
            u = _load_weight(w_slot, s_slot, rows + inter, cols, w_mask, stride_wn, stride_sn, WFMT, SB_ROWS, SB_COLS)
            acc_u = _mma(x, u.to(x.dtype), acc_u, IEEE)
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        b_row = b_ptr + slot * stride_bs + offs_n
        acc_g += tl.load(b_row, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_u += tl.load(b_row + inter, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GLU:
        if ACT == GPT_OSS:
            gate = tl.minimum(acc_g, limit)
            up = tl.minimum(tl.maximum(acc_u, -limit), limit)
            out = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
        else:
            out = _activate(acc_g, ACT) * acc_u
    else:
        out = _activate(acc_g, ACT)
    a_ptrs = act_ptr + pair.to(tl.int64)[:, None] * stride_at + offs_n[None, :]
    tl.store(a_ptrs, out.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def down_kernel(
    a_ptr,  # act [P, I]
    w_ptr,  # w2 [S, H, I] (quantized: [S, H, I bytes]), inner stride 1
    s_ptr,  # w2 scales [S, H/SB_ROWS, I/SB_COLS] (unused when dense)
    b_ptr,  # b2 [S, H] (unused without HAS_BIAS)
    rw_ptr,  # router weights [P]
    y_ptr,  # out: y [SPLIT_K, P, H] fp32
    slot_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_pairs,
    hidden,  # H: output width
    inter,  # I: reduction length
    k_chunk,  # reduction length per split, a multiple of BLOCK_K
    stride_at,
    stride_ws,
    stride_wn,
    stride_ss,
    stride_sn,
    stride_bs,
    stride_ys,
    stride_yp,
    DECODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    WFMT: tl.constexpr,
    SB_ROWS: tl.constexpr,
    SB_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[split, pair, n] = router_weight[pair] * (act[pair, chunk] @ w2[slot, n, chunk].T (+ b2 in split 0))."""
    slot, pair, valid, active = _group_rows(slot_ptr, sorted_ptr, block_slot_ptr, num_pairs, DECODE, BLOCK_M)
    if active == 0:
        return
    split = tl.program_id(2)
    k_lo = split * k_chunk
    k_hi = tl.minimum(inter, k_lo + k_chunk)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair.to(tl.int64)[:, None] * stride_at + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_slot = w_ptr + slot * stride_ws
    s_slot = s_ptr + slot * stride_ss
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_mask = offs_k < k_hi - k0 + k_lo
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        cols = (offs_k + (k0 - k_lo))[:, None]  # [BLOCK_K, 1]
        w = _load_weight(w_slot, s_slot, offs_n[None, :], cols, k_mask[:, None] & n_mask[None, :], stride_wn, stride_sn,
                         WFMT, SB_ROWS, SB_COLS)
        acc = _mma(a, w.to(a.dtype), acc, IEEE)
        a_ptrs += BLOCK_K
    if HAS_BIAS:
        bias = tl.load(b_ptr + slot * stride_bs + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]  # the bias once, in the first split
    scale = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_M]
    y_ptrs = y_ptr + split * stride_ys + pair.to(tl.int64)[:, None] * stride_yp + offs_n[None, :]
    tl.store(y_ptrs, acc * scale[:, None], mask=valid[:, None] & n_mask[None, :])


@triton.jit
def sum_pairs_kernel(
    y_ptr,  # y [SPLIT_K, P, H] fp32
    out_ptr,  # out [T, H]
    top_k,
    hidden,
    stride_ys,
    stride_yp,
    stride_ot,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[t] = sum over splits, then over j < k in order, of y[split, t*k + j]: deterministic, no atomics."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        for j in range(0, top_k):
            acc += tl.load(y_ptr + split * stride_ys + (t * top_k + j) * stride_yp + offs_n, mask=n_mask, other=0.0)
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def align_kernel(
    slot_ptr,  # slot ids [P]
    counts_ptr,  # scratch [S] int32: pairs per slot
    rank_ptr,  # scratch [P] int32: row of each pair inside its slot's group
    end_ptr,  # scratch [S] int32: end row of each slot's padded group
    sorted_ptr,  # out: sorted pairs [NB*BLOCK_M] int32
    block_slot_ptr,  # out: slot of each block [NB] int32
    num_pairs,
    num_slots,
    num_blocks,
    search_steps,  # ceil(log2(S + 1)): binary-search steps over the S group ends
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """The layout of `kernels.align.align_pairs_reference` in one program (grid (1,)), so the prefill path
    costs one launch instead of some thirty small PyTorch ops. Ranks come from atomic counters, so the order
    of pairs inside a group may vary between runs; every row is computed independently, so results do not."""
    offs = tl.arange(0, CHUNK)
    for s0 in range(0, num_slots, CHUNK):
        tl.store(counts_ptr + s0 + offs, tl.zeros((CHUNK,), dtype=tl.int32), mask=s0 + offs < num_slots)
    rows = num_blocks * BLOCK_M
    for r0 in range(0, rows, CHUNK):
        tl.store(sorted_ptr + r0 + offs, tl.full((CHUNK,), num_pairs, tl.int32), mask=r0 + offs < rows)
    tl.debug_barrier()
    for p0 in range(0, num_pairs, CHUNK):
        pair = p0 + offs
        mask = pair < num_pairs
        slot = tl.load(slot_ptr + pair, mask=mask, other=0)
        tl.store(rank_ptr + pair, tl.atomic_add(counts_ptr + slot, 1, mask=mask), mask=mask)
    tl.debug_barrier()
    carry = tl.sum(tl.zeros((CHUNK,), dtype=tl.int32), axis=0)
    for s0 in range(0, num_slots, CHUNK):
        mask = s0 + offs < num_slots
        padded = (tl.load(counts_ptr + s0 + offs, mask=mask, other=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        tl.store(end_ptr + s0 + offs, carry + tl.cumsum(padded, axis=0), mask=mask)
        carry += tl.sum(padded, axis=0)
    tl.debug_barrier()
    for p0 in range(0, num_pairs, CHUNK):
        pair = p0 + offs
        mask = pair < num_pairs
        slot = tl.load(slot_ptr + pair, mask=mask, other=0)
        padded = (tl.load(counts_ptr + slot, mask=mask, other=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.load(end_ptr + slot, mask=mask, other=0) - padded
        tl.store(sorted_ptr + start + tl.load(rank_ptr + pair, mask=mask, other=0), pair, mask=mask)
    for b0 in range(0, num_blocks, CHUNK):
        block = b0 + offs
        row = block * BLOCK_M
        lo = tl.zeros((CHUNK,), dtype=tl.int32)  # lower bound: the first slot whose group ends after `row`
        hi = tl.full((CHUNK,), num_slots, tl.int32)
        for _ in range(search_steps):
            searching = lo < hi
            mid = (lo + hi) // 2
            right = tl.load(end_ptr + mid, mask=searching, other=0) <= row
            lo = tl.where(searching & right, mid + 1, lo)
            hi = tl.where(searching & ~right, mid, hi)
        tl.store(block_slot_ptr + block, tl.where(lo < num_slots, lo, -1), mask=block < num_blocks)
