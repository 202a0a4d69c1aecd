"""``prophet-bench replay``: replay a router trace under a hardware cost model, policy by policy.

Example: ``prophet-bench replay --trace ../shared/traces/mixtral-8x7b_humaneval_decode.npz --policy
lru,lfu,belady,prophet --cache-slots 172 --gpu h100-sxm``. Policy ``prophet`` is prediction-aware eviction plus
prefetch, from ``--predictor`` (default: the one chosen by simulated speed for the miss mode,
`prophet.sim.replay.PROPHET_PREDICTOR`); ``--predictor`` also prefetches
for every other policy given. Predictors learn out of sample: from ``--fit``, else from the first half of the
trace's sequences while the rest is replayed (``--in-sample`` to fit on the replayed routing itself, labelled).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from prophet.bench import resolve_model, trace_name
from prophet.cli.common import add_out, names, positive
from prophet.errors import TraceError
from prophet.hardware import get_profile, list_profiles
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.provenance import git_sha, versions

HELP = "replay a router trace through the cache, policies and prefetcher under a hardware cost model"


def register(sub: Any) -> None:
    p = sub.add_parser("replay", help=HELP, description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="trace path (any format prophet.trace.load reads)")
    p.add_argument("--fit", default=None, help="trace the predictors learn from (default: split --trace)")
    p.add_argument("--in-sample", action="store_true", help="fit on the replayed routing itself (labelled)")
    p.add_argument("--repeat", action="store_true", help="allow --steps beyond the trace (replays it again)")
    p.add_argument("--model", help="registry alias, <alias>-tiny or checkpoint dir (default: the registry model "
                   "matching the trace's shape)")
    p.add_argument("--policy", type=names, default=("lru",),
                   help="comma list of lru, lfu, fifo, belady, predicted, prophet")
    p.add_argument("--predictor", default=None, help="prefetch predictor for every policy (e.g. cooccurrence, oracle)")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("--slots-per-layer", type=positive, help="expert slots in each MoE layer's pool")
    cap.add_argument("--cache-slots", type=positive, help="expert slots in one pool shared by all layers")
    p.add_argument("--gpu", default="h100-sxm", help=f"profile ({', '.join(list_profiles())}) or calibration JSON path")
    p.add_argument("--batch", type=positive, default=1, help="sequences decoded together (interleaved from the trace)")
    p.add_argument("--steps", type=positive, default=None, help="decode steps (default: every replayed token once)")
    p.add_argument("--context", type=positive, default=2048, help="KV tokens per sequence read at each step")
    p.add_argument("--expert-dtype", default=None, help="experts stored quantized: int4, int8, fp8, mxfp4, or a "
                   "modelled width such as 2.6bit (default: bf16)")
    p.add_argument("--no-overlap", action="store_true", help="copies block compute (synchronous engine)")
    p.add_argument("--on-miss", choices=("copy", "auto", "host"), default="copy",
                   help="where missed experts run; auto or host adds those rows beside the copy-only ones")
    p.add_argument("--cpu-fallback", action="store_true", help="the same as --on-miss auto")
    p.add_argument("--prefetch", choices=("budget", "all", "none"), default="budget",
                   help="which predictions are copied ahead: within the link budget, all of them, or none")
    p.add_argument("--progress", action="store_true", help="show a progress bar per replay")
    add_out(p)
    p.set_defaults(handler=main)


def _read(path: str, flag: str) -> RouterTrace:
    """A trace file as a `RouterTrace` named after its model."""
    from prophet.trace import load

    if not Path(path).exists():
        raise TraceError(f"{flag} {path}: no such file or directory; give a trace path")
    trace = load(path)
    return dataclasses.replace(as_router_trace(trace), name=trace_name(path))


def main(args: argparse.Namespace) -> dict[str, Any]:
    from prophet.sim.compare import check_policies, infer_spec, replay_record

    check_policies(args.policy, args.predictor, everywhere=True)
    profile = get_profile(args.gpu)
    spec = resolve_model(args.model) if args.model else None
    trace = _read(args.trace, "--trace")
    spec = spec or infer_spec(trace)
    fit = None if args.fit is None else _read(args.fit, "--fit")
    for flag, t in (("--trace", trace), ("--fit", fit)):
        if t is not None and (t.num_layers, t.num_experts) != (spec.num_moe_layers, spec.num_experts):
            raise TraceError(f"{flag} {t.name} has {t.num_layers} MoE layers x {t.num_experts} experts but {spec.name} "
                             f"has {spec.num_moe_layers} x {spec.num_experts}; give a trace of that model or --model")
    record = replay_record(trace, spec, profile, args.policy, predictor=args.predictor, fit=fit,
                           in_sample=args.in_sample, slots_per_layer=args.slots_per_layer,
                           cache_slots=args.cache_slots, batch=args.batch, steps=args.steps, repeat=args.repeat,
                           context=args.context, overlap=not args.no_overlap,
                           on_miss="auto" if args.cpu_fallback else args.on_miss,
                           prefetch=args.prefetch, expert_dtype=args.expert_dtype, progress=args.progress)
    config = {k: v for k, v in vars(args).items() if k not in ("handler", "progress", "out")}
    record |= {"config": config | {"model": spec.name, "trace_name": trace.name, "policy": list(args.policy)},
               "versions": versions(), "git_sha": git_sha()}
    _summary(record)
    return record


def _summary(record: dict[str, Any]) -> None:
    from prophet.sim.compare import best_line

    b, s = record["bounds"], record["sample"]
    print(f"simulated on the {record['hardware']['name']} profile; sample: {s['how']}; steps: {s['steps']}",
          file=sys.stderr)
    oracle = b.get("oracle", {}).get("tokens_per_s", float("nan"))
    print(f"bounds tok/s: all-resident {b['all_resident']['tokens_per_s']:.2f}, Belady's loads overlapped with "
          f"compute {oracle:.2f}; reference: all-miss {b['all_miss']['tokens_per_s']:.2f}", file=sys.stderr)
    for r in record["results"]:
        print(f"{r['policy']:>10}: hit {r['hit_rate']:.3f}  {r['tokens_per_s']:.2f} tok/s", file=sys.stderr)
    verdict = best_line(record["results"])
    if verdict:
        print(verdict, file=sys.stderr)
