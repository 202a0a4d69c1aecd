"""The runtime and the simulator take the host decision in the same step: with every miss forced to the host,
the measured (CPU runtime, forced routing) and simulated counters agree exactly."""

import pytest
import torch

import prophet
from prophet import decode as dec
from prophet.config import PrefetchConfig
from prophet.models import get_spec
from prophet.predict.data import as_router_trace
from prophet.routing import ForcedRouting
from prophet.sim import replay, schedule
from prophet.trace.synth import synthetic_trace

SPEC = get_spec("mixtral").tiny()  # 2 MoE layers x 8 experts, top-2


@pytest.mark.parametrize("batch", [1, 3])
def test_forced_host_counts_agree_with_the_simulator(batch):
    r = as_router_trace(synthetic_trace(SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k, num_sequences=2,
                                        tokens_per_sequence=48, seed=4, progress=False))
    prompt, steps, slots = 4, 12, 5
    sched = schedule(r, batch, 1 + steps, prompt=prompt)
    model = dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=slots)
    routing = ForcedRouting(r.experts, sched.rows, "cpu")
    off = PrefetchConfig(enabled=False)
    dec.run_policies(model, [dec.PolicyRun("lru", "lru", None, off, on_miss="host")], routing, cache_slots=slots,
                     batch=batch, prompt=prompt, steps=steps, warmup=0)
    real = prophet.stats(model).total
    sim = replay(r, SPEC, "h100-sxm", cache_slots=slots, sched=sched, sequences=False, on_miss="host", prefetch=off,
                 progress=False)
    assert (real.hits, real.misses, real.host_experts) == (sim.hits, sim.misses, sim.cpu_misses)
    assert real.host_experts > 0 and real.bytes_h2d == 0 and sim.loads == 0


def test_replay_refuses_an_unknown_on_miss():
    r = as_router_trace(synthetic_trace(SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k, num_sequences=1,
                                        tokens_per_sequence=8, seed=0, progress=False))
    with pytest.raises(prophet.errors.ConfigError, match="on_miss"):
        replay(r, SPEC, "h100-sxm", cache_slots=4, on_miss="never", progress=False)


@pytest.mark.parametrize("on_miss", ["host", "auto"])
def test_a_cache_that_holds_every_expert_never_misses_in_the_runtime_or_the_simulator(on_miss):
    """Both load every expert before the first step when the slots hold them all (`Runtime.settle`); before, the
    simulator started empty and, computing misses on the host, stayed nearly empty (hit 0.125 beside 1.0)."""
    r = as_router_trace(synthetic_trace(SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k, num_sequences=2,
                                        tokens_per_sequence=24, seed=5, progress=False))
    prompt, steps, slots = 4, 8, SPEC.num_moe_layers * SPEC.num_experts
    sched = schedule(r, 1, 1 + steps, prompt=prompt)
    model = dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=slots)
    routing = ForcedRouting(r.experts, sched.rows, "cpu")
    off = PrefetchConfig(enabled=False)
    dec.run_policies(model, [dec.PolicyRun("lru", "lru", None, off, on_miss=on_miss)], routing, cache_slots=slots,
                     batch=1, prompt=prompt, steps=steps, warmup=0)
    real = prophet.stats(model).total
    sim = replay(r, SPEC, "h100-sxm", cache_slots=slots, sched=sched, sequences=False, on_miss=on_miss, prefetch=off,
                 progress=False)
    assert (real.hits, real.misses, real.host_experts) == (sim.hits, sim.misses, sim.cpu_misses)
    assert sim.misses == 0 and sim.hits > 0 and sim.stall_s == 0


@pytest.mark.parametrize("on_miss", ["copy", "host"])  # "auto" decides on measured CPU times
def test_warm_start_counts_agree_between_the_runtime_and_the_simulator(on_miss):
    """Both fill the free slots from the same warm-start order where the sequence starts (`Step.begin_sequence`),
    then count the same hits, misses and copies. The CPU runtime's copies land at once: the simulator's too
    (``overlap=False``), else a tiny model's steps end before a warm copy lands and "host" computes it there."""
    from prophet.warm import fitted_order

    r = as_router_trace(synthetic_trace(SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k, num_sequences=2,
                                        tokens_per_sequence=24, seed=6, progress=False))
    prompt, steps, slots = 4, 8, 6
    order = fitted_order([r.sequences([1])])
    sched = schedule(r, 1, 1 + steps, prompt=prompt)
    model = dec.random_model(SPEC, torch.float32, torch.device("cpu"), cache_slots=slots)
    routing = ForcedRouting(r.experts, sched.rows, "cpu")
    off = PrefetchConfig(enabled=False)
    counts = []
    for warm in (None, order):
        dec.run_policies(model, [dec.PolicyRun("lru", "lru", None, off, on_miss=on_miss, warm=warm)], routing,
                         cache_slots=slots, batch=1, prompt=prompt, steps=steps, warmup=0)
        real = prophet.stats(model).total
        sim = replay(r, SPEC, "h100-sxm", cache_slots=slots, sched=sched, sequences=False, on_miss=on_miss,
                     prefetch=off, progress=False, warm=warm, overlap=False)
        assert (real.hits, real.misses, real.host_experts, real.warmed) == (sim.hits, sim.misses, sim.cpu_misses,
                                                                             sim.warmed)
        counts.append((sim.hits, sim.warmed))
    assert counts[0][1] == 0 and counts[1][1] == slots  # the warm start filled every slot before the first step
