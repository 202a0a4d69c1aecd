"""Measured decode for `prophet-bench`: a wrapped model generating tokens on a real device, timed.

Two kinds of model: a checkpoint (its own weights and routing), or random weights of a registry model's real
shape with each MoE layer's experts forced from a router trace (`prophet.routing`): the cache sees the trace's
routing at the real expert size, without the weights. The random model is built with no initialisation (the
experts' memory is never touched before the host store takes it), its non-expert weights are drawn on the
device and the store is filled in place, so the host holds one copy of the experts. A model whose experts do
not fit in host memory runs its first layers only, and says so.

`decode` runs one timed greedy decode (prefill, warm-up steps, timed steps) and returns what was measured;
`run_policies` repeats it for each cache policy over the same store (`prophet.wrap.reconfigure`), then, when
asked and when they fit, with every expert resident in the family's own modules (`prophet.unwrap`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from prophet.compat import decode_kwargs
from prophet.config import PrefetchConfig
from prophet.errors import ConfigError
from prophet.models.adapter import MoELayer
from prophet.models.spec import ModelSpec
from prophet.routing import ForcedRouting
from prophet.wrap import allocate_kv_cache, is_wrapped, reconfigure, runtime_of, unwrap, wrap

HOST_HEADROOM = 0.9  # share of the host's available memory a random model may plan to take
PROCESS_BYTES = 1 << 30  # Python, torch and transformers themselves, measured ~0.4 GiB; rounded up
INIT_STD = 0.02  # transformers' default initializer_range


def available_host_bytes() -> int:
    """Host memory available to this process now (``MemAvailable``; all of it where the kernel does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_bytes(spec: ModelSpec, dtype: torch.dtype, device: torch.device, cache_slots: int, resident: bool) -> int:
    """Host memory a random-weight model of ``spec`` takes at its peak in `prophet-bench`'s measured decode.

    The host store holds every expert once; the non-expert weights live on the device (host RAM on a CPU); on a
    CPU the slot pool is host memory too; the all-resident baseline (``resident``) unwraps, putting a second
    copy of the experts into the model's modules while the store is alive. Checked against the peak resident
    set on the CPU in fp32: Mixtral-8x7B's real shapes, 1 layer, 3 slots, 8.8 GiB measured, 9.4 GiB by this
    sum; OLMoE's, 1 layer, 64 slots, 4.3 GiB measured, 4.8 GiB by this sum.
    """
    experts = spec.all_expert_bytes(dtype)
    on_host = device.type == "cpu"
    pool = cache_slots * spec.expert_bytes(dtype) if on_host else 0
    non_expert = spec.non_expert_bytes(dtype) if on_host else 0
    return experts + pool + non_expert + (experts if resident else 0) + PROCESS_BYTES


def truncate(spec: ModelSpec, layers: int) -> ModelSpec:
    """``spec`` with only its first ``layers`` decoder layers (at least one of them MoE)."""
    if not 1 <= layers <= spec.num_layers:
        raise ConfigError(f"--layers {layers}: {spec.name} has {spec.num_layers} layers; give 1 to {spec.num_layers}")
    if spec.is_encoder_decoder:
        raise ConfigError(f"{spec.name} is an encoder-decoder model; measured decode supports decoder-only models")
    if spec._stack_moe_layers(layers) == 0:
        first = spec.moe_layer_indices[0] + 1
        raise ConfigError(f"--layers {layers}: none of {spec.name}'s first {layers} layers is MoE; give at least {first}")
    return spec if layers == spec.num_layers else dataclasses.replace(spec, num_layers=layers)


def layers_that_fit(spec: ModelSpec, dtype: torch.dtype, device: torch.device, slots_for: Callable[[ModelSpec], int],
                    resident: bool = False, layers: int | None = None, available: int | None = None) -> int:
    """``layers`` when given, else the most leading layers whose random model fits in host memory
    (`host_bytes` within `HOST_HEADROOM` of ``available``); refuses, with the numbers, what does not fit.

    ``slots_for`` gives the expert slots of a truncated spec (the plan's share of its MoE layers).
    """
    budget = HOST_HEADROOM * (available if available is not None else available_host_bytes())

    def need(n: int) -> int:
        part = truncate(spec, n)
        return host_bytes(part, dtype, device, slots_for(part), resident)

    def gib(n: float) -> str:
        return f"{n / 2**30:.1f} GiB"

    if layers is not None:
        if need(layers) > budget:
            raise ConfigError(f"--layers {layers}: {spec.name}'s random model needs {gib(need(layers))} of host memory "
                              f"(experts, slots, weights{', resident copy' if resident else ''}) but "
                              f"{gib(budget)} is available; give fewer --layers or --slots")
        return layers
    first = spec.moe_layer_indices[0] + 1
    if need(first) > budget:
        raise ConfigError(f"{spec.name}: even {first} layer(s) of random weights need {gib(need(first))} of host memory "
                          f"but {gib(budget)} is available; lower --slots, drop --compare or run on a larger host")
    n = spec.num_layers
    while n > first and need(n) > budget:
        n -= 1
    return n


def random_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, cache_slots: int, seed: int = 0) -> nn.Module:
    """``spec``'s model with random weights, wrapped with ``cache_slots`` expert slots on ``device``.

    Weights are N(0, 0.02), norm scales 1. Built without initialisation, so the experts' pages are never
    written before `prophet.wrap` copies them (untouched memory reads as zeros and costs no RAM); the host
    store is then filled in place, drawn on the device when it is a GPU.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = spec._auto_class().from_config(spec.hf_config(), dtype=dtype)
    wrap(model.eval(), device=device, cache_slots=cache_slots)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-expert weights only: the experts left the model
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, INIT_STD, generator=gen)
        store = runtime_of(model).store
        for layer in range(store.num_layers):
            slab = store.allocate(layer)  # [E, numel]
            if device.type == "cpu":
                slab.normal_(0.0, INIT_STD, generator=gen)
                continue
            for e in range(store.num_experts):
                slab[e].copy_(torch.empty(slab.shape[1], dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen))
    reconfigure(model, cache_slots=cache_slots)  # a fresh cache over the filled store (a resident one loads now)
    return model


def _counters(model: nn.Module) -> dict[str, float]:
    if not is_wrapped(model):
        return {}
    stats = runtime_of(model).stats()
    return {**asdict(stats.total), "stall_seconds": stats.stall_seconds}


def decode(model: nn.Module, routing: ForcedRouting | None, *, batch: int, prompt: int, steps: int, warmup: int,
           kv: Any = None, progress: bool = False, seed: int = 0,
           after_prefill: Callable[[], None] | None = None) -> dict[str, Any]:
    """Greedy decode: a ``prompt``-token prefill, ``warmup`` untimed steps, then ``steps`` timed steps.

    ``routing`` (when given) must hold ``prompt + warmup + steps`` positions. ``kv`` is a transformers cache to
    reuse (reset first); by default a `DynamicCache`. ``after_prefill`` runs between the prefill and the first
    decode step. Returns tokens/s, the step time, Prophet's counters over the timed steps (when the model is
    wrapped), host->device GB/s and peak device memory.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (batch, prompt), generator=gen).to(device)
    if kv is None:
        kv = DynamicCache(config=model.config)
    if routing is not None:
        routing.reset()

    def step(tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if routing is not None:
            routing.begin(tokens.shape[1])
        logits = model(input_ids=tokens, **decode_kwargs(model, kv, pos, tokens.shape[1])).logits
        return logits[:, -1:].argmax(-1)  # [B, 1]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        kv.reset()  # inside inference mode: a cache that lazily made inference tensors can only change there
        if is_wrapped(model):
            runtime_of(model).begin_sequence()  # a reused static cache looks like a continuing sequence
        token = step(ids, 0)
        if after_prefill is not None:
            after_prefill()
        for i in range(warmup):
            token = step(token, prompt + i)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = _counters(model)
        start = time.perf_counter()
        marks = [start]
        for i in tqdm(range(steps), desc="decode", unit="step", disable=not progress, leave=False):
            token = step(token, prompt + warmup + i)
            sync()
            marks.append(time.perf_counter())
        seconds = marks[-1] - start
    after = _counters(model)
    step_ms = np.diff(marks) * 1e3  # [steps]
    out: dict[str, Any] = {
        "tokens_per_s": batch * steps / seconds,
        "step_ms": seconds / steps * 1e3,
        "step_ms_median": float(np.median(step_ms)),
        "step_ms_p90": float(np.percentile(step_ms, 90)),
        "timed_steps": steps,
        "peak_vram_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
    }
    if after:
        delta = {k: after[k] - before[k] for k in after}
        lookups = delta["hits"] + delta["misses"]
        out.update(
            hit_rate=delta["hits"] / lookups if lookups else 0.0,
            misses_per_token=delta["misses"] / (batch * steps),
            h2d_gb_per_s=delta["bytes_h2d"] / seconds / 1e9,
            h2d_gb_per_token=delta["bytes_h2d"] / (batch * steps) / 1e9,
            stall_ms_per_step=delta["stall_seconds"] / steps * 1e3,
            prefetches=int(delta["prefetches"]),
            prefetch_hits=int(delta["prefetch_hits"]),
            wasted_prefetches=int(delta["wasted_prefetches"]),
            held_back=int(delta["held_back"]),
        )
    return out


@dataclasses.dataclass
class PolicyRun:
    """One cache setting to measure: a name, the eviction policy (a name or a factory), an optional predictor
    and its prefetch config."""

    name: str
    policy: str | Callable[[], Any]
    predictor: Any = None
    prefetch: PrefetchConfig | None = None  # how predictions become copies (default: the measured link budget)
    on_miss: str = "copy"  # where missed experts run (`prophet.wrap`)
    warm: list[tuple[int, int]] | None = None  # warm-start order (`prophet.warm`; None: none)


def run_policies(model: nn.Module, runs: list[PolicyRun], routing: ForcedRouting | None, *, cache_slots: int,
                 batch: int, prompt: int, steps: int, warmup: int, kv: Any = None, resident: bool = False,
                 progress: bool = False) -> list[dict[str, Any]]:
    """Measure each of ``runs`` with a fresh cache of ``cache_slots`` over the same store; with ``resident``,
    then measure the unwrapped model with every expert in its own modules (or report that they do not fit).
    The model is left unwrapped when ``resident`` ran."""
    layers: list[MoELayer] = runtime_of(model).layers
    results = []
    for run in runs:
        reconfigure(model, cache_slots=cache_slots, policy=run.policy, predictor=run.predictor,
                    prefetch=run.prefetch or PrefetchConfig(auto_budget=True), on_miss=run.on_miss,
                    warm=run.warm)
        if routing is not None:
            routing.attach(layers)
        r = decode(model, routing, batch=batch, prompt=prompt, steps=steps, warmup=warmup, kv=kv, progress=progress)
        results.append({"policy": run.name, "on_miss": run.on_miss, "slots_total": cache_slots, **r})
    if resident:
        results.append(_resident(model, layers, routing, batch=batch, prompt=prompt, steps=steps, warmup=warmup,
                                 kv=kv, progress=progress))
    if routing is not None:
        routing.detach()
    return results


def _resident(model: nn.Module, layers: list[MoELayer], routing: ForcedRouting | None, **decode_args: Any) -> dict[str, Any]:
    """Every expert on the device in the family's own experts modules (transformers' fastest backend there)."""
    runtime = runtime_of(model)
    device, need, expert_bytes = runtime.device, runtime.store.nbytes, runtime.store.slab_bytes
    reconfigure(model, cache_slots=1)  # give the slot pool's memory back first
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the old pool's block is cached by torch, which the driver counts as used
        free = torch.cuda.mem_get_info(device)[0]
        if need > free * 0.95:
            return _does_not_fit(f"experts need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free on the device")
    try:
        unwrap(model)
    except torch.cuda.OutOfMemoryError as exc:
        return _does_not_fit(f"out of memory moving the experts ({need / 1e9:.1f} GB) to the device: {exc}")
    if routing is not None:
        routing.attach(layers)
    # transformers' batched_mm gathers one expert's weights per (token, choice): the fastest resident backend at
    # decode sizes on the H100 while that gather stays small, but a prefill's would take gigabytes: prefill eager.
    gathered = decode_args["batch"] * layers[0].top_k * expert_bytes
    fast = device.type == "cuda" and gathered <= BATCHED_MM_BYTES and _set_backend(model, "batched_mm")
    if fast:
        _set_backend(model, "eager")
        try:
            r = decode(model, routing, **decode_args, after_prefill=lambda: _set_backend(model, "batched_mm"))
            return {"policy": "all-resident", "fits": True, "hit_rate": 1.0, "experts_backend": "batched_mm", **r}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    if device.type == "cuda":
        _set_backend(model, "eager")  # grouped_mm, the default, ran 8x slower than eager at decode on the H100
    try:
        r = decode(model, routing, **decode_args)
    except torch.cuda.OutOfMemoryError as exc:
        return _does_not_fit(f"out of memory while decoding: {exc}")
    backend = getattr(model.config, "_experts_implementation", None) or "default"
    return {"policy": "all-resident", "fits": True, "hit_rate": 1.0, "experts_backend": backend, **r}


BATCHED_MM_BYTES = 4 << 30  # most expert weights transformers' batched_mm may gather in one decode step


def _does_not_fit(why: str) -> dict[str, Any]:
    return {"policy": "all-resident", "fits": False, "tokens_per_s": None, "why": why}


def _set_backend(model: nn.Module, name: str) -> bool:
    """Select transformers' experts backend ``name``; False where the model has no such switch or ignores it."""
    if not hasattr(model, "set_experts_implementation"):
        return False
    try:
        model.set_experts_implementation(name)
    except (ValueError, KeyError):
        return False
    return getattr(model.config, "_experts_implementation", None) == name


def kv_cache_for(model: nn.Module, device: torch.device, positions: int, ctx: int, batch: int, dtype: torch.dtype) -> Any:
    """A static cache of ``ctx`` tokens per sequence on CUDA (what the plan budgeted); None on the CPU (a
    dynamic cache per run). ``positions`` (prompt + steps) must fit in ``ctx``."""
    if positions > ctx:
        raise ConfigError(f"--ctx {ctx} is shorter than the {positions} positions decoded; raise --ctx or lower --steps")
    return allocate_kv_cache(model, device, ctx, batch, dtype) if device.type == "cuda" else None
