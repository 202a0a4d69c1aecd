"""Pure memory planner: GPU bytes -> resident non-expert weights, KV cache, workspace, and expert slots.

Offloading frees the GPU memory that the experts would occupy; the planner shows where it goes. Everything
here is arithmetic on a `ModelSpec` (nothing is allocated, no GPU is needed), so an 80 GB plan is tested on a
laptop. The only impure helper is `detect_gpu` (pynvml), which callers use to pick the ``gpu`` argument.

Budget, in bytes::

    expert budget = gpu_bytes - non_expert_weights - kv(batch x ctx) - workspace
    expert_slots  = min(all experts, expert budget // one expert)

``workspace`` (see `workspace_breakdown`) = CUDA context + allocator slack + activations of the largest step:

- CUDA context: `CUDA_CONTEXT_BYTES`, memory that NVML counts in the device total but PyTorch's allocator never
  gets: the driver's reserve, the CUDA context and cuBLAS workspaces. Measured on an H100 80GB HBM3: NVML
  reports 1.22 GB used after the first bf16 matmul, less the 69 MB PyTorch reserved; rounded up to 1.25 GiB
  for Triton's modules.
- allocator slack: `ALLOCATOR_SLACK` of the device memory, for fragmentation of PyTorch's caching allocator.
- activations: one step of ``max(batch, min(ctx, prefill_chunk))`` tokens (prefill is chunked to a token
  budget, as vLLM's ``max_num_batched_tokens``), each holding ``8 x hidden`` activations (residual, norm,
  q/k/v, attention output) and its ``top_k`` experts' ``3 x moe_intermediate`` (gate/up and activation) in
  the activation dtype, plus float32 logits and their softmax for the last token of each sequence.
  Attention scores are not counted: SDPA / flash attention never materialise them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prophet.errors import PlanError
from prophet.formats import expert_nbytes, weight_format
from prophet.models.adapter import MoELayer
from prophet.models.registry import get_spec
from prophet.models.spec import ModelSpec

logger = logging.getLogger(__name__)

GiB = 1 << 30
CUDA_CONTEXT_BYTES = 1280 << 20
ALLOCATOR_SLACK = 0.03
PREFILL_CHUNK = 2048
DEFAULT_GPU = "h100-sxm"

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "float8_e5m2": torch.float8_e5m2,
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8_e5m2"}

def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a short name (``bf16``, ``fp16``, ``fp32``, ``fp8``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise PlanError(f"dtype {dtype!r} is unknown; use one of {', '.join(sorted(_DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- GPU memory ------------------------------------------------------------------------------------------------


def gpu_profiles() -> dict[str, int]:
    """Named hardware profiles (`prophet.hardware`'s, the one source of them) and their device memory in bytes."""
    from prophet.hardware import get_profile, list_profiles

    return {name: int(get_profile(name).hbm_bytes) for name in list_profiles()}


def profile_bytes(name: str) -> int:
    """Device memory of a named hardware profile; `PlanError` naming the known ones otherwise."""
    profiles = gpu_profiles()
    if name not in profiles:
        raise PlanError(f"unknown GPU profile {name!r}; use one of {', '.join(sorted(profiles))} or give bytes")
    return profiles[name]


def detect_gpu(index: int = 0) -> tuple[str, int] | None:
    """``(device name, total bytes)`` of NVIDIA GPU ``index`` from NVML, or None when there is none."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    return (name.decode() if isinstance(name, bytes) else name), total


def resolve_gpu(gpu: int | str | None) -> tuple[str, int]:
    """``(name, bytes)`` for bytes, a profile name, or None (the detected GPU, else `DEFAULT_GPU`)."""
    if gpu is None:
        found = detect_gpu()
        return found if found is not None else (DEFAULT_GPU, profile_bytes(DEFAULT_GPU))
    if isinstance(gpu, str):
        return gpu, profile_bytes(gpu)
    if gpu <= 0:
        raise PlanError(f"gpu_bytes={gpu}: give the device memory in bytes (e.g. 80 * 2**30) or a profile name")
    return f"{gpu / GiB:.1f} GiB", gpu


# -- the plan --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs of a model, in bytes of its weight dtype: from a `ModelSpec` (``of_spec``) or
    measured on a live model (`prophet.wrap`)."""

    name: str
    weight_dtype: torch.dtype
    non_expert_bytes: int
    expert_bytes: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    vocab_size: int
    context_length: int  # trained context; longer needs RoPE scaling
    kv_bytes: Callable[[int, torch.dtype, int], int]  # (ctx, kv dtype, batch) -> bytes

    @classmethod
    def of_spec(cls, spec: ModelSpec, weight_dtype: torch.dtype | str = torch.bfloat16,
                expert_dtype: str | None = None) -> ModelSizes:
        """Sizes of ``spec`` in ``weight_dtype``; ``expert_dtype`` (a `prophet.formats.weight_format` name such
        as "int4", "fp8", "mxfp4" or "int3") stores the routed experts in that format, scales included."""
        wdt = as_dtype(weight_dtype)
        experts = spec.expert_bytes(wdt) if expert_dtype is None else expert_nbytes(
            spec.expert_format, weight_format(expert_dtype))
        return cls(
            name=spec.name, weight_dtype=wdt, non_expert_bytes=spec.non_expert_bytes(wdt),
            expert_bytes=experts, num_moe_layers=spec.num_moe_layers, num_experts=spec.num_experts,
            top_k=spec.top_k, hidden_size=spec.hidden_size, moe_intermediate_size=spec.moe_intermediate_size,
            vocab_size=spec.vocab_size, context_length=spec.context_length, kv_bytes=spec.kv_bytes,
        )


def _sizes(model: ModelSpec | ModelSizes | str, weight_dtype: torch.dtype | str,
           expert_dtype: str | None = None) -> ModelSizes:
    if isinstance(model, ModelSizes):
        return model
    return ModelSizes.of_spec(get_spec(model) if isinstance(model, str) else model, weight_dtype, expert_dtype)


def workspace_breakdown(
    model: ModelSpec | ModelSizes, gpu_bytes: int, ctx: int, batch: int,
    weight_dtype: torch.dtype = torch.bfloat16, prefill_chunk: int = PREFILL_CHUNK,
) -> dict[str, int]:
    """The reserve that is neither weights nor KV: see the module docstring for the formula."""
    m = _sizes(model, weight_dtype)
    act = 4 if m.weight_dtype == torch.float32 else 2  # fp8/bf16 weights compute in bf16
    tokens = max(batch, min(ctx, prefill_chunk))
    per_token = act * (8 * m.hidden_size + 3 * m.top_k * m.moe_intermediate_size)
    logits = batch * m.vocab_size * 4 * 2
    return {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "allocator_slack": int(ALLOCATOR_SLACK * gpu_bytes),
        "activations": tokens * per_token + logits,
    }


@dataclass(frozen=True)
class Plan:
    """Where one GPU's memory goes for one model, context and batch; every size in bytes."""

    model: str
    gpu: str
    gpu_bytes: int
    ctx: int
    batch: int
    weight_dtype: str
    kv_dtype: str
    trained_context: int
    non_expert_bytes: int
    kv_bytes: int
    workspace: dict[str, int]
    expert_bytes: int  # one expert, the unit the cache moves
    num_moe_layers: int
    experts_per_layer: int
    expert_slots: int
    warnings: tuple[str, ...] = ()
    expert_dtype: str = ""  # how experts are stored when it differs from weight_dtype (e.g. "int4")
    host: HostTerms | None = None  # what computing misses on the host needs (on_miss "auto" / "host")

    @property
    def workspace_bytes(self) -> int:
        return sum(self.workspace.values())

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.experts_per_layer

    @property
    def expert_slot_bytes(self) -> int:
        return self.expert_slots * self.expert_bytes

    @property
    def slots_share(self) -> float:
        """Fraction of all experts that are GPU-resident at once."""
        return self.expert_slots / self.total_experts

    @property
    def slots_per_layer(self) -> int:
        """Slots each MoE layer gets when the pool is split evenly (``slots_per_layer=`` in `prophet.wrap`)."""
        return self.expert_slots // self.num_moe_layers

    @property
    def fits_all_resident(self) -> bool:
        return self.expert_slots == self.total_experts

    @property
    def free_bytes(self) -> int:
        """Device memory left after everything above (less than one expert unless all experts fit)."""
        return self.gpu_bytes - self.non_expert_bytes - self.kv_bytes - self.workspace_bytes - self.expert_slot_bytes

    @property
    def needs_rope_scaling(self) -> bool:
        return self.ctx > self.trained_context

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["warnings"] = list(self.warnings)
        for name in ("workspace_bytes", "total_experts", "expert_slot_bytes", "slots_share", "slots_per_layer",
                     "fits_all_resident", "free_bytes", "needs_rope_scaling"):
            out[name] = getattr(self, name)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def table(self) -> str:
        """A two-column table of the plan, in GiB, followed by its warnings."""
        def gib(n: int) -> str:
            return f"{n / GiB:8.2f} GiB"

        ws = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.workspace.items())
        rows = [
            ("model", f"{self.model} ({self.weight_dtype} weights"
                      + (f", {self.expert_dtype} experts)" if self.expert_dtype else ")")),
            ("gpu", f"{self.gpu}: {gib(self.gpu_bytes).strip()}"),
            ("context x batch", f"{self.ctx} x {self.batch} ({self.kv_dtype} KV; trained for {self.trained_context})"),
            ("non-expert weights", gib(self.non_expert_bytes)),
            ("KV cache", gib(self.kv_bytes)),
            ("workspace", f"{gib(self.workspace_bytes)}  ({ws})"),
            ("expert slots", f"{gib(self.expert_slot_bytes)}  {self.expert_slots} of {self.total_experts} "
                             f"experts ({self.slots_share:.0%}), {self.expert_bytes / 2**20:.1f} MiB each"),
            ("free", gib(self.free_bytes)),
            ("all experts resident", "yes" if self.fits_all_resident else "no"),
        ]
        if self.host is not None:
            rows.append(("host (hybrid)", self.host.summary()))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def __str__(self) -> str:
        return self.table()


def _budget(m: ModelSizes, gpu_bytes: int, ctx: int, batch: int, kvdt: torch.dtype,
            workspace_bytes: int | None, prefill_chunk: int) -> tuple[int, int, dict[str, int]]:
    """``(bytes left for experts, kv bytes, workspace)``."""
    kv = m.kv_bytes(ctx, kvdt, batch)
    ws = ({"reserved": workspace_bytes} if workspace_bytes is not None
          else workspace_breakdown(m, gpu_bytes, ctx, batch, prefill_chunk=prefill_chunk))
    return gpu_bytes - m.non_expert_bytes - kv - sum(ws.values()), kv, ws


def _largest(fits: Any, lo: int, hi: int) -> int:
    """Largest ``n`` in ``[lo, hi]`` with ``fits(n)`` for a monotone ``fits`` (``lo - 1`` when none)."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_context(
    model: ModelSpec | ModelSizes | str, gpu: int | str, batch: int = 1, weight_dtype: torch.dtype | str = torch.bfloat16,
    kv_dtype: torch.dtype | str = torch.bfloat16, min_slots: int | None = None,
    workspace_bytes: int | None = None, prefill_chunk: int = PREFILL_CHUNK, limit: int = 1 << 31,
) -> int:
    """Longest context (up to ``limit``) that leaves ``min_slots`` expert slots (default ``top_k``); 0 if none."""
    m = _sizes(model, weight_dtype)
    _, gpu_bytes = resolve_gpu(gpu)
    kvdt = as_dtype(kv_dtype)
    need = (m.top_k if min_slots is None else min_slots) * m.expert_bytes
    return max(0, _largest(
        lambda c: _budget(m, gpu_bytes, c, batch, kvdt, workspace_bytes, prefill_chunk)[0] >= need,
        1, limit,
    ))


def plan(
    model: ModelSpec | ModelSizes | str,
    gpu: int | str,
    ctx: int,
    batch: int = 1,
    weight_dtype: torch.dtype | str = torch.bfloat16,
    kv_dtype: torch.dtype | str = torch.bfloat16,
    workspace_bytes: int | None = None,
    min_slots: int | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    expert_dtype: str | None = None,
    on_miss: str = "copy",
    host_threads: int | None = None,
    hardware: Any = None,
) -> Plan:
    """Split ``gpu`` (bytes or a profile name) among resident weights, KV for ``batch x ctx``, workspace, slots.

    ``model`` is a registry name, a `ModelSpec` (sized in ``weight_dtype``) or `ModelSizes` (its own dtype).
    ``workspace_bytes`` replaces the reserve formula with a fixed reserve. The plan needs at least
    ``min_slots`` expert slots (default ``top_k``: one token's experts of one layer must be resident together);
    with fewer, `PlanError` says what would fit (shorter context, fp8 KV, smaller batch, a bigger GPU).
    ``expert_dtype`` sizes the slots for quantized experts (see `ModelSizes.of_spec`).
    With ``on_miss`` "auto" or "host" the plan also states what computing misses on the host needs (`HostTerms`,
    from ``host_threads`` and the ``hardware`` profile, default the GPU's or `DEFAULT_GPU`'s): a warning when
    it would not beat copying them, `PlanError` for "host", which never copies.
    """
    m = _sizes(model, weight_dtype, expert_dtype)
    gpu_name, gpu_bytes = resolve_gpu(gpu)
    kvdt = as_dtype(kv_dtype)
    if ctx < 1 or batch < 1:
        raise PlanError(f"ctx={ctx}, batch={batch}: both must be at least 1")
    if workspace_bytes is not None and workspace_bytes < 0:
        raise PlanError(f"workspace_bytes={workspace_bytes}: give a reserve of zero or more bytes")
    min_slots = m.top_k if min_slots is None else min_slots
    one = m.expert_bytes
    total = m.num_moe_layers * m.num_experts
    budget, kv, ws = _budget(m, gpu_bytes, ctx, batch, kvdt, workspace_bytes, prefill_chunk)
    slots = min(total, max(0, budget) // one)
    args = (m, gpu_name, gpu_bytes, ctx, batch, kvdt, workspace_bytes, prefill_chunk, min_slots)
    if slots < min_slots:
        raise PlanError(_cannot_fit(*args, short=min_slots * one - budget))
    warnings: tuple[str, ...] = ()
    if ctx > m.context_length:
        warnings = (
            f"ctx={ctx} exceeds {m.name}'s trained context of {m.context_length} tokens: "
            "it needs RoPE scaling (e.g. YaRN) to stay accurate",
        )  # returned, not logged: a pure planner; its callers say it once (wrap logs it, the CLI prints it)
    result = Plan(
        model=m.name, gpu=gpu_name, gpu_bytes=gpu_bytes, ctx=ctx, batch=batch,
        weight_dtype=dtype_name(m.weight_dtype), kv_dtype=dtype_name(kvdt), trained_context=m.context_length,
        non_expert_bytes=m.non_expert_bytes, kv_bytes=kv, workspace=ws, expert_bytes=one,
        num_moe_layers=m.num_moe_layers, experts_per_layer=m.num_experts, expert_slots=slots,
        warnings=warnings, expert_dtype=expert_dtype or "",
    )
    if on_miss == "copy":
        return result
    if on_miss not in ("auto", "host"):
        raise PlanError(f"on_miss={on_miss!r}: use 'copy', 'auto' or 'host'")
    terms = host_terms(result, m.top_k, hardware if hardware is not None else (
        gpu_name if gpu_name in gpu_profiles() else DEFAULT_GPU), host_threads)
    if not terms.pays and on_miss == "host":
        raise PlanError(f"on_miss='host' never copies, but {terms.verdict()}")
    extra = () if terms.pays else (f"on_miss='auto' will mostly copy: {terms.verdict()}",)
    return dataclasses.replace(result, host=terms, warnings=result.warnings + extra)


# -- what hybrid execution needs of the host ------------------------------------------------------------------

PER_THREAD_GB_S = 10.0  # streaming read of one host thread: 8-12 GB/s per core measured here (host_experts_bench)
HOST_KERNEL_SHARE = 0.8  # share of the read bandwidth the host expert kernel streams at (issue 17 target)


@dataclass(frozen=True)
class HostTerms:
    """What computing a plan's misses on the host needs, at batch 1 (decode): host threads and host memory
    bandwidth, not device memory. Misses per token are estimated as if routing were uniform (a token's expert is
    resident with the pool's share of all experts); skewed real routing and prefetch miss less."""

    threads: int  # host threads that compute experts
    host_gb_s: float  # the host's read bandwidth (profile or calibration)
    usable_gb_s: float  # what ``threads`` can stream of it, at the kernel's share
    misses_per_token: float  # experts not resident per decoded token, all MoE layers
    expert_bytes: int
    host_s_per_token: float  # those misses computed on the host: their bytes / usable bandwidth
    copy_s_per_token: float  # the same misses copied over the link instead
    needed_gb_s: float  # host bandwidth at which computing them takes as long as copying them
    needed_threads: int  # threads that stream ``needed_gb_s``

    @property
    def pays(self) -> bool:
        """Whether computing misses on the host is sooner than copying them."""
        return self.misses_per_token == 0 or self.host_s_per_token < self.copy_s_per_token

    @property
    def bandwidth_share(self) -> float:
        """Share of the host's read bandwidth that hybrid needs to beat copying."""
        return self.needed_gb_s / self.host_gb_s

    def summary(self) -> str:
        return (f"{self.threads} threads, {self.misses_per_token:.1f} misses/token: {self.host_s_per_token * 1e3:.1f} "
                f"ms/token on the host vs {self.copy_s_per_token * 1e3:.1f} copying; needs {self.needed_gb_s:.0f} "
                f"GB/s ({self.bandwidth_share:.0%} of {self.host_gb_s:.0f}), {self.needed_threads} threads")

    def verdict(self) -> str:
        return (f"computing the misses on {self.threads} host threads takes {self.host_s_per_token * 1e3:.1f} ms "
                f"per token against {self.copy_s_per_token * 1e3:.1f} ms copying them; it needs "
                f"{self.needed_gb_s:.0f} GB/s of host bandwidth ({self.needed_threads} threads, host_threads=) "
                f"where the host has {self.host_gb_s:.0f} GB/s; use on_miss='copy', or more host threads")


def host_terms(p: Plan, top_k: int, hardware: Any, threads: int | None = None) -> HostTerms:
    """`HostTerms` of plan ``p`` for a model routing ``top_k`` experts per token, on ``hardware`` (a
    `prophet.hardware` profile or its name), with ``threads`` host threads (None: this host's default)."""
    from prophet.hardware import get_profile
    from prophet.host_experts import default_threads

    hw = get_profile(hardware)
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise PlanError(f"host_threads={threads}: give at least one host thread for on_miss 'auto' or 'host'")
    misses = p.num_moe_layers * top_k * (1 - p.slots_share)
    usable = min(hw.host_gb_s, threads * PER_THREAD_GB_S) * HOST_KERNEL_SHARE * 1e9
    copy_s = misses * hw.copy_seconds(p.expert_bytes)
    needed = p.expert_bytes / hw.copy_seconds(p.expert_bytes) / HOST_KERNEL_SHARE / 1e9  # GB/s read to keep up
    return HostTerms(threads=threads, host_gb_s=hw.host_gb_s, usable_gb_s=usable / 1e9, misses_per_token=misses,
                     expert_bytes=p.expert_bytes, host_s_per_token=misses * p.expert_bytes / usable,
                     copy_s_per_token=copy_s, needed_gb_s=needed,
                     needed_threads=max(1, math.ceil(needed / PER_THREAD_GB_S)))


def _cannot_fit(m: ModelSizes, gpu_name: str, gpu_bytes: int, ctx: int, batch: int, kvdt: torch.dtype, workspace_bytes: int | None, prefill_chunk: int, min_slots: int,
                short: int) -> str:
    """One line: what does not fit, by how much, and every change that would make it fit."""
    need = min_slots * m.expert_bytes

    def fits(c: int, b: int, kd: torch.dtype, g: int) -> bool:
        return _budget(m, g, c, b, kd, workspace_bytes, prefill_chunk)[0] >= need

    fixes = []
    best_ctx = _largest(lambda c: fits(c, batch, kvdt, gpu_bytes), 1, ctx)
    if best_ctx >= 1:
        fixes.append(f"ctx <= {best_ctx}")
    fp8 = torch.float8_e4m3fn
    if _dtype_size(kvdt) > 1:
        fp8_ctx = _largest(lambda c: fits(c, batch, fp8, gpu_bytes), 1, ctx)
        if fp8_ctx == ctx:
            fixes.append("fp8 KV (kv_dtype='fp8')")
        elif fp8_ctx >= 1:
            fixes.append(f"fp8 KV with ctx <= {fp8_ctx}")
    if batch > 1:
        best_batch = _largest(lambda b: fits(ctx, b, kvdt, gpu_bytes), 1, batch)
        if best_batch >= 1:
            fixes.append(f"batch <= {best_batch}")
    # the slack grows with the device, so solve for the smallest device that fits instead of adding ``short``
    bigger = _largest(lambda g: not fits(ctx, batch, kvdt, g), gpu_bytes, 1 << 50) + 1
    larger = sorted((b, n) for n, b in gpu_profiles().items() if b >= bigger)
    fixes.append(f"a GPU with >= {bigger / GiB:.1f} GiB" + (f" (e.g. {larger[0][1]})" if larger else ""))
    size = f"{gpu_bytes / GiB:.1f} GiB"
    where = gpu_name if gpu_name == size else f"{gpu_name} ({size})"
    return (
        f"{m.name} at ctx={ctx} x batch={batch} with {dtype_name(kvdt)} KV does not fit on {where}: "
        f"{short / GiB:.2f} GiB short of {min_slots} expert slots; "
        f"fixes: {'; '.join(fixes)}"
    )


# -- a live model's sizes ----------------------------------------------------------------------------------------


def _kv_bytes_fn(model_config: Any) -> Callable[[int, torch.dtype, int], int]:
    """KV bytes of the transformers `StaticCache` for this config, counted from its layers without allocating."""
    from transformers import StaticCache

    text = model_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    k_dim = getattr(text, "qk_nope_head_dim", 0) + getattr(text, "qk_rope_head_dim", 0) or head_dim  # MLA
    v_dim = getattr(text, "v_head_dim", None) or head_dim

    def kv_bytes(ctx: int, dtype: torch.dtype, batch: int) -> int:
        slots = sum(layer.max_cache_len for layer in StaticCache(config=model_config, max_cache_len=ctx).layers)
        return batch * slots * kv_heads * (k_dim + v_dim) * torch.empty((), dtype=dtype).element_size()

    return kv_bytes


def model_sizes(model: nn.Module, layers: list[MoELayer], dtype: torch.dtype) -> ModelSizes:
    """The planner's view of a live model: its own parameter bytes, expert slab size and KV shape."""
    experts = {id(p) for layer in layers for p in layer.expert_parameters()}
    config = model.config
    text = config.get_text_config(decoder=True)
    rope = getattr(text, "rope_parameters", None) or {}
    trained = rope.get("original_max_position_embeddings") or getattr(text, "max_position_embeddings", None)
    return ModelSizes(
        name=type(model).__name__, weight_dtype=dtype,
        non_expert_bytes=sum(p.nbytes for p in model.parameters() if id(p) not in experts),
        expert_bytes=layers[0].fmt.nbytes(dtype), num_moe_layers=len(layers), num_experts=layers[0].num_experts,
        top_k=layers[0].top_k, hidden_size=layers[0].fmt.hidden_size,
        moe_intermediate_size=layers[0].fmt.intermediate_size, vocab_size=text.vocab_size,
        context_length=trained or 1 << 62, kv_bytes=_kv_bytes_fn(config),
    )
