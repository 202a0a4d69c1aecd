"""``replay_main``: the replay command that ``prophet-bench`` mounts; its last output line is one JSON record.

Example: ``--trace ../shared/traces/mixtral-8x7b_humaneval_decode.npz --policy lru,lfu,belady
--slots-per-layer 4 --gpu h100-sxm`` prints one line ``{"results": [...], "bounds": {...}, "config": {...}, ...}``.
Policy ``prophet`` is prediction-aware eviction plus prefetch from ``--predictor`` (default co-occurrence).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prophet.errors import ConfigError
from prophet.hardware import get_profile, list_profiles
from prophet.models.registry import get_spec, list_specs
from prophet.models.spec import ModelSpec
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.provenance import git_sha, versions
from prophet.sim.replay import bounds, make_predictor, policy_args, replay, schedule


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prophet-bench replay", description="Replay a router trace under a hardware cost model.")
    p.add_argument("--trace", required=True, help="trace path (any format prophet.trace.load reads)")
    p.add_argument("--model", help="model spec name (default: the registry model matching the trace's shape)")
    p.add_argument("--policy", default="lru", help="comma list of lru, lfu, fifo, belady, predicted, prophet")
    p.add_argument("--predictor", default=None, help="prefetch predictor for every policy (e.g. cooccurrence, oracle)")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("--slots-per-layer", type=int, help="expert slots in each MoE layer's pool")
    cap.add_argument("--cache-slots", type=int, help="expert slots in one pool shared by all layers")
    p.add_argument("--gpu", default="h100-sxm", help=f"profile ({', '.join(list_profiles())}) or calibration JSON path")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (interleaved from the trace)")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default: every trace token once)")
    p.add_argument("--context", type=int, default=2048, help="KV tokens per sequence read at each step")
    p.add_argument("--no-overlap", action="store_true", help="copies block compute (synchronous engine)")
    p.add_argument("--cpu-fallback", action="store_true", help="run missed experts on the host CPU")
    p.add_argument("--progress", action="store_true", help="show a progress bar per replay")
    return p


def _load_trace(path: str) -> RouterTrace:
    from prophet.trace import load

    return as_router_trace(load(path))


def infer_spec(trace: RouterTrace) -> ModelSpec:
    """The first registry model whose MoE layers, experts and top-k match the trace."""
    shape = (trace.num_layers, trace.num_experts, trace.top_k)
    for spec in list_specs():
        if (spec.num_moe_layers, spec.num_experts, spec.top_k) == shape:
            return spec
    raise ConfigError(f"no registry model has {shape} (MoE layers, experts, top-k); pass --model")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON record of one command: results per policy and the bounds beside them."""
    trace = _load_trace(args.trace)
    spec = get_spec(args.model) if args.model else infer_spec(trace)
    profile = get_profile(args.gpu)
    sched = schedule(trace, args.batch, args.steps)
    cap = {"slots_per_layer": args.slots_per_layer, "cache_slots": args.cache_slots}
    common = dict(batch=args.batch, context=args.context, sched=sched, progress=args.progress, **cap)
    results = []
    for name in [p.strip() for p in args.policy.split(",") if p.strip()]:
        policy, predictor = policy_args(name, args.predictor)
        if isinstance(predictor, str):
            predictor = make_predictor(predictor, trace, sched)
        r = replay(
            trace, spec, profile, policy=policy, predictor=predictor, overlap=not args.no_overlap,
            cpu_fallback=args.cpu_fallback, **common,
        )
        results.append({**r.to_dict(), "policy": name})
    limits = bounds(spec, profile, args.batch, trace=trace, context=args.context, sched=sched, **cap)
    return {
        "results": results,
        "bounds": limits,
        "hardware": profile.to_dict(),
        "config": {k: v for k, v in vars(args).items() if k != "progress"} | {"model": spec.name, "trace_name": trace.name},
        "versions": versions(),
        "git_sha": git_sha(),
    }


def replay_main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, replay each policy, print a short table to stderr and the JSON record as the last line."""
    args = parser().parse_args(argv)
    record = run(args)
    b = record["bounds"]
    print(f"bounds tok/s: all-resident {b['all_resident']['tokens_per_s']:.2f}, all-miss "
          f"{b['all_miss']['tokens_per_s']:.2f}, oracle {b.get('oracle', {}).get('tokens_per_s', float('nan')):.2f}",
          file=sys.stderr)
    for r in record["results"]:
        print(f"{r['policy']:>10}: hit {r['hit_rate']:.3f}  {r['tokens_per_s']:.2f} tok/s", file=sys.stderr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(replay_main())
