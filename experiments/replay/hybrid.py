"""Hybrid execution in the simulator: copy-only LRU vs misses computed on the host, LRU and Prophet's policy.

Out of sample: path matching is fitted on sequence 0 of the shared Mixtral trace and replayed on sequence 1.
Plans: H100 at 128K context (172 shared slots) and RTX 4090 at 8K (48 slots), from `prophet.plan.plan`.
Rows per profile:

    copy LRU                 every miss copied (``on_miss="copy"``)
    host LRU, no admission   every miss on the host and never copied (``on_miss="host"``)
    hybrid LRU               ``on_miss="auto"``: the step's `prophet.hybrid.decide` per missed expert (wait for
                             its in-flight copy, copy, or host), host experts admitted in the background, up to
                             8 copies in flight (the replay's default)
    hybrid LRU, 1 in flight  admissions one at a time: a copy never queues behind another
    prophet hybrid (...)     path-matching eviction, prefetch within the link budget, same admission settings
    prophet hybrid (value)   `prophet.predict.value.ValuePredictor` at its defaults (chosen on sequence 0 by
                             `policy_select.py`): value eviction, prefetch a token ahead, hot-expert admission
                             (a copy only when worth more than its victim), 1 in flight

Beside them, `prophet.hybrid.decide` on the trace's token counts per expert: the share of missed experts it
copies rather than computes on the host, by batch (every distinct expert of a step taken as missed).

    python experiments/replay/hybrid.py  ->  experiments/results/sim_hybrid.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from prophet.config import PrefetchConfig
from prophet.envs import shared_traces_dir
from prophet.hybrid import Choice, decide
from prophet.models.registry import get_spec
from prophet.plan import plan
from prophet.predict.data import as_router_trace
from prophet.predict.pathmatch import PathMatchPredictor
from prophet.predict.value import ValuePredictor
from prophet.provenance import git_sha, versions
from prophet.sim import get_profile, replay, schedule
from prophet.sim.cost import CostModel
from prophet.trace import load

ROOT = Path(__file__).resolve().parents[2]
CASES = (("h100-sxm", 131072), ("rtx-4090", 8192))
KEYS = ("tokens_per_s", "hit_rate", "stall_s", "cpu_s", "compute_s", "prefetches", "prefetch_hits", "cpu_misses")


def _row(name: str, r: Any) -> dict[str, Any]:
    d = r.to_dict()
    return {"row": name, **{k: round(d[k], 4) if isinstance(d[k], float) else d[k] for k in KEYS}}


def copy_share(trace: Any, cost: CostModel, batches: tuple[int, ...], steps: int = 60) -> dict[int, float]:
    """Share of missed experts `decide` copies, every distinct expert of each step-layer counted missed."""
    costs = cost.miss_costs()
    out = {}
    for b in batches:
        sched = schedule(trace, b, steps)
        copied = total = 0
        for s in range(sched.steps):
            for layer in range(sched.num_layers):
                ids, counts = np.unique(trace.experts[sched.rows[s], layer], return_counts=True)
                tokens = {int(e): int(c) for e, c in zip(ids, counts, strict=True) if e >= 0}
                d = decide(tokens, costs, cost.layer_seconds(len(tokens), b))
                copied += len(d.experts(Choice.COPY))
                total += len(tokens)
        out[b] = round(copied / total, 4)
    return out


def panel(spec: Any, trace: Any, gpu: str, context: int) -> dict[str, Any]:
    """Every row of one profile, out of sample (fit on sequence 0, replay sequence 1)."""
    train, test = trace.sequences([0]), trace.sequences([1])
    slots = plan(spec, gpu, context).expert_slots
    cost = CostModel(spec, get_profile(gpu), context=context)
    one = PrefetchConfig(enabled=False, max_inflight=1)
    budgeted = PrefetchConfig(max_inflight=1, **cost.link_budget(2.0, 1))
    runs: dict[str, dict[str, Any]] = {  # row -> replay arguments (prophet: fitted path matching)
        "copy LRU": {},
        "copy prophet": {"prophet": True},
        "host LRU, no admission": {"on_miss": "host"},
        "hybrid LRU": {"on_miss": "auto"},
        "hybrid LRU, 1 in flight": {"on_miss": "auto", "prefetch": one},
        "prophet hybrid": {"prophet": True, "on_miss": "auto"},
        "prophet hybrid, 1 in flight, no prefetch": {"prophet": True, "on_miss": "auto", "prefetch": one},
        "prophet hybrid, 1 in flight, budgeted prefetch": {"prophet": True, "on_miss": "auto", "prefetch": budgeted},
        "prophet hybrid (value), hot-expert admission, 1 in flight": {
            "value": True, "on_miss": "auto", "prefetch": PrefetchConfig(max_inflight=1)},
    }
    rows = []
    for name, args in tqdm(runs.items(), desc=gpu):
        args = dict(args)
        made = {"prophet": PathMatchPredictor, "value": ValuePredictor}
        for key in [k for k in made if args.pop(k, False)]:
            p = made[key](trace.num_layers, trace.num_experts, trace.top_k).fit([train])
            args.update(policy=p.policy_factory(), predictor=p)
        rows.append(_row(name, replay(test, spec, gpu, cache_slots=slots, context=context, progress=False, **args)))
    tps = {r["row"]: r["tokens_per_s"] for r in rows}
    best_lru = max(tps["hybrid LRU"], tps["hybrid LRU, 1 in flight"])
    best_prophet = max(v for k, v in tps.items() if k.startswith("prophet hybrid"))
    return {
        "gpu": gpu, "context": context, "slots": slots, "rows": rows,
        "ratios": {
            "hybrid_lru_vs_copy_lru": round(best_lru / tps["copy LRU"], 3),
            "prophet_hybrid_vs_hybrid_lru": round(best_prophet / best_lru, 3),
            "prophet_hybrid_vs_hybrid_lru_same_admission": round(
                tps["prophet hybrid, 1 in flight, no prefetch"] / tps["hybrid LRU, 1 in flight"], 3),
        },
        "miss_costs_ms": {k: round(v * 1e3, 4) for k, v in vars(cost.miss_costs()).items()},
        "host_breakeven_tokens": round(cost.miss_costs().host_breakeven_tokens(), 1),
        "decide_copy_share_by_batch": copy_share(test, cost, (1, 8, 32, 64, 128)),
    }


def main() -> None:
    spec = get_spec("mixtral-8x7b")
    trace = as_router_trace(load(shared_traces_dir() / "mixtral-8x7b_humaneval_decode.npz"))
    panels = []
    for gpu, context in CASES:
        panels.append(panel(spec, trace, gpu, context))
        for r in panels[-1]["rows"]:
            print(f"{gpu:9s} {r['row']:48s} {r['tokens_per_s']:7.2f} tok/s  hit {r['hit_rate']:.3f}  "
                  f"stall {r['stall_s'] * 1e3:6.2f} ms  host {r['cpu_s'] * 1e3:6.2f} ms")
        print(gpu, panels[-1]["ratios"], panels[-1]["decide_copy_share_by_batch"])
    record = {
        "what": "Mixtral-8x7B, shared humaneval decode trace, batch 1; path matching fitted on sequence 0, replayed "
                "on sequence 1 (out of sample); slots from prophet.plan (one shared pool)",
        "targets": {"h100 hybrid LRU / copy LRU": 3.0, "h100 prophet hybrid / hybrid LRU": 1.1,
                    "rtx-4090 hybrid LRU / copy LRU": 4.0},
        "panels": panels, "versions": versions(), "git": git_sha(),
    }
    out = ROOT / "experiments" / "results" / "sim_hybrid.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
