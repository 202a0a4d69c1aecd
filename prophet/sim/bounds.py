"""Speed bounds reported beside every replay, under the very capacity, link and compute the policies get.

A bound must never be beaten by a policy it bounds; each one here is a lower bound on the replay clock:

* ``all_resident``: the compute alone. The replay clock advances by each layer step's compute
  (`CostModel.layer_seconds` of its distinct experts), whatever the policy, so the sum over the schedule is a
  floor. It is summed step by step, exactly as the replay charges it (not from a mean distinct count).
* ``oracle``: compute and link together. Every expert a step uses must have crossed the link before its
  compute, copies run one after another, and no policy (prefetching or not) loads fewer experts into the same
  slots than Belady's offline eviction does (its miss count is the minimum number of loads). So the clock ends
  no earlier than ``max(compute, belady misses x copy time)``: Belady's loads perfectly overlapped with compute.
* ``all_miss`` is not a bound but a reference: every distinct expert of every step copied on demand, nothing
  overlapped.

Not a bound for policies that compute missed experts on the host CPU (``cpu_fallback``): they skip the link.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prophet.hardware import HardwareProfile, get_profile
from prophet.models.registry import get_spec
from prophet.models.spec import ModelSpec
from prophet.predict.data import as_router_trace
from prophet.sim.cost import CostModel, expected_distinct
from prophet.sim.replay import Schedule, replay, schedule


def schedule_compute_seconds(cost: CostModel, sched: Schedule) -> float:
    """GPU seconds of the whole schedule, charged per layer step from its distinct experts as replay does."""
    distinct = sched.distinct()  # [S, L]
    table = np.array([cost.layer_seconds(n, sched.batch) for n in range(int(distinct.max()) + 1)])
    return float(table[distinct].sum())


def bounds(
    spec: ModelSpec | str,
    profile: HardwareProfile | str,
    batch: int = 1,
    *,
    trace: Any = None,
    slots_per_layer: int | None = None,
    cache_slots: int | None = None,
    steps: int | None = None,
    context: int = 2048,
    dtype: torch.dtype = torch.bfloat16,
    expert_dtype: str | None = None,
    sched: Schedule | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Speed limits in tokens/s (see the module docstring): ``all_resident`` and, with a trace and a capacity,
    ``oracle`` bound every policy replayed on the same schedule; ``all_miss`` is a reference.

    Without ``trace``, distinct experts per layer come from uniform routing (`expected_distinct`).
    ``expert_dtype`` stores the experts quantized, as `replay` models them.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    profile = get_profile(profile)
    cost = CostModel(spec, profile, dtype, context, expert_dtype)
    if trace is not None:
        trace = as_router_trace(trace)
        sched = sched or schedule(trace, batch, steps)
        distinct = float(sched.distinct().mean())
        compute = schedule_compute_seconds(cost, sched) / sched.steps
    else:
        distinct = expected_distinct(spec.num_experts, spec.top_k, batch)
        compute = cost.token_seconds(distinct, batch)
    link = spec.num_moe_layers * distinct * cost.copy_seconds()
    all_experts = spec.num_moe_layers * spec.num_experts * cost.expert_bytes
    needed = spec.non_expert_bytes(dtype) + all_experts + spec.kv_bytes(context, dtype, batch)
    out: dict[str, Any] = {
        "all_resident": {"tokens_per_s": batch / compute, "step_s": compute, "fits": bool(needed <= profile.hbm_bytes),
                         "what": "compute only: every expert resident"},
        "all_miss": {"tokens_per_s": batch / (compute + link), "step_s": compute + link,
                     "what": "reference, not a bound: every distinct expert copied on demand, nothing overlapped"},
        "distinct_per_layer": distinct,
        "copy_ms_per_expert": cost.copy_seconds() * 1e3,
    }
    if trace is not None and (slots_per_layer or cache_slots):
        r = replay(trace, spec, profile, policy="belady", slots_per_layer=slots_per_layer, cache_slots=cache_slots,
                   batch=batch, context=context, dtype=dtype, expert_dtype=expert_dtype, sched=sched, progress=progress)
        loads = r.misses * cost.copy_seconds() / r.steps  # link seconds per step of the fewest possible loads
        step = max(compute, loads)
        out["oracle"] = {"tokens_per_s": batch / step, "step_s": step, "hit_rate": r.hit_rate,
                         "belady_misses": r.misses, "link_s": loads, "compute_s": compute,
                         "what": "Belady's loads (the fewest possible) fully overlapped with compute, same slots"}
    return out
