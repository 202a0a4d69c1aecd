"""`wrap` / `unwrap` / `stats`: put a transformers MoE model's experts behind Prophet's cache, and take them back.

`wrap` copies every expert into the host store, frees the experts' own parameters, swaps each experts module
for an `OffloadedExperts` through the adapter table, and moves the rest of the model to ``device``. With
``max_context`` it first plans the device memory (`prophet.plan`): a KV cache for ``batch x max_context`` tokens
is allocated and whatever the weights, KV and workspace leave goes to expert slots. `unwrap`
writes the store back into the original modules (bit-identical) and swaps them back in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from prophet.cache import ExpertCache
from prophet.compat import CACHE_KEYWORDS
from prophet.config import CacheConfig, PrefetchConfig, ProphetConfig
from prophet.errors import (
    AlreadyWrappedError,
    CapacityError,
    ConfigError,
    DeviceError,
    DtypeError,
    ProphetError,
)
from prophet.formats import WeightFormat, dense_format, slab_layout, weight_format
from prophet.hybrid import allowed
from prophet.layer import OffloadedExperts
from prophet.models.adapter import Adapter, MoELayer, moe_layers
from prophet.plan import Plan, model_sizes, plan, resolve_gpu
from prophet.policies import EvictionPolicy, make_policy
from prophet.predict.base import Predictor, check_predictor
from prophet.prefetch import Prefetcher
from prophet.runtime import Runtime, RuntimeStats
from prophet.sources import ExpertSource, fp8_module_source
from prophet.store import HostStore
from prophet.transfer import CudaCopyEngine, SyncCopyEngine

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTR = "_prophet_runtime"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means the current CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r} but CUDA is not available here; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise DeviceError(f"device={device!r}: Prophet runs on 'cpu' or 'cuda' devices")
    return dev


def _cache_config(config: ProphetConfig | None, policy: str, **options: Any) -> ProphetConfig:
    given = {k: v for k, v in options.items() if v is not None}
    if config is not None:
        if not isinstance(config, ProphetConfig):
            raise ConfigError(f"config={type(config).__name__}: pass a prophet.config.ProphetConfig")
        if given or policy != "lru":
            raise ConfigError(f"pass either config= or {sorted(given) or ['policy']}, not both")
        return config
    return ProphetConfig(cache=CacheConfig(policy=policy, **given))


def policy_factory(policy: str | Callable[[], EvictionPolicy]) -> Callable[[], EvictionPolicy]:
    """A factory of fresh eviction policies (one per slot pool), checked now by making one."""
    if isinstance(policy, str):
        if policy == "prophet":
            raise ConfigError("policy='prophet' is prediction-aware eviction: pass predictor=P and "
                              "policy=P.policy_factory() with a fitted prophet.predict predictor P")
        if policy == "belady":
            raise ConfigError("policy='belady' needs the future routing, which only trace replay has (prophet.sim); "
                              "use 'lru', 'lfu' or 'fifo'")
        make_policy(policy)
        return lambda: make_policy(policy)
    if isinstance(policy, EvictionPolicy) or not callable(policy):
        raise ConfigError(f"policy={policy!r}: give a policy name ('lru', 'lfu', 'fifo') or a callable that returns "
                          "a fresh EvictionPolicy for each slot pool (e.g. predictor.policy_factory())")
    try:
        sample = policy()
    except Exception as exc:
        raise ConfigError(f"policy factory {policy!r} failed when called ({exc!r}); it must take no arguments and "
                          "return a fresh EvictionPolicy") from exc
    if not isinstance(sample, EvictionPolicy):
        raise ConfigError(f"policy factory {policy!r} returned {type(sample).__name__}, not an EvictionPolicy; "
                          "return an instance of a prophet.policies policy")
    return policy


def allocate_kv_cache(model: nn.Module, dev: torch.device, max_context: int, batch: int, dtype: torch.dtype,
                      static: bool | None = None) -> Any:
    """A `StaticCache` allocated up front (fixed addresses, CUDA-graph friendly, and its memory is taken before
    the slots), by default on CUDA; else a `DynamicCache`, which grows as needed.

    Multi-head latent attention (DeepSeek) stores keys and values of different widths, which the up-front
    allocation cannot describe: its static cache allocates at the first forward instead (the plan has already
    set that memory aside)."""
    from transformers import DynamicCache, StaticCache

    if not (dev.type == "cuda" if static is None else static):
        return DynamicCache(config=model.config)
    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    cache = StaticCache(config=model.config, max_cache_len=max_context)
    if getattr(text, "kv_lora_rank", None):
        return cache
    cache.early_initialization(
        batch_size=batch, num_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, dtype=dtype, device=dev,
    )
    return cache


def _compute_dtype(model: nn.Module, expert_params: list[nn.Parameter]) -> torch.dtype:
    """The dtype the model computes in when its experts are stored quantized: that of its other weights."""
    experts = {id(p) for p in expert_params}
    for p in model.parameters():
        if id(p) not in experts and p.dtype in SUPPORTED_DTYPES:
            return p.dtype
    raise DtypeError("no float32, float16 or bfloat16 weights outside the experts: Prophet cannot tell the compute dtype")


def _expert_format(expert_dtype: str | WeightFormat | None, dtype: torch.dtype) -> WeightFormat:
    """The store's format: ``expert_dtype`` by name or as given, else dense in the model's ``dtype``."""
    if expert_dtype is None:
        return dense_format(dtype)
    wf = weight_format(expert_dtype) if isinstance(expert_dtype, str) else expert_dtype
    if not wf.runnable:
        raise ConfigError(f"expert_dtype={wf.name!r} is modelling-only; wrap with int4, int8, fp8 or mxfp4")
    if not wf.quantized and wf != dense_format(dtype):
        raise ConfigError(f"expert_dtype={wf.name!r} differs from the model's {dtype}: convert the model with "
                          "model.to(...) instead, or pick a quantized expert_dtype")
    return wf


def _plan_for(model: nn.Module, layers: list[MoELayer], dtype: torch.dtype, dev: torch.device,
              max_context: int, batch: int, gpu: int | str | None, expert_bytes: int) -> Plan:
    if gpu is None:
        if dev.type != "cuda":
            raise ConfigError("max_context on the CPU needs gpu= (bytes or a profile name such as 'h100-sxm') to size the plan")
        gpu = torch.cuda.mem_get_info(dev)[1]
    name, gpu_bytes = resolve_gpu(gpu)
    sizes = dataclasses.replace(model_sizes(model, layers, dtype), expert_bytes=expert_bytes)
    memory = plan(sizes, gpu_bytes, max_context, batch, kv_dtype=dtype)
    for warning in memory.warnings:
        logger.warning(warning)
    return dataclasses.replace(memory, gpu=name)


def wrap(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    cache_slots: int | None = None,
    slots_per_layer: int | None = None,
    cache_bytes: int | None = None,
    policy: str | Callable[[], EvictionPolicy] = "lru",
    predictor: Predictor | None = None,
    config: ProphetConfig | None = None,
    adapter: Adapter | None = None,
    max_context: int | None = None,
    batch: int = 1,
    gpu: int | str | None = None,
    expert_dtype: str | WeightFormat | None = None,
    expert_source: ExpertSource | None = None,
    on_miss: str | None = None,
    host_threads: int | None = None,
    warm: Sequence[tuple[int, int]] | None = None,
) -> nn.Module:
    """Offload ``model``'s experts to host memory behind a device slot cache; returns the same model object.

    ``expert_dtype`` ("int4", "int8", "fp8", "fp8-channel", "fp8-tensor", "mxfp4" or a
    `prophet.formats.WeightFormat`) quantizes the experts as they enter the host store: slots then hold that
    format's bytes and the kernels dequantize them (`unwrap` restores dequantized weights, not the originals).
    Experts that are already quantized (transformers' FP8Experts modules, or ``expert_source``, which
    `prophet.load` gives for quantized checkpoints) are stored as they are.

    Give at most one of ``cache_slots`` (one pool shared by all MoE layers), ``slots_per_layer`` (a pool per
    layer) or ``cache_bytes`` (a shared pool sized from bytes). With none, every expert gets a slot.
    ``max_context`` instead plans the device memory (``gpu``: bytes or a profile name; default the CUDA device's
    total): the KV cache for ``batch x max_context`` tokens is allocated (``runtime_of(model).kv_cache``) and
    the rest becomes ``cache_slots`` (``runtime_of(model).plan``).

    ``on_miss`` ("copy", the default; "auto"; "host") says where a missed expert runs: copied to the device,
    computed on the host CPU (``host_threads`` threads, default detected) while the device runs the others, or
    whichever the measured costs say finishes first (`prophet.hybrid.decide`).

    ``warm``: ``(layer, expert)`` keys, most valuable first, that fill the cache's free slots where a sequence
    starts (`prophet.warm.fitted_order` of recorded routing, or a fitted predictor's ``warm_order()``); the copies
    are asynchronous and share the link with the first tokens' copies.
    """
    if hasattr(model, _ATTR):
        raise AlreadyWrappedError("this model is already wrapped by Prophet; call prophet.unwrap(model) first")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap takes a torch.nn.Module (a transformers MoE model), not {type(model).__name__}")
    if adapter is not None and not isinstance(adapter, Adapter):
        raise ConfigError(f"adapter={adapter!r}: pass a prophet.models adapter object (e.g. GenericAdapter(...)), "
                          "or leave it out to pick one from config.model_type")
    dev = resolve_device(device)
    layers = moe_layers(model, adapter)
    source = expert_source or fp8_module_source(layers)
    params = [p for layer in layers for p in layer.expert_parameters()]
    if source is not None:
        if expert_dtype is not None:
            raise ConfigError(f"the experts are already quantized ({source.description}); drop expert_dtype")
        dtype = _compute_dtype(model, params)
        weights = source.weights
    else:
        dtype = params[0].dtype
        if dtype not in SUPPORTED_DTYPES or any(p.dtype != dtype for p in params):
            found = sorted({str(p.dtype) for p in params})
            raise DtypeError(f"expert weights are {found}; Prophet's kernels run float32, float16 or bfloat16: convert with model.to(torch.bfloat16)")
        if any(p.is_meta for p in params):
            raise ConfigError("expert weights are on the meta device (no data); load real weights or use prophet.load(checkpoint_dir)")
        weights = _expert_format(expert_dtype, dtype)
    layout = slab_layout(layers[0].fmt, weights, dtype if weights.quantized else None)
    memory_plan = kv_cache = None
    if max_context is None and (batch != 1 or gpu is not None):
        raise ConfigError(f"batch={batch!r} and gpu={gpu!r} size the memory plan: give max_context too, or drop them")
    if max_context is not None:
        sizes = {"cache_slots": cache_slots, "slots_per_layer": slots_per_layer, "cache_bytes": cache_bytes}
        if config is not None or any(v is not None for v in sizes.values()):
            raise ConfigError("max_context sizes the cache itself; drop config=, cache_slots, slots_per_layer and cache_bytes")
        for name, value in (("max_context", max_context), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r}: give a whole number of tokens/sequences (at least 1)")
        memory_plan = _plan_for(model, layers, dtype, dev, max_context, batch, gpu, layout.nbytes)
        cache_slots = memory_plan.expert_slots
    cfg = _cache_config(
        config, policy if isinstance(policy, str) else "lru",
        cache_slots=cache_slots, slots_per_layer=slots_per_layer, cache_bytes=cache_bytes,
    )
    if on_miss is not None or host_threads is not None:
        if config is not None:
            raise ConfigError("pass on_miss/host_threads inside config= (ProphetConfig(on_miss=...)), not both")
        cfg = dataclasses.replace(cfg, on_miss=on_miss or cfg.on_miss, host_threads=host_threads)
    factory = policy_factory(cfg.cache.policy if isinstance(policy, str) else policy)
    if predictor is not None:
        check_predictor(predictor, len(layers), layers[0].num_experts, layers[0].top_k)
    cache_slots, slots_per_layer = _slot_counts(cfg.cache, layers, layout.nbytes)
    if memory_plan is not None:
        try:
            kv_cache = allocate_kv_cache(model, dev, max_context, batch, dtype)
        except torch.OutOfMemoryError as exc:
            raise CapacityError(f"the KV cache for max_context={max_context}, batch={batch} does not fit on {dev}; "
                                "lower max_context or batch") from exc

    warm_keys = _warm_keys(warm, len(layers), layers[0].num_experts)

    def make_runtime(store: HostStore) -> Runtime:  # after the store is filled: slots never add to its peak
        cache = _new_cache(store, dev, factory, cache_slots, slots_per_layer)
        runtime = Runtime(layers, store, cache, Prefetcher(cache, cfg.prefetch), predictor, cfg.kernels, dev,
                          on_miss=cfg.on_miss, host_threads=cfg.host_threads)
        runtime.warm = warm_keys
        runtime.source = source
        runtime.plan = memory_plan
        runtime.kv_cache = kv_cache
        return runtime

    # Everything is checked; from here a failure puts the model back as it was (`_build`).
    store = HostStore.for_layers(layers, pin=dev.type == "cuda" and cfg.pin_memory, weights=weights, source=source,
                                 dtype=dtype)
    runtime = _build(model, layers, store, source, make_runtime)
    setattr(model, _ATTR, runtime)
    runtime.sequence_hook = model.register_forward_pre_hook(_sequence_starts(runtime), with_kwargs=True)
    return model


def _slot_counts(cache_cfg: CacheConfig, layers: list[MoELayer], slab_bytes: int) -> tuple[int | None, int | None]:
    """``(cache_slots, slots_per_layer)`` from the config, capped at the number of experts."""
    cache_slots, slots_per_layer = cache_cfg.cache_slots, cache_cfg.slots_per_layer
    if cache_cfg.cache_bytes is not None:
        cache_slots = cache_cfg.cache_bytes // slab_bytes
        if cache_slots < 1:
            raise CapacityError(
                f"cache_bytes={cache_cfg.cache_bytes} is smaller than one expert ({slab_bytes} bytes); "
                f"give at least {slab_bytes}"
            )
    num_experts = layers[0].num_experts
    if cache_slots is None and slots_per_layer is None:
        slots_per_layer = num_experts
    if cache_slots is not None:
        cache_slots = min(cache_slots, len(layers) * num_experts)
    if slots_per_layer is not None:
        slots_per_layer = min(slots_per_layer, num_experts)
    return cache_slots, slots_per_layer


def _build(model: nn.Module, layers: list[MoELayer], store: HostStore, source: ExpertSource | None,
           make_runtime: Callable[[HostStore], Runtime]) -> Runtime:
    """Move the experts into ``store`` (from ``source`` when given), make the runtime (cache slots), swap in
    `OffloadedExperts`, move the model to the device and load the cache.

    All or nothing: if anything fails (out of memory, an interrupt), the original experts modules come back
    with their exact parameters on their original devices, and the error is raised again. A store that holds
    the experts exactly (dense, or as their source stores them) frees each layer's parameters as it copies it;
    one that quantizes them frees them only once everything succeeded, since the originals cannot be rebuilt."""
    shapes = [{name: p.shape for name, p in layer.experts.named_parameters()} for layer in layers]
    placement = _placement(model)
    exact = source is not None or not store.weights.quantized
    try:
        store.fill(layers, free_source=exact, source=source)  # when exact, the store holds the only copy now
        runtime = make_runtime(store)
        runtime.expert_shapes = shapes
        for layer in layers:
            setattr(layer.parent, layer.attr, OffloadedExperts(layer, runtime))
        model.to(runtime.device)
        runtime.settle()
    except BaseException as exc:
        _rollback(layers, shapes, store, source, placement)
        if isinstance(exc, torch.OutOfMemoryError):
            raise CapacityError(f"wrapping ran out of memory ({str(exc).splitlines()[0]}); the model is unchanged: "
                                "give fewer cache_slots/slots_per_layer or a smaller cache_bytes, or free memory") from exc
        raise
    if not exact:
        for layer in layers:
            for p in layer.expert_parameters():
                p.data = torch.empty(0, dtype=p.dtype)
    return runtime


def _placement(model: nn.Module) -> list[tuple[nn.Module, str, bool, torch.device]]:
    """Where every parameter and buffer of ``model`` lives: ``(module, name, is_parameter, device)``."""
    out = []
    for module in model.modules():
        out += [(module, name, True, p.device) for name, p in module._parameters.items() if p is not None]
        out += [(module, name, False, b.device) for name, b in module._buffers.items() if b is not None]
    return out


def _rollback(layers: list[MoELayer], shapes: list[dict[str, torch.Size]], store: HostStore, source: ExpertSource | None,
              placement: list[tuple[nn.Module, str, bool, torch.device]]) -> None:
    """Undo a partial `_build`: experts modules swapped back, emptied parameters refilled from the store (through
    the source's ``write`` for quantized modules; a checkpoint stream's were never in the model), and every
    tensor moved back to where it was (copies between devices are exact)."""
    with torch.no_grad():
        for li, (layer, shape) in enumerate(zip(layers, shapes, strict=True)):
            setattr(layer.parent, layer.attr, layer.experts)
            params = dict(layer.experts.named_parameters())
            if all(p.numel() == shape[name].numel() for name, p in params.items()):
                continue  # never emptied
            streamed = source is not None and source.write is None  # shaped placeholders, as prophet.sources made
            for name, p in params.items():
                p.data = torch.zeros((), dtype=p.dtype).expand(shape[name]) if streamed else \
                    torch.empty(shape[name], dtype=p.dtype)
            for e in range(0 if streamed else layer.num_experts):
                if source is None:
                    layer.set_expert(e, store.read(li, e))
                else:
                    source.write(li, e, store.read(li, e))
        for module, name, is_param, dev in placement:
            table = module._parameters if is_param else module._buffers
            tensor = table[name]
            if tensor.device != dev:
                if is_param:
                    tensor.data = tensor.data.to(dev)
                else:
                    table[name] = tensor.to(dev)
    store.close()


def _sequence_starts(runtime: Runtime) -> Callable[..., None]:
    """A forward pre-hook telling the runtime where a sequence starts, so predictors reset there: a forward
    with no past keys and values, or with a dynamic cache still empty or a static one not yet allocated. A
    static cache reused after `reset()` cannot be told apart without a host sync: call
    `runtime_of(model).begin_sequence()` then."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        past = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
        if past is None:
            runtime.begin_sequence()
            return
        layers = getattr(past, "layers", None)
        if layers is None:
            return  # a cache type of its own: the caller says where sequences start
        if not layers or not all(getattr(layer, "is_initialized", True) for layer in layers):
            runtime.begin_sequence()  # static layers allocate at the first forward
        elif all(type(layer).__name__ == "DynamicLayer" for layer in layers) and past.get_seq_length() == 0:
            runtime.begin_sequence()

    return hook


def _new_cache(store: HostStore, dev: torch.device, policy: Callable[[], EvictionPolicy],
               cache_slots: int | None, slots_per_layer: int | None) -> ExpertCache:
    engine = CudaCopyEngine(dev) if dev.type == "cuda" else SyncCopyEngine()
    engine.blocking = engine.blocking or not store.pinned  # a copy from pageable memory holds the host
    return ExpertCache(store, dev, engine, policy, cache_slots=cache_slots, slots_per_layer=slots_per_layer)


def reconfigure(
    model: nn.Module,
    *,
    cache_slots: int | None = None,
    slots_per_layer: int | None = None,
    policy: str | Callable[[], EvictionPolicy] = "lru",
    predictor: Predictor | None = None,
    prefetch: PrefetchConfig | None = None,
    on_miss: str | None = None,
    warm: Sequence[tuple[int, int]] | None = None,
) -> Runtime:
    """Give a wrapped model a new, empty expert cache (size, policy), prefetcher and predictor over the same
    host store, so a sweep over cache settings never copies the experts again. Give exactly one of
    ``cache_slots`` or ``slots_per_layer``; counters start from zero. ``on_miss`` (None: unchanged) and
    ``warm`` (None: no warm start) as in `wrap`."""
    runtime = runtime_of(model)
    if on_miss is not None:
        allowed(on_miss)  # a ConfigError naming the choices, before anything changes
    if (cache_slots is None) == (slots_per_layer is None):
        raise ConfigError("reconfigure needs exactly one of cache_slots (a shared pool) or slots_per_layer")
    CacheConfig(cache_slots=cache_slots, slots_per_layer=slots_per_layer)  # positive whole numbers
    if prefetch is not None and not isinstance(prefetch, PrefetchConfig):
        raise ConfigError(f"prefetch={prefetch!r}: pass a prophet.config.PrefetchConfig")
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)  # no copy into the old pool may still be running when it is freed
    store, total = runtime.store, runtime.store.num_layers * runtime.store.num_experts
    factory = policy_factory(policy)
    if predictor is not None:
        check_predictor(predictor, store.num_layers, store.num_experts, runtime.layers[0].top_k)
    old_config = runtime.prefetcher.config
    runtime.drop_cache()  # drop every reference to the old pool before the new one is allocated
    try:
        runtime.cache = _new_cache(
            store, runtime.device, factory,
            None if cache_slots is None else min(cache_slots, total),
            None if slots_per_layer is None else min(slots_per_layer, store.num_experts),
        )
    except torch.cuda.OutOfMemoryError as exc:
        raise CapacityError(f"reconfigure: the new slot pool does not fit on {runtime.device} ({exc}); call "
                            "reconfigure again with fewer slots before running the model") from exc
    runtime.prefetcher = Prefetcher(runtime.cache, prefetch or old_config)
    runtime.predictor = predictor
    if on_miss is not None:
        runtime.set_on_miss(on_miss)
    runtime.warm = _warm_keys(warm, store.num_layers, store.num_experts)
    runtime.settle()
    return runtime


def _warm_keys(warm: Sequence[tuple[int, int]] | None, num_layers: int, num_experts: int) -> list[tuple[int, int]]:
    """``warm`` as a checked list of ``(layer, expert)`` keys (empty: no warm start)."""
    keys = [(int(layer), int(e)) for layer, e in (warm or [])]
    bad = [k for k in keys if not (0 <= k[0] < num_layers and 0 <= k[1] < num_experts)]
    if bad:
        raise ConfigError(f"warm={bad[0]}: keys are (layer, expert) with layer < {num_layers} MoE layers and "
                          f"expert < {num_experts}")
    return keys


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, _ATTR)


def runtime_of(model: nn.Module) -> Runtime:
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise ProphetError("this model is not wrapped by Prophet; call prophet.wrap(model) first")
    return runtime


def unwrap(model: nn.Module) -> nn.Module:
    """Undo `wrap`: the original experts modules come back, with bit-identical parameters, on the model's device."""
    runtime = runtime_of(model)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)  # prefetches for the next token may still be copying into slots
    with torch.no_grad():
        for li, (layer, shapes) in enumerate(zip(runtime.layers, runtime.expert_shapes, strict=True)):
            for name, p in layer.experts.named_parameters():
                p.data = torch.empty(shapes[name], dtype=p.dtype, device=runtime.device)
            for e in range(layer.num_experts):
                if runtime.source is not None and runtime.source.write is not None:
                    runtime.source.write(li, e, runtime.store.read(li, e))  # the quantized module, bit for bit
                else:
                    layer.set_expert(e, runtime.store.read_canonical(li, e))
            setattr(layer.parent, layer.attr, layer.experts)
    runtime.sequence_hook.remove()
    runtime.close()
    delattr(model, _ATTR)
    return model


def stats(model: nn.Module) -> RuntimeStats:
    """Hits, misses, prefetch use, bytes moved and stall time of a wrapped model, per MoE layer and in total."""
    return runtime_of(model).stats()
