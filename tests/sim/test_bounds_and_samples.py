"""Bounds are never beaten (on fresh random routing, and in every committed result a figure plots); samples
keep fitting and replaying apart; the summary's verdict only names policies that can run online."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prophet.config import PrefetchConfig
from prophet.errors import ConfigError
from prophet.models.registry import get_spec
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.predict.pathmatch import PathMatchPredictor
from prophet.sim import bounds, replay, schedule
from prophet.sim.compare import best_line
from prophet.sim.samples import replay_steps, split_sample
from prophet.trace.synth import synthetic_trace

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
SPEC = dataclasses.replace(get_spec("mixtral"), num_layers=2)  # Mixtral's sizes, 2 MoE layers: fast
TOL = 1 + 1e-9


def fresh_trace(seed: int) -> RouterTrace:
    return as_router_trace(synthetic_trace(2, 8, 2, num_sequences=2, tokens_per_sequence=40, seed=seed,
                                           progress=False))


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(("batch", "slots"), [(1, 4), (1, 9), (3, 6), (3, 12)])
def test_no_policy_beats_the_bounds_on_fresh_random_routing(seed, batch, slots):
    trace = fresh_trace(seed)
    sched = schedule(trace, batch)
    kw = dict(cache_slots=slots, batch=batch, sched=sched, progress=False)
    b = bounds(SPEC, "h100-sxm", trace=trace, **kw)
    speeds = {p: replay(trace, SPEC, "h100-sxm", policy=p, **kw).tokens_per_s for p in ("lru", "lfu", "fifo", "belady")}
    for name, prefetch in (("budget", None), ("all", PrefetchConfig())):
        pred = PathMatchPredictor(2, 8, 2).fit([trace])  # in sample on purpose: the most a predictor can know
        speeds[f"prophet {name}"] = replay(trace, SPEC, "h100-sxm", policy=pred.policy_factory(), predictor=pred,
                                           prefetch=prefetch, **kw).tokens_per_s
    speeds["oracle prefetch"] = replay(trace, SPEC, "h100-sxm", policy="belady", predictor="oracle", **kw).tokens_per_s
    for name, speed in speeds.items():
        assert speed <= b["oracle"]["tokens_per_s"] * TOL, name
        assert speed <= b["all_resident"]["tokens_per_s"] * TOL, name


def _bounded(node: Any) -> list[tuple[dict, dict]]:
    """Every (bounds, result row) pair of a simulated record, anywhere in a results file."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("bounds"), dict) and isinstance(node.get("results"), list) and node.get("mode") != "measured":
            found += [(node["bounds"], r) for r in node["results"] if isinstance(r, dict)]
        for value in node.values():
            found += _bounded(value)
    elif isinstance(node, list):
        for value in node:
            found += _bounded(value)
    return found


def test_no_policy_beats_a_plotted_bound_in_the_committed_results():
    pairs = [pair for path in sorted(RESULTS.glob("*.json")) for pair in _bounded(json.loads(path.read_text()))]
    checked = 0
    for b, r in pairs:
        if r.get("tokens_per_s") is None or r.get("cpu_fallback") or r.get("policy") == "all-resident":
            continue
        for key in ("all_resident", "oracle"):
            if key in b:
                assert r["tokens_per_s"] <= b[key]["tokens_per_s"] * TOL, (r["policy"], key, r["tokens_per_s"], b[key])
                checked += 1
    assert checked >= 50  # sim_vram, sim_context and the README's replays all hold bounded rows


def test_sequences_split_in_half_and_one_sequence_is_cut():
    trace = fresh_trace(0)
    s = split_sample(trace)
    assert (s.fit.num_tokens, s.replay.num_tokens, s.in_sample) == (40, 40, False)
    assert np.array_equal(s.replay.experts, trace.experts[40:]) and "out of sample" in s.how
    one = trace.sequences([0])
    cut = split_sample(one)
    assert (cut.fit.num_tokens, cut.replay.num_tokens) == (20, 20) and "first 20 tokens" in cut.how
    assert split_sample(trace, in_sample=True).fit is trace and "IN SAMPLE" in split_sample(trace, in_sample=True).how
    other = fresh_trace(5)
    assert split_sample(trace, fit=other).replay is trace and split_sample(trace, fit=other).fit is other
    assert split_sample(trace, learns=False).fit is None and split_sample(trace, learns=False).replay is trace
    with pytest.raises(ConfigError, match="contradict"):
        split_sample(trace, fit=other, in_sample=True)


def test_steps_never_replay_a_token_twice_unless_asked():
    assert replay_steps(100, 1, None, False)[0] == 100
    assert replay_steps(100, 3, None, False, lead=10)[0] == 23  # 33 rows per lane, 10 lead
    with pytest.raises(ConfigError, match="add --repeat"):
        replay_steps(100, 1, 101, False)
    steps, note = replay_steps(100, 2, 100, True)
    assert steps == 100 and "2.00 times" in note
    with pytest.raises(ConfigError, match="leave no step"):
        replay_steps(10, 1, None, False, lead=16)


def test_best_names_only_online_policies_and_never_a_slower_one():
    rows = [{"policy": "lru", "tokens_per_s": 5.0}, {"policy": "belady", "tokens_per_s": 9.0},
            {"policy": "lfu", "predictor": "oracle", "tokens_per_s": 8.0}, {"policy": "prophet", "tokens_per_s": 6.0}]
    assert best_line(rows).startswith("best: prophet 6.00 tok/s = 1.20x LRU")
    rows[-1]["tokens_per_s"] = 4.0
    assert "no online policy beats it" in best_line(rows)
