"""The simulator's validation: exact times at the extremes, monotone in bandwidth and capacity, deterministic,
consistent with the predictor harness, and the command line's JSON record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prophet.cli import main as cli_main
from prophet.config import PrefetchConfig
from prophet.errors import ConfigError
from prophet.models.registry import get_spec
from prophet.policies import LRU
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.predict.statistical import FrequencyPredictor
from prophet.sim import CostModel, bounds, get_profile, replay, schedule
from prophet.sim.replay import replay_counts
from prophet.trace import load

MIXTRAL = get_spec("mixtral-8x7b")
H100 = get_profile("h100-sxm")


def synthetic(steps: int, pattern: list[list[int]], layers: int = 32, sequences: int = 1) -> RouterTrace:
    """Mixtral-shaped trace whose token t routes every layer to ``pattern[t % len(pattern)]``."""
    experts = np.array([pattern[t % len(pattern)] for t in range(steps)], dtype=np.int64)  # [N, K]
    experts = np.repeat(experts[:, None, :], layers, axis=1)  # [N, L, K]
    offsets = np.linspace(0, steps, sequences + 1).astype(np.int64)
    return RouterTrace(
        experts=experts, weights=np.full(experts.shape, 0.5, np.float32), seq_offsets=offsets,
        exact=np.ones(experts.shape[:2], bool), num_experts=8,
    )


@pytest.fixture
def mixtral_trace(shared_traces) -> RouterTrace:
    return as_router_trace(load(shared_traces / "mixtral-8x7b_humaneval_decode.npz"))


def test_all_hits_cost_exactly_the_compute_time():
    # after the first step every expert is resident: each further step adds exactly the roofline compute
    trace = synthetic(400, [[0, 1], [1, 0]])
    short = replay(trace, MIXTRAL, H100, slots_per_layer=2, steps=100, progress=False)
    long = replay(trace, MIXTRAL, H100, slots_per_layer=2, steps=300, progress=False)
    per_step = 32 * CostModel(MIXTRAL, H100).layer_seconds(2, 1)
    assert long.misses == short.misses == 64  # cold misses only
    assert long.step_s * 300 - short.step_s * 100 == pytest.approx(200 * per_step, rel=1e-9)
    assert long.stall_s * 300 == pytest.approx(short.stall_s * 100, rel=1e-12)


def test_all_misses_without_overlap_cost_exactly_link_plus_compute():
    # two slots per layer, alternating expert pairs: every acquire misses both experts
    trace = synthetic(50, [[0, 1], [2, 3]])
    r = replay(trace, MIXTRAL, H100, slots_per_layer=2, overlap=False, progress=False)
    cost = CostModel(MIXTRAL, H100)
    assert r.hits == 0 and r.misses == 2 * 32 * 50
    link = 2 * 32 * H100.copy_seconds(MIXTRAL.expert_bytes())
    assert r.stall_s == pytest.approx(link, rel=1e-12)
    assert r.step_s == pytest.approx(link + 32 * cost.layer_seconds(2, 1), rel=1e-12)
    assert r.copy_busy_s == pytest.approx(link, rel=1e-12)


def test_overlap_hides_prefetch_copies_only(mixtral_trace):
    # demand misses are waited for at once, so without prefetch overlap changes nothing
    plain = [replay(mixtral_trace, MIXTRAL, H100, slots_per_layer=4, steps=120, overlap=o, progress=False) for o in (True, False)]
    assert plain[0].step_s == pytest.approx(plain[1].step_s, rel=1e-12)
    ungated = PrefetchConfig()  # every prediction copied: the link budget would drop most of them here
    kw = dict(slots_per_layer=4, predictor="cooccurrence", steps=120, progress=False, prefetch=ungated)
    on = replay(mixtral_trace, MIXTRAL, H100, **kw)
    off = replay(mixtral_trace, MIXTRAL, H100, overlap=False, **kw)
    assert on.stall_s < on.copy_busy_s  # part of the link time hid behind compute
    assert off.stall_s == pytest.approx(off.copy_busy_s, rel=1e-9)  # none did
    for r in (on, off, *plain):
        assert r.step_s == pytest.approx(r.compute_s + r.stall_s + r.cpu_s, rel=1e-9)


def test_faster_link_never_slows_replay(mixtral_trace):
    speeds = [
        replay(mixtral_trace, MIXTRAL, H100.replace(h2d_gb_s=bw), slots_per_layer=4, progress=False).tokens_per_s
        for bw in (12.0, 25.0, 55.0, 110.0)
    ]
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]


def test_more_slots_never_slow_replay(mixtral_trace):
    runs = [replay(mixtral_trace, MIXTRAL, H100, slots_per_layer=c, progress=False) for c in (2, 3, 4, 6, 8)]
    assert [r.hit_rate for r in runs] == sorted(r.hit_rate for r in runs)
    assert [r.tokens_per_s for r in runs] == sorted(r.tokens_per_s for r in runs)


def test_replay_is_deterministic(mixtral_trace):
    kw = dict(slots_per_layer=3, predictor="cooccurrence", batch=2, steps=80, progress=False)
    a, b = (replay(mixtral_trace, MIXTRAL, H100, **kw).to_dict() for _ in range(2))
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b


@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "frequency-prefetch"])
def test_batch_one_with_free_copies_matches_the_predictor_harness(mixtral_trace, prefetch):
    # the predictor harness is this replay at batch 1 with infinite bandwidth: same counters
    free = H100.replace(h2d_gb_s=1e30, copy_fixed_us=0.0)
    config = PrefetchConfig(enabled=prefetch)
    ours = replay(
        mixtral_trace, MIXTRAL, free, slots_per_layer=3, predictor=FrequencyPredictor(32, 8, 2), prefetch=config,
        progress=False,
    )
    theirs = replay_counts(mixtral_trace, LRU, slots_per_layer=3, predictor=FrequencyPredictor(32, 8, 2), prefetch=config)
    assert (ours.hits, ours.misses, ours.prefetches, ours.wasted_prefetches) == (
        theirs.hits, theirs.misses, theirs.prefetches, theirs.wasted_prefetches,
    )


def test_bounds_order_the_policies(mixtral_trace):
    b = bounds(MIXTRAL, H100, 1, trace=mixtral_trace, slots_per_layer=4)
    lru = replay(mixtral_trace, MIXTRAL, H100, slots_per_layer=4, progress=False)
    belady = replay(mixtral_trace, MIXTRAL, H100, policy="belady", slots_per_layer=4, progress=False)
    assert b["all_miss"]["tokens_per_s"] < lru.tokens_per_s < belady.tokens_per_s
    assert belady.tokens_per_s <= b["oracle"]["tokens_per_s"] < b["all_resident"]["tokens_per_s"]
    assert belady.hit_rate == pytest.approx(0.751, abs=0.005)  # traces/README.md reference, 4 of 8 slots
    assert b["all_resident"]["fits"] is False  # bf16 Mixtral does not fit in 80 GB


def test_batch_dedups_the_union_of_interleaved_lanes(mixtral_trace):
    sched = schedule(mixtral_trace, batch=4, steps=10)
    n = mixtral_trace.num_tokens
    assert sched.rows[0].tolist() == [0, n // 4, n // 2, 3 * n // 4]
    want = sorted({int(e) for e in mixtral_trace.experts[sched.rows[3], 5].ravel() if e >= 0})
    assert sched.ids(3, 5) == want
    r = replay(mixtral_trace, MIXTRAL, H100, slots_per_layer=2, batch=4, steps=10, progress=False)
    assert r.batch == 4 and r.distinct_per_layer > 2  # more experts than the pool: waves, no error


def test_cpu_fallback_counts_cpu_misses_and_refuses_belady(mixtral_trace):
    r = replay(mixtral_trace, MIXTRAL, H100, slots_per_layer=2, cpu_fallback=True, steps=60, progress=False)
    assert r.cpu_misses > 0 and r.cpu_s > 0
    assert r.step_s == pytest.approx(r.compute_s + r.stall_s + r.cpu_s, rel=1e-9)
    with pytest.raises(ConfigError, match="cpu_fallback"):
        replay(mixtral_trace, MIXTRAL, H100, policy="belady", slots_per_layer=2, cpu_fallback=True, progress=False)


def test_trace_of_another_model_is_refused(mixtral_trace):
    with pytest.raises(ConfigError, match="replay a trace of that model"):
        replay(mixtral_trace, get_spec("olmoe"), H100, slots_per_layer=2, progress=False)


def test_command_line_ends_with_one_json_record(shared_traces, capsys):
    trace = str(shared_traces / "mixtral-8x7b_humaneval_decode.npz")
    assert cli_main(["replay", "--trace", trace, "--policy", "lru,belady", "--slots-per-layer", "4", "--steps", "40"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["policy"] for r in record["results"]] == ["lru", "belady"]
    assert {"all_resident", "all_miss", "oracle"} <= set(record["bounds"])
    assert record["config"]["model"] == "Mixtral-8x7B" and record["hardware"]["name"] == "h100-sxm"


@pytest.mark.benchmark
def test_benchmark_replays_10k_mixtral_tokens(benchmark, mixtral_trace):
    result = benchmark.pedantic(
        replay, args=(mixtral_trace, MIXTRAL, H100), kwargs=dict(slots_per_layer=4, steps=10_000, progress=False),
        rounds=1, iterations=1,
    )
    assert result.steps == 10_000
    assert benchmark.stats.stats.max <= 10.0


def test_link_budget_makes_prophet_at_least_as_fast_as_lru_out_of_sample(mixtral_trace):
    """Batch 1 over PCIe is link-bound: copying every prediction spends link time that a layer's compute cannot
    hide. Within the budget, prediction-aware eviction with path matching (fit on sequence 0, replayed on
    sequence 1) is clearly faster than LRU and than copying every prediction."""
    from prophet.predict.pathmatch import PathMatchPredictor

    train, test = mixtral_trace.sequences([0]), mixtral_trace.sequences([1])
    kw = dict(cache_slots=172, progress=False)

    def prophet(prefetch):
        p = PathMatchPredictor(32, 8, 2).fit([train])
        return replay(test, MIXTRAL, H100, policy=p.policy_factory(), predictor=p,
                      prefetch=prefetch, **kw)

    lru = replay(test, MIXTRAL, H100, **kw)
    budgeted, ungated = prophet(None), prophet(PrefetchConfig())
    assert budgeted.tokens_per_s > 1.2 * lru.tokens_per_s and budgeted.tokens_per_s > 1.1 * ungated.tokens_per_s
    assert budgeted.prefetches < ungated.prefetches / 5 and budgeted.hit_rate > lru.hit_rate
