"""Missed experts computed on the host CPU, straight from the host store's slabs, while the GPU runs the rest.

At batch 1 a missed expert sees about one token: reading its weights once from host DRAM (a few ms on a server
socket) beats copying them over PCIe. `HostExperts.submit` queues one layer's host experts and returns a
future at once; the work runs on CPU threads that release the GIL (ctypes kernel calls and torch ops), so the
Python thread goes on launching the resident experts on the GPU. The future's result (`HostResult`) holds the
host experts' weighted sum ``[T, H]`` fp32 on the CPU, which the caller copies to the device and adds to the
layer's output, and each expert's time, which feeds the costs the next decisions weigh.

Arithmetic per expert follows `prophet.models.adapter.expert_forward` with fp32 accumulation: ``h = w1 x + b1``
in fp32, the activation in fp32, ``a`` rounded to the weight dtype (as the eager model rounds it before the
down projection), ``y = w2 a + b2`` in fp32. Matrix products (`host_linear`):

    bf16, up to ``GEMV_MAX_TOKENS`` tokens, kernel built: `prophet.host_gemv` AVX2 kernel, output rows split
        over the threads (weights stream from DRAM once, at the read bandwidth)
    bf16, more tokens, a CPU with native bf16 (`native_bf16`; from 3 tokens on): torch's bf16 matmul, as the
        eager model computes it (bf16 products accumulated in fp32, each output rounded to bf16)
    bf16/fp16, more tokens otherwise: row tiles widened to fp32 and multiplied by torch (compute-bound there anyway)
    fp32: torch's fp32 matmul, rows split over the threads
    int8/int4 group-quantized, fp8 and mxfp4 stores, up to ``QUANT_MAX_TOKENS`` tokens, kernel built:
        `prophet.host_gemv.gemv_int_rows` / `gemv_fp8_rows` / `gemv_mxfp4_rows` read the stored bytes (values +
        scales, `QuantWeight`) and dequantize in registers to fp32 weights exactly as
        `prophet.formats.dequantize` gives them; the paths below (and the device kernels) round them to the
        compute dtype first, so in bf16 this one is the closer to the quantized weights, by at most that rounding
    quantized stores without the kernel (or past ``QUANT_MAX_TOKENS``): each expert dequantized by the format's
        reference (`HostStore.read_canonical`) to the compute dtype, then the dense path. Correct, but it reads
        and writes a dense copy.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prophet import envs, host_gemv
from prophet.errors import ConfigError, DtypeError
from prophet.formats import ExpertFormat
from prophet.store import HostStore

QUANT_MAX_TOKENS = 32  # the quantized kernels' time grows with tokens (from 2 tokens each row is dequantized once,
# then fp32 dot products, 4 tokens at a time), the reference path's hardly (experiments/results/host_experts_bench.json)
GEMV_MAX_TOKENS = 32  # the kernel re-widens weights per token pair; past this, widened tiles + torch matmul win (measured: the kernel is 1.5-3.6x faster up to 32 tokens)
# On a CPU that multiplies bf16 natively (AVX512-BF16, AMX), torch's bf16 matmul beats the kernel from 3 tokens on
# (kernel/torch 1.10x at 2 tokens, 0.94x at 4, 0.47x at 32: experiments/results/host_experts_bench.json)
NATIVE_GEMV_MAX_TOKENS = 2
TILE_ELEMENTS = 1 << 18  # weights widened to fp32 per tile (1 MiB: stays in L2)
ROW_ALIGN = 16  # thread row ranges start on multiples of this (whole cache lines of bf16 rows' starts)

@dataclass(frozen=True)
class QuantWeight:
    """A quantized weight matrix ``[N, K]`` as stored, for the host kernels: int8 ``[N, K]`` or int4 packed
    ``[N, ceil(K/2)]`` values with fp16 ``scales [N, ceil(K/group)]`` (``kind`` "int"), e4m3 ``[N, K]`` values
    with fp32 scales per ``block_rows x group`` block (``kind`` "fp8"), or packed e2m1 ``[N, ceil(K/2)]`` values
    with uint8 e8m0 ``scales [N, ceil(K/32)]`` (``kind`` "mxfp4")."""

    kind: str
    values: torch.Tensor
    scales: torch.Tensor
    block_rows: int
    group: int
    bits: int

    @property
    def rows(self) -> int:
        return self.values.shape[0]


def physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct physical cores among logical ``cpus`` (Linux sysfs topology; ``len(cpus)`` where it is missing):
    two SMT threads of one core share its load ports, so the second adds compute but no read bandwidth."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), from its flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", text) is not None


def default_threads() -> int:
    """``PROPHET_HOST_THREADS``, else the physical cores this process may run on (its affinity) minus one, for
    the Python thread that drives the GPU."""
    given = envs.host_threads()
    if given is not None:
        return given
    if hasattr(os, "sched_getaffinity"):
        return max(1, physical_cores(os.sched_getaffinity(0)) - 1)
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True)
class HostJob:
    """One expert's share of a layer step: which tokens it sees and with what router weight.

    tokens  int64 [n]    rows of the layer's hidden states
    weights fp32  [n]    router weight of this expert for each of those tokens
    """

    expert: int
    tokens: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class HostResult:
    """What a submitted layer returns.

    out      fp32 [T, H]   weighted sum of the host experts' outputs (zero rows for tokens they do not see)
    timings  (tokens, seconds) per expert, in job order: for `prophet.hybrid.RunningCosts.observe_host`
    """

    out: torch.Tensor
    timings: list[tuple[int, float]]


def jobs_for(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: Sequence[int]) -> list[HostJob]:
    """`HostJob` per expert of ``experts`` from a layer's routing (``[T, k]`` ids and weights, any device)."""
    idx, w = top_k_index.cpu(), top_k_weights.float().cpu()
    jobs = []
    for e in experts:
        t, j = (idx == e).nonzero(as_tuple=True)
        jobs.append(HostJob(int(e), t, w[t, j]))
    return jobs


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``[0, n)``, boundaries on multiples of ROW_ALIGN."""
    step = -(-n // parts)
    step = -(-step // ROW_ALIGN) * ROW_ALIGN
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class HostExperts:
    """Computes experts on ``threads`` CPU threads from ``store`` (any layer, any expert).

    A quantized store's experts are computed from their stored bytes by the kernel of their format (or, without
    it, dequantized by their format's reference first). Call `close` (or use as a
    context manager) to stop the threads.
    """

    def __init__(
        self,
        store: HostStore,
        threads: int | None = None,
        use_kernel: bool = True,
        native: bool | None = None,
    ) -> None:
        self.threads = threads if threads is not None else default_threads()
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads={threads!r}: give a positive number of host threads (or None to detect)")
        if not store.weights.runnable:
            raise DtypeError(f"host store holds {store.weights.name} experts, a width for modelling only; store "
                             "them as bf16, fp16, fp32, int8, int4, fp8 or mxfp4")
        self.store = store
        self.kernel = use_kernel and host_gemv.available()
        self.native = native_bf16() if native is None else native  # torch's bf16 matmul for bf16 tokens past 2
        self.gemv_max_tokens = NATIVE_GEMV_MAX_TOKENS if self.native else GEMV_MAX_TOKENS
        weights = store.weights
        self.quant_kernel = self.kernel and (weights.kind in ("fp8", "mxfp4")
                                             or (weights.kind == "int" and weights.block_rows == 1))
        self._workers = ThreadPoolExecutor(self.threads, thread_name_prefix="prophet-host")
        self._driver = ThreadPoolExecutor(1, thread_name_prefix="prophet-host-driver")  # orders layer jobs
        self._local = threading.local()  # per-thread fp32 tile for widened weights
        self._fields: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # slab views, made once per expert

    def __enter__(self) -> HostExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._driver.shutdown(wait=True)
        self._workers.shutdown(wait=True)

    # ---- the API the step calls ----------------------------------------------------------------------
    def submit(self, layer: int, hidden: torch.Tensor, jobs: Sequence[HostJob]) -> Future[HostResult]:
        """Start ``jobs`` of MoE layer ``layer`` on ``hidden [T, H]`` (CPU); returns a future of the weighted
        sum ``[T, H]`` fp32 (CPU) with per-expert timings. Jobs of successive submits run in order."""
        if hidden.device.type != "cpu":
            raise ConfigError(f"hidden is on {hidden.device}; copy the layer's tokens to the CPU before submit")
        return self._driver.submit(self.run, layer, hidden, list(jobs))

    def run(self, layer: int, hidden: torch.Tensor, jobs: Sequence[HostJob]) -> HostResult:
        """`submit`'s work, on the calling thread (its matrix products still use the worker threads)."""
        out = torch.zeros(hidden.shape, dtype=torch.float32)  # [T, H]
        x = hidden.float()
        timings = []
        for job in jobs:
            start = time.perf_counter()
            y = self.expert(layer, job.expert, x[job.tokens])  # [n, H]
            out.index_add_(0, job.tokens, y * job.weights[:, None])
            timings.append((len(job.tokens), time.perf_counter() - start))
        return HostResult(out, timings)

    def expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on ``x [n, H]`` fp32 -> ``[n, H]`` fp32."""
        fmt: ExpertFormat = self.store.fmt
        if self.quant_kernel and x.shape[0] <= QUANT_MAX_TOKENS:  # the stored bytes; biases are in the compute dtype
            t = self._stored(layer, expert)
            w1, w2 = self._quant_weight(t, "w1"), self._quant_weight(t, "w2")
        else:  # dense: the stored views; other formats: dequantized by their reference
            t = self.store.read_canonical(layer, expert) if self.store.weights.quantized else self._stored(layer, expert)
            w1, w2 = t["w1"], t["w2"]
        h = self.linear(w1, x)  # [n, N1]
        if fmt.has_bias:
            h += t["b1"].float()
        act = _activate(fmt, h).to(self.store.compute_dtype).float()  # rounded like the eager model's down input
        y = self.linear(w2, act)  # [n, H]
        if fmt.has_bias:
            y += t["b2"].float()
        return y

    def _stored(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's stored fields, made on first use: a decode step's torch calls between kernel
        calls each cost 50-250 us once the weights streamed through have evicted the interpreter's data."""
        key = (layer, expert)
        views = self._fields.get(key)
        if views is None:
            views = self._fields[key] = self.store.read(layer, expert)
        return views

    def _quant_weight(self, t: dict[str, torch.Tensor], name: str) -> QuantWeight:
        weights = self.store.weights
        block_rows, group = weights.block(*self.store.fmt.shapes[name])
        return QuantWeight(weights.kind, t[name], t[f"{name}_scale"], block_rows, group, int(weights.value_bits))

    # ---- matrix products -----------------------------------------------------------------------------
    def linear(self, w: torch.Tensor | QuantWeight, x: torch.Tensor) -> torch.Tensor:
        """``x [B, K] fp32 @ w [N, K].T -> [B, N] fp32``, output rows split over the worker threads."""
        x = x.contiguous()
        rows = w.values.shape[0] if isinstance(w, QuantWeight) else w.shape[0]
        y = torch.empty((x.shape[0], rows), dtype=torch.float32)
        if isinstance(w, QuantWeight) and w.kind == "fp8":
            part: Callable[[int, int], None] = lambda a, b: host_gemv.gemv_fp8_rows(  # noqa: E731
                w.values, w.scales, w.block_rows, w.group, x, y, a, b)
        elif isinstance(w, QuantWeight) and w.kind == "mxfp4":
            part = lambda a, b: host_gemv.gemv_mxfp4_rows(w.values, w.scales, x, y, a, b)  # noqa: E731
        elif isinstance(w, QuantWeight):
            part = lambda a, b: host_gemv.gemv_int_rows(  # noqa: E731
                w.values, w.scales, w.group, w.bits, x, y, a, b)
        elif w.dtype == torch.bfloat16 and self.kernel and x.shape[0] <= self.gemv_max_tokens and w.stride(1) == 1:
            part = lambda a, b: host_gemv.gemv_rows(w, x, y, a, b)  # noqa: E731
        elif w.dtype == torch.bfloat16 and self.native and torch.equal((xb := x.bfloat16()).float(), x):
            # tokens exact in bf16 (always so in a bf16 model): the product the eager model computes, in its dtype
            part = lambda a, b: y[:, a:b].copy_(F.linear(xb, w[a:b]))  # noqa: E731
        elif w.dtype == torch.float32:
            part = lambda a, b: torch.mm(x, w[a:b].T, out=y[:, a:b]) if x.shape[0] > 1 else y[:, a:b].copy_(  # noqa: E731
                F.linear(x, w[a:b]))
        else:
            part = lambda a, b: self._widened(w, x, y, a, b)  # noqa: E731
        ranges = _split(rows, self.threads)
        futures = [self._workers.submit(part, a, b) for a, b in ranges[1:]]
        part(*ranges[0])  # the calling thread takes the first range
        for f in futures:
            f.result()
        return y

    def _widened(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n0: int, n1: int) -> None:
        """Rows ``[n0, n1)`` by fp32 tiles of ``w``: widen a tile (stays in cache), multiply, next."""
        rows = max(1, TILE_ELEMENTS // w.shape[1])
        tile = getattr(self._local, "tile", None)
        if tile is None or tile.numel() < rows * w.shape[1]:
            tile = self._local.tile = torch.empty(rows * w.shape[1], dtype=torch.float32)
        for a in range(n0, n1, rows):
            b = min(a + rows, n1)
            t = tile[: (b - a) * w.shape[1]].view(b - a, w.shape[1])
            if self.kernel and w.dtype == torch.bfloat16 and w.is_contiguous():
                host_gemv.widen(w[a:b], t)  # torch's bf16->fp32 copy is 3-5x slower on AVX2 hosts
            else:
                t.copy_(w[a:b])
            y[:, a:b] = x @ t.T


def _activate(fmt: ExpertFormat, h: torch.Tensor) -> torch.Tensor:
    """The expert's activation on ``h [n, N1]`` (gate rows first when gated), as `expert_forward` applies it."""
    if not fmt.glu:
        return _ELEMENTWISE[fmt.activation](h)
    gate, up = h[:, : fmt.intermediate_size], h[:, fmt.intermediate_size :]
    if fmt.activation == "gpt_oss":
        gate = gate.clamp(max=fmt.swiglu_limit)
        up = up.clamp(min=-fmt.swiglu_limit, max=fmt.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * fmt.swiglu_alpha))
    return _ELEMENTWISE[fmt.activation](gate) * up


_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}
