"""Measured decode (`prophet.decode`, `prophet.routing`): forced routing plays the trace exactly, a wrapped and
an unwrapped model see the same routing, and the real cache's counters equal the simulator's for the same rows."""

import importlib
import weakref

import numpy as np
import pytest
import torch

import prophet
from prophet import decode as dec
from prophet.config import PrefetchConfig
from prophet.errors import ConfigError, TraceError, UnsupportedModelError
from prophet.models import get_spec
from prophet.models.adapter import moe_layers
from prophet.predict import PathMatchPredictor
from prophet.predict.data import as_router_trace
from prophet.predict.value import ValuePredictor
from prophet.routing import ForcedRouting
from prophet.sim import replay, schedule
from prophet.sim.replay import replay_counts
from prophet.trace.synth import synthetic_trace
from prophet.wrap import is_wrapped, reconfigure, runtime_of

SPEC = get_spec("mixtral").tiny()  # 2 MoE layers x 8 experts, top-2
PREDICTED = ("prophet", "value")  # policies driven by a predictor, which also prefetches


def routes(seed: int = 0, tokens: int = 64):
    trace = synthetic_trace(SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k, num_sequences=2,
                            tokens_per_sequence=tokens, seed=seed, progress=False)
    return as_router_trace(trace)


def record_indices(model) -> list[list[torch.Tensor]]:
    """Capture each MoE layer's top_k_index as the experts module receives it (after the forcing hook)."""
    seen = [[] for _ in runtime_or_layers(model)]
    for i, layer in enumerate(runtime_or_layers(model)):
        module = getattr(layer.parent, layer.attr)
        module.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[1].clone()))
    return seen


def runtime_or_layers(model):
    return runtime_of(model).layers if is_wrapped(model) else moe_layers(model)


def test_experts_receive_the_trace_rows_of_each_lane_and_position():
    r = routes()
    rows = np.array([[5, 40], [6, 41], [7, 42]])  # [S=3 positions, B=2 lanes]
    model = SPEC.tiny_model(seed=1)
    routing = ForcedRouting(r.experts, rows, "cpu").attach(moe_layers(model))
    seen = record_indices(model)
    with torch.no_grad():
        routing.begin(2)  # a 2-token prompt per lane: tokens (b0,p0) (b0,p1) (b1,p0) (b1,p1)
        model(torch.randint(3, 100, (2, 2)))
    for layer in range(SPEC.num_moe_layers):
        expected = r.experts[[5, 6, 40, 41], layer]
        assert np.array_equal(seen[layer][0].numpy(), expected)
    routing.begin(1)
    with pytest.raises(TraceError, match="3 positions"):
        routing.begin(1)


def test_unrecorded_trace_entries_keep_the_routers_choice():
    r = routes()
    holes = r.experts.copy()
    holes[7, 1, 0] = -1
    model = SPEC.tiny_model(seed=1)
    layers = moe_layers(model)
    ids = torch.randint(3, 100, (1, 1))
    seen = record_indices(model)  # runs before the forcing hook below: sees the router's own choice
    ForcedRouting(holes, np.array([[7]]), "cpu").attach(layers).begin(1)
    forced = record_indices(model)
    with torch.no_grad():
        model(ids)
    own = seen[1][0][0]
    assert forced[1][0][0, 0] == own[0] and forced[1][0][0, 1] == holes[7, 1, 1]
    assert np.array_equal(forced[0][0][0].numpy(), holes[7, 0])


def test_wrapped_and_unwrapped_models_decode_identically_under_forced_routing():
    r = routes(seed=2)
    model = SPEC.tiny_model(seed=3)
    sched = schedule(r, batch=2, steps=1 + 2 + 6)
    routing = ForcedRouting(r.experts, sched.rows, "cpu")
    kwargs = dict(batch=2, prompt=1, steps=6, warmup=2)

    def tokens(m):
        routing.attach(runtime_or_layers(m))
        out = []
        hook = m.lm_head.register_forward_hook(lambda mod, a, o: out.append(o[:, -1].argmax(-1)))
        dec.decode(m, routing, **kwargs)
        hook.remove()
        routing.detach()
        return torch.stack(out)

    ref = tokens(model)
    prophet.wrap(model, device="cpu", cache_slots=3)
    assert torch.equal(tokens(model), ref)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "prophet", "value"])
def test_real_cache_counts_equal_the_simulators_for_the_same_rows_prompt_included(batch, policy):
    # the runtime and the simulator run one step function: a 6-token prompt is one deduplicated step in both,
    # and the prophet policy's predictor (fresh on both sides, reset where the generation starts) prefetches alike;
    # "value" also gates each prefetch by the value of the expert it would evict (ValuePredictor.worth_copying)
    r = routes(seed=4)
    prompt, steps, slots = 6, 20, 5
    sched = schedule(r, batch, 1 + steps, prompt=prompt)
    model = dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=slots)
    routing = ForcedRouting(r.experts, sched.rows, "cpu")
    prefetch = PrefetchConfig(max_inflight=4)  # fixed, not measured: the same gate on both sides

    def run(kind):
        if policy not in PREDICTED:
            return kind(policy, None)
        shape = (SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k)
        made = PathMatchPredictor(*shape) if policy == "prophet" else ValuePredictor(*shape, margin=0.2, horizon=2)
        predictor = made.fit([routes(seed=9)])
        return kind(predictor.policy_factory(), predictor)

    run(lambda pol, pred: dec.run_policies(model, [dec.PolicyRun(policy, pol, pred, prefetch)], routing,
                                           cache_slots=slots, batch=batch, prompt=prompt, steps=steps, warmup=0))
    real = prophet.stats(model).total
    sim = run(lambda pol, pred: replay_counts(r, pol, predictor=pred, cache_slots=slots, batch=batch,
                                              steps=1 + steps, prompt=prompt, prefetch=prefetch, sequences=False))
    assert (real.hits, real.misses) == (sim.hits, sim.misses)
    assert (real.prefetches, real.prefetch_hits, real.wasted_prefetches) == (
        sim.prefetches, sim.prefetch_hits, sim.wasted_prefetches)
    assert real.misses > 0 and real.hits > 0
    assert (real.prefetches > 0) == (policy in PREDICTED)
    if policy not in PREDICTED:  # without prefetch the cost model's clock changes no decision
        timed = replay(r, SPEC, "h100-sxm", policy=policy, cache_slots=slots, sched=sched, sequences=False)
        assert (timed.hits, timed.misses) == (real.hits, real.misses)


def test_decode_reports_the_timed_window_only():
    r = routes(seed=5)
    sched = schedule(r, 1, 1 + 8 + 4, prompt=16)
    model = dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=4)
    routing = ForcedRouting(r.experts, sched.rows, "cpu").attach(runtime_of(model).layers)
    out = dec.decode(model, routing, batch=1, prompt=16, steps=4, warmup=8)
    assert out["timed_steps"] == 4 and out["tokens_per_s"] > 0 and out["peak_vram_gb"] is None
    total = prophet.stats(model).total
    assert 0 < out["misses_per_token"] * 4 < total.misses  # prefill and warm-up misses are not in the window
    slab = runtime_of(model).store.slab_bytes
    assert out["h2d_gb_per_token"] == pytest.approx(out["misses_per_token"] * slab / 1e9)


def test_random_model_has_drawn_weights_and_a_filled_store():
    model = dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=4, seed=7)
    store = runtime_of(model).store
    experts = torch.stack([store.allocate(layer) for layer in range(store.num_layers)])
    assert experts.std().item() == pytest.approx(dec.INIT_STD, rel=0.05)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.all(p == 1) for p in norms)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 100, (1, 5))).logits).all()


def test_a_random_model_that_fits_whole_holds_the_drawn_experts_in_its_slots():
    total = SPEC.num_moe_layers * SPEC.num_experts
    runtime = runtime_of(dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=total))
    assert runtime._resident is not None  # loaded at wrap, so the slots must hold the store as filled after it
    pool = runtime.cache.pools[0].data  # [S, numel]
    for layer in range(SPEC.num_moe_layers):
        for e in range(SPEC.num_experts):
            assert torch.equal(pool[int(runtime._resident[layer][e])], runtime.store.slab(layer, e))


def test_reconfigure_swaps_the_cache_and_keeps_outputs(monkeypatch):
    wrap_module = importlib.import_module("prophet.wrap")  # the package attribute prophet.wrap is the function

    model = SPEC.tiny_model(seed=8)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        prophet.wrap(model, device="cpu", cache_slots=16)
        model(ids)
        old_pool = weakref.ref(runtime_of(model).cache)
        new_cache = wrap_module._new_cache

        def check_freed(*args):
            assert old_pool() is None  # the old pool is gone before the new one is allocated (a GPU holds one)
            return new_cache(*args)

        monkeypatch.setattr(wrap_module, "_new_cache", check_freed)
        runtime = reconfigure(model, slots_per_layer=2, policy="lfu")
        assert runtime.cache.num_slots == 2 * SPEC.num_moe_layers and prophet.stats(model).total.hits == 0
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    with pytest.raises(ConfigError, match="exactly one"):
        reconfigure(model)


def test_forced_routing_refuses_mismatches():
    r = routes()
    model = SPEC.tiny_model()
    layers = moe_layers(model)
    top1 = ForcedRouting(r.experts[:, :, :1], np.zeros((4, 1), dtype=np.int64), "cpu").attach(layers)
    top1.begin(1)
    with pytest.raises(TraceError, match="top-k"), torch.no_grad():
        model(torch.randint(3, 100, (1, 1)))
    top1.detach()
    with pytest.raises(TraceError, match="MoE layers"):
        ForcedRouting(r.experts[:, :1], np.zeros((4, 1), dtype=np.int64), "cpu").attach(layers)
    with pytest.raises(UnsupportedModelError, match="forced routing needs experts called"), torch.no_grad():
        ForcedRouting(r.experts, np.zeros((4, 1), dtype=np.int64), "cpu").attach(layers).begin(1)
        moe_layers(model)[0].experts(torch.randn(1, 64))  # called without its routing


def test_dbrx_experts_take_forced_routing_from_3d_hidden_states():
    spec = get_spec("dbrx").tiny()
    trace = as_router_trace(synthetic_trace(spec.num_moe_layers, spec.num_experts, spec.top_k, num_sequences=1,
                                            tokens_per_sequence=16, progress=False))
    model = spec.tiny_model(seed=1)
    routing = ForcedRouting(trace.experts, np.array([[3, 9], [4, 10]]), "cpu").attach(moe_layers(model))
    seen = record_indices(model)
    routing.begin(2)
    with torch.no_grad():
        model(torch.randint(3, 100, (2, 2)))
    for layer in range(spec.num_moe_layers):
        assert np.array_equal(seen[layer][0].numpy(), trace.experts[[3, 4, 9, 10], layer])


def test_layers_are_cut_to_what_host_memory_holds():
    spec = get_spec("mixtral")
    gpu = torch.device("cuda")
    host = 64 << 30
    per_layer = spec.all_expert_bytes(torch.bfloat16) / spec.num_moe_layers
    layers = dec.layers_that_fit(spec, torch.bfloat16, gpu, lambda s: 4, available=host)
    budget = dec.HOST_HEADROOM * host - dec.PROCESS_BYTES
    assert layers * per_layer <= budget < (layers + 1) * per_layer  # on a GPU the host holds the experts only
    assert dec.layers_that_fit(spec, torch.bfloat16, gpu, lambda s: 4, available=1 << 50) == spec.num_layers


def test_on_the_cpu_the_estimate_counts_slots_and_weights_and_refuses_with_the_numbers():
    """Mixtral's real shapes in fp32 on a 24 GiB host: the store alone would allow 3 layers, which the slot pool
    and weights on the host push past the memory (the run was killed); now it is 1, or refused with numbers."""
    spec, cpu = get_spec("mixtral"), torch.device("cpu")
    share = 172 / 32  # the 128K plan's slots per MoE layer

    def slots(part):
        return round(share * part.num_moe_layers)

    host = 24 << 30
    layers = dec.layers_that_fit(spec, torch.float32, cpu, slots, available=host)
    assert layers == 2 and dec.host_bytes(dec.truncate(spec, layers), torch.float32, cpu, 11, False) <= 0.9 * host
    with pytest.raises(ConfigError, match=r"--layers 3: .* needs \d+\.\d GiB of host memory .* available"):
        dec.layers_that_fit(spec, torch.float32, cpu, slots, layers=3, available=host)
    with pytest.raises(ConfigError, match="even 1 layer"):
        dec.layers_that_fit(spec, torch.float32, cpu, slots, resident=True, available=8 << 30)
def test_truncate_keeps_the_first_layers_and_refuses_what_has_no_moe_layer():
    spec = get_spec("mixtral")
    assert dec.truncate(spec, 3).num_moe_layers == 3
    lite = get_spec("deepseek-v2-lite")  # layer 0 is dense
    with pytest.raises(ConfigError, match="give at least 2"):
        dec.truncate(lite, 1)
    with pytest.raises(ConfigError, match="give 1 to 32"):
        dec.truncate(spec, 33)


def test_decode_into_a_static_cache_matches_a_dynamic_one():
    """The GPU path preallocates a StaticCache of the planned context; positions must line up with it."""
    from prophet.wrap import allocate_kv_cache

    r = routes(seed=6)
    sched = schedule(r, 2, 4 + 1 + 5)
    routing = ForcedRouting(r.experts, sched.rows, "cpu")
    model = SPEC.tiny_model(seed=9)
    routing.attach(moe_layers(model))
    logits = []
    model.lm_head.register_forward_hook(lambda mod, a, o: logits.append(o[:, -1]))
    kwargs = dict(batch=2, prompt=4, steps=5, warmup=1)
    dec.decode(model, routing, **kwargs)
    dynamic, logits[:] = list(logits), []
    kv = allocate_kv_cache(model, torch.device("cpu"), 64, 2, torch.float32, static=True)
    for _ in range(2):  # the second run resets the cache first
        dec.decode(model, routing, kv=kv, **kwargs)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, dynamic, strict=True))
        logits[:] = []


@pytest.mark.parametrize("name", ["jamba", "mixtral"])
def test_a_reused_kv_cache_is_reset_for_each_run(name):
    from prophet.wrap import allocate_kv_cache

    spec = get_spec(name).tiny()
    model = spec.tiny_model(seed=2)
    kv = allocate_kv_cache(model, torch.device("cpu"), 32, 1, torch.float32, static=True)
    logits = []
    model.lm_head.register_forward_hook(lambda mod, a, o: logits.append(o[:, -1]))
    for _ in range(2):
        dec.decode(model, None, batch=1, prompt=3, steps=2, warmup=1, kv=kv)
    first, second = logits[:4], logits[4:]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first, second, strict=True))
