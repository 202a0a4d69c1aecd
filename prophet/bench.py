"""``prophet-bench``: plan the GPU memory for a model and context, then measure (or simulate) decode speed.

Both modes print the memory plan first. On a GPU it measures decode (`prophet.decode`): a checkpoint's own
weights and routing (``--weights real``), or random weights of the model's real shape with routing forced from
a trace (``--weights random``), with the plan's share of expert slots; it reports tokens/s, hit rate,
host->device GB/s and peak VRAM per policy, the simulator's estimate for the same run, and the bounds. Without
a GPU (or with ``--simulate``) it replays the trace through `prophet.sim` instead. ``--device cpu`` measures on
the CPU (for small models and for checking the harness). The default trace is a synthetic one for the model's
shape (`prophet.trace.synth`), so the command runs on a fresh machine. The last stdout line is one JSON record;
bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from prophet.errors import ProphetError, TraceError, UnsupportedModelError
from prophet.models.registry import get_spec, list_specs
from prophet.models.spec import ModelSpec
from prophet.plan import DEFAULT_GPU, Plan, detect_gpu, plan
from prophet.provenance import git_sha, versions

SYNTH_SEQUENCES, SYNTH_TOKENS = 4, 128  # 512 synthetic tokens: ~1 s to generate, lanes cycle through them
PROMPT_TOKENS = 16  # prefill length of a measured decode; its routing is the trace rows before the decode's
TINY_SUFFIX = "-tiny"  # --model mixtral-tiny: the registry model's toy-sized twin (ModelSpec.tiny)
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


class _UsageError(ProphetError):
    """A command-line value is malformed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit code 2 through main, not argparse's usage dump
        raise _UsageError(message)


def parse_tokens(text: str) -> int:
    """``32768``, ``128k`` (131072) or ``1m`` (1048576) -> tokens."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"--ctx {text!r}: give a positive token count such as 32768, 128k or 1m")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prophet-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral", help="registry alias (e.g. mixtral, olmoe) or a local checkpoint dir")
    p.add_argument("--ctx", type=parse_tokens, default=None, help="context per sequence: 32768, 128k, 1m (default: trained)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--gpu", default=None, help=f"hardware profile (default: the detected GPU, else {DEFAULT_GPU})")
    p.add_argument("--weights", choices=("real", "random"), default="random",
                   help="measured decode: the checkpoint's weights (--model is a checkpoint dir) or random weights")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="measure decode here (auto: on the GPU when there is one, else simulate)")
    p.add_argument("--simulate", action="store_true", help="replay in the simulator even when a GPU is present")
    p.add_argument("--layers", type=int, default=None,
                   help="random weights: build the first N layers only (default: all whose experts fit in host RAM)")
    p.add_argument("--slots", type=int, default=None, help="expert slots for the whole model, instead of the plan's")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16 or fp8")
    p.add_argument("--expert-dtype", default=None, help="simulate experts stored quantized: int4, int8, fp8, mxfp4, "
                   "or a modelled width: int2..int7, or <b>bit such as 2.6bit (default: bf16)")
    p.add_argument("--trace", default=None, help="router trace to replay or force (default: synthetic, for the "
                   "model's shape); with --weights real, the routing the predictor learns from")
    p.add_argument("--policy", default="lru,prophet", help="comma list: lru, lfu, fifo, belady, prophet")
    p.add_argument("--predictor", default=None, help="predictor of the prophet policy (default: pathmatch); "
                   "the other policies run on demand")
    p.add_argument("--steps", type=int, default=512, help="decode steps to replay or time")
    p.add_argument("--warmup", type=int, default=16, help="measured decode: untimed steps after the prefill")
    p.add_argument("--compare", action="store_true", help="add the baselines: on-demand LRU and all experts resident")
    p.add_argument("--out", default=None, help="also write the JSON record to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def resolve_model(name: str) -> ModelSpec:
    """A registry spec by alias (``<alias>-tiny`` for its toy twin), or the one whose shape matches a local
    checkpoint's ``config.json``."""
    path = Path(name)
    if not path.is_dir():
        if name.lower().endswith(TINY_SUFFIX):
            return get_spec(name[: -len(TINY_SUFFIX)]).tiny()
        return get_spec(name)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"--model {name}: the folder has no config.json; give a checkpoint dir or a registry alias")
    cfg = json.loads(config_file.read_text())
    for spec in [*list_specs(), *(s.tiny() for s in list_specs())]:
        ref = spec.hf_config().to_dict()
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        if all(cfg.get(k) == ref.get(k) for k in keys if k in ref):
            return spec
    raise UnsupportedModelError(
        f"--model {name}: no registry model has this config's shape (model_type={cfg.get('model_type')!r}, "
        f"hidden_size={cfg.get('hidden_size')}); pass a registry alias with the same shape"
    )


def _profile_name(gpu: str | None) -> tuple[str, int | None, str | None]:
    """``(profile for the simulator, device bytes for the plan or None to use the profile's, detected name)``."""
    from prophet.sim import list_profiles

    if gpu is not None:
        return gpu, None, None
    found = detect_gpu()
    if found is None:
        return DEFAULT_GPU, None, None
    name, total = found
    for profile in list_profiles():
        fragment = profile.split("-")[0] if not profile.startswith("rtx-") else profile[4:]
        if re.search(rf"\b{re.escape(fragment)}\b", name.lower()):
            return profile, total, name
    return DEFAULT_GPU, total, name


def load_trace(path: str | None, spec: ModelSpec, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The trace to replay and a description naming it and its origin; refuses one of another shape."""
    if path is None:
        from prophet.trace.synth import synthetic_trace

        trace = synthetic_trace(spec.num_moe_layers, spec.num_experts, spec.top_k,
                                num_sequences=SYNTH_SEQUENCES, tokens_per_sequence=SYNTH_TOKENS, progress=progress)
        origin = f"synthetic (prophet.trace.synth for {spec.num_moe_layers} layers x {spec.num_experts} experts, top-{spec.top_k}, seed 0)"
        name = trace.model.name
    else:
        from prophet.trace import load

        if not Path(path).exists():
            raise TraceError(f"--trace {path}: no such file; give a trace path or leave --trace out for a synthetic one")
        trace = load(path)
        origin, name = f"file {path}", trace.model.name
    shape = (trace.model.num_layers, trace.model.num_experts)
    if shape != (spec.num_moe_layers, spec.num_experts):
        raise TraceError(
            f"--trace {name} has {shape[0]} MoE layers x {shape[1]} experts but {spec.name} has "
            f"{spec.num_moe_layers} x {spec.num_experts}; replay a trace of {spec.name} or pick the matching --model"
        )
    info = {"name": name, "origin": origin, "tokens": int(trace.experts.shape[0]),
            "layers": shape[0], "experts": shape[1], "top_k": trace.model.top_k}
    return trace, info


def fit_trace(args: argparse.Namespace, spec: ModelSpec, trace: Any, info: dict[str, Any]) -> Any:
    """The routing predictors learn from: for the synthetic trace other tokens from the same generator (out of
    sample); for a trace file the file itself (in sample, optimistic). ``info`` records which."""
    from prophet.predict.data import as_router_trace

    if args.trace is not None:
        info["predictor_fit"] = "the replayed trace itself (in sample)"
        return as_router_trace(trace)
    from prophet.trace.synth import synthetic_trace

    info["predictor_fit"] = "other tokens from the same synthetic generator (sample seed 1, out of sample)"
    return as_router_trace(synthetic_trace(spec.num_moe_layers, spec.num_experts, spec.top_k,
                                           num_sequences=SYNTH_SEQUENCES, tokens_per_sequence=SYNTH_TOKENS,
                                           sample_seed=1, progress=not args.no_progress))


def _first_layers(trace: Any, layers: int) -> Any:
    """A `RouterTrace` of the first ``layers`` MoE layers (what a model cut to its first layers runs)."""
    return dataclasses.replace(trace, experts=trace.experts[:, :layers], weights=trace.weights[:, :layers],
                               exact=trace.exact[:, :layers], hidden=None)


def simulate(args: argparse.Namespace, spec: ModelSpec, memory: Plan, profile: str, trace: Any,
             info: dict[str, Any]) -> dict[str, Any]:
    """Replay each policy with the plan's expert slots (one shared pool, as `prophet.wrap` builds it)."""
    from prophet.predict.data import as_router_trace
    from prophet.sim import bounds, replay, schedule
    from prophet.sim.replay import make_predictor

    progress = not args.no_progress
    routes = as_router_trace(trace)
    fit = fit_trace(args, spec, trace, info) if _needs_predictor(args) else None
    sched = schedule(routes, args.batch, args.steps)
    slots = _slots(args, memory)
    common = {"cache_slots": slots, "batch": args.batch, "context": memory.ctx, "sched": sched, "progress": progress,
              "expert_dtype": args.expert_dtype}
    results = []
    for name in _policies(args):
        policy, predictor = _policy_args(name, args)
        if isinstance(predictor, str):
            predictor = make_predictor(predictor, fit, sched)
        r = replay(routes, spec, profile, policy=policy, predictor=predictor, **common)
        results.append({**r.to_dict(), "policy": name})
    limits = bounds(spec, profile, args.batch, trace=routes, cache_slots=slots, context=memory.ctx, sched=sched,
                    progress=progress, expert_dtype=args.expert_dtype)
    if args.compare:
        resident = limits["all_resident"]
        results.append({"policy": "all-resident", "hit_rate": 1.0, "fits": memory.fits_all_resident,
                        "tokens_per_s": resident["tokens_per_s"] if memory.fits_all_resident else None})
    return {"trace": info, "results": results, "bounds": limits}


def _decode_device(args: argparse.Namespace) -> Any:
    """Where to measure decode, or None to simulate."""
    if args.simulate:
        return None
    if args.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if args.device == "cuda":
            raise _UsageError("--device cuda: no CUDA device here; leave --device out to simulate, or use --device cpu")
        return None
    return torch.device("cuda", torch.cuda.current_device())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, then measure or simulate; returns the JSON record (and prints the human-readable report to stderr)."""
    from prophet.sim import get_profile

    spec = resolve_model(args.model)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise _UsageError(f"--batch {args.batch} --steps {args.steps} --warmup {args.warmup}: batch and steps must be "
                          "at least 1, warmup at least 0")
    if args.slots is not None and args.slots < 1:
        raise _UsageError(f"--slots {args.slots}: give at least 1 expert slot")
    device = _decode_device(args)
    if device is None and args.weights == "real":
        raise _UsageError("--weights real runs the checkpoint on a device; add --device cpu, or run where there is a GPU")
    profile, device_bytes, detected = _profile_name(args.gpu)
    hardware = get_profile(profile).to_dict()
    ctx = args.ctx or spec.context_length
    memory = plan(spec, device_bytes or profile, ctx, args.batch, kv_dtype=args.kv_dtype, expert_dtype=args.expert_dtype)
    real_untraced = args.weights == "real" and args.trace is None
    trace, info = (None, None) if real_untraced else load_trace(args.trace, spec, not args.no_progress)
    if detected:
        memory = dataclasses.replace(memory, gpu=detected)
        hardware["detected"] = detected
    print(memory.table(), file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("no_progress", "out")} | {"model": spec.name, "ctx": ctx}
    record: dict[str, Any] = {
        "tool": "prophet-bench", "mode": "simulated" if device is None else "measured", "hardware": hardware,
        "versions": versions(), "git_sha": git_sha(), "config": config, "plan": memory.to_dict(),
    }
    if device is None:
        sim = simulate(args, spec, memory, profile, trace, info)
    else:
        sim = measure(args, spec, memory, profile, trace, info, device)
        record["device"] = _device_name(device)
    _report(sim, file=sys.stderr)
    return record | sim


def _device_name(device: Any) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def _slots(args: argparse.Namespace, memory: Plan) -> int:
    """Expert slots of the whole model: ``--slots`` when given, else the plan's."""
    return min(args.slots, memory.total_experts) if args.slots is not None else memory.expert_slots


def _policy_args(name: str, args: argparse.Namespace) -> tuple[str, str | None]:
    """``(policy, predictor)``: ``--predictor`` serves the prophet policy; the others stay on-demand baselines."""
    from prophet.sim.replay import policy_args

    return policy_args(name, args.predictor if name in ("prophet", "predicted") else None)


def _needs_predictor(args: argparse.Namespace) -> bool:
    """Whether any requested policy learns from a trace (so its training routing must be made)."""
    return any(_policy_args(name, args)[1] is not None for name in _policies(args))


def _policies(args: argparse.Namespace) -> list[str]:
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if args.compare and "lru" not in policies:
        policies.insert(0, "lru")
    return policies


def measure(args: argparse.Namespace, spec: ModelSpec, memory: Plan, profile: str, trace: Any,
            info: dict[str, Any] | None, device: Any) -> dict[str, Any]:
    """Decode on ``device`` for each policy (and the baselines with ``--compare``), beside the simulator's
    estimate of the same run and the bounds. Random weights run the first ``--layers`` layers (default: as many
    as host memory holds) with the plan's share of slots; a checkpoint runs whole with the plan's slots."""
    from prophet import decode as dec
    from prophet.config import PrefetchConfig
    from prophet.load import load
    from prophet.predict.data import as_router_trace
    from prophet.sim import CostModel, bounds, expected_distinct, get_profile, replay, schedule
    from prophet.sim.replay import make_predictor

    progress = not args.no_progress
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU kernels run fp32 fastest
    policies = _policies(args)
    for name in policies:
        policy, predictor = _policy_args(name, args)
        if policy == "belady" or predictor == "oracle":
            raise _UsageError(f"--policy {name}: {policy if policy == 'belady' else 'the oracle'} needs the future, "
                              "which a measured decode does not have; use --simulate for it")
    if args.expert_dtype is not None:
        raise _UsageError(f"--expert-dtype {args.expert_dtype}: measured decode runs the checkpoint's own dtype; "
                          "simulate quantized experts with --simulate (prophet.wrap(expert_dtype=...) runs them)")
    if args.kv_dtype not in ("bf16", "bfloat16"):
        raise _UsageError(f"--kv-dtype {args.kv_dtype}: measured decode keeps the KV cache in the weights' dtype "
                          "(transformers' attention); plan and simulate other KV dtypes with --simulate")
    warmup, steps = args.warmup, args.steps
    positions = PROMPT_TOKENS + warmup + steps
    if positions > memory.ctx:
        raise _UsageError(f"--ctx {memory.ctx} is shorter than the {positions} positions decoded (a {PROMPT_TOKENS}-token "
                          "prompt, --warmup and --steps); raise --ctx or lower --steps")
    if args.weights == "real":
        if args.layers is not None:
            raise _UsageError("--layers applies to --weights random; a checkpoint runs whole")
        spec_run, slots, routes, routing, sched = spec, _slots(args, memory), None, None, None
        fit = None if trace is None else as_router_trace(trace)  # a trace recorded from this model, to learn from
        if info is not None:
            info["predictor_fit"] = "this trace (the model routes itself; the trace only trains the predictor)"
        model = load(args.model, dtype=dtype, device=device, cache_slots=slots)
        why = "checkpoint weights, the model's own routing"
    else:
        layers = args.layers or dec.layers_that_fit(spec, dtype)
        spec_run = dec.truncate(spec, layers)
        moe = spec_run.num_moe_layers
        slots = max(1, round(_slots(args, memory) * moe / spec.num_moe_layers))
        routes = _first_layers(as_router_trace(trace), moe)
        fit = _first_layers(fit_trace(args, spec, trace, info), moe) if _needs_predictor(args) else None
        sched = schedule(routes, args.batch, positions)
        routing = dec.ForcedRouting(routes.experts, sched.rows, device)
        if layers < spec.num_layers:
            why = ("--layers" if args.layers else f"host memory: {spec.num_layers} layers' experts exceed "
                   f"{dec.HOST_FRACTION:.0%} of {dec.host_memory_bytes() / 2**30:.0f} GiB")
            print(f"prophet-bench: running {layers} of {spec.num_layers} layers ({why}), {slots} of "
                  f"{moe * spec.num_experts} expert slots (the plan's {memory.slots_share:.1%})", file=sys.stderr)
        else:
            why = "all layers"
        print("prophet-bench: building the random-weight model", file=sys.stderr)
        model = dec.random_model(spec_run, dtype, device, slots)
    kv = dec.kv_cache_for(model, device, positions, memory.ctx, args.batch, dtype)
    distinct = float(sched.distinct().mean()) if sched else expected_distinct(spec.num_experts, spec.top_k, args.batch)
    cost = CostModel(spec_run, get_profile(profile), torch.bfloat16, memory.ctx)
    budget = PrefetchConfig(**cost.link_budget(distinct, args.batch))  # as the simulator gates its prefetches
    runs = []
    for name in policies:
        policy, predictor_name = _policy_args(name, args)
        if predictor_name is None:
            runs.append(dec.PolicyRun(name, policy))
            continue
        if fit is None:
            print(f"prophet-bench: skipping --policy {name}: its predictor learns from a trace; give --trace, one "
                  "recorded from this model (prophet.trace.record)", file=sys.stderr)
            continue
        predictor = make_predictor(predictor_name, fit, sched)
        factory = predictor.policy_factory() if policy == "predicted" else policy
        runs.append(dec.PolicyRun(name, factory, predictor, budget))
    results = dec.run_policies(model, runs, routing, cache_slots=slots, batch=args.batch, prompt=PROMPT_TOKENS,
                               steps=steps, warmup=warmup, kv=kv, resident=args.compare, progress=progress)
    out: dict[str, Any] = {"trace": info, "results": results,
                           "model_run": {"layers": spec_run.num_layers, "of": spec.num_layers,
                                         "moe_layers": spec_run.num_moe_layers, "slots": slots,
                                         "weights": args.weights, "dtype": str(dtype).removeprefix("torch."),
                                         "why": why, "prompt_tokens": PROMPT_TOKENS, "warmup_steps": warmup}}
    if routes is not None:  # the simulator's estimate of the very same rows, for checking the cost model
        head = schedule(routes, args.batch, PROMPT_TOKENS + warmup)  # the untimed prefix of the same rows
        for r in results:
            if r["policy"] == "all-resident":
                continue
            policy, predictor_name = _policy_args(r["policy"], args)
            whole, prefix = (  # one link budget for both, so the prefix is the start of the same replay
                replay(routes, spec_run, profile, policy=policy, cache_slots=slots, batch=args.batch,
                       context=memory.ctx, sched=s, progress=False, prefetch=budget,
                       predictor=make_predictor(predictor_name, fit, sched) if predictor_name else None)
                for s in (sched, head)
            )
            hits, misses = whole.hits - prefix.hits, whole.misses - prefix.misses  # the timed window only
            seconds = whole.step_s * whole.steps - prefix.step_s * prefix.steps
            r["sim_tokens_per_s"] = args.batch * steps / seconds
            r["sim_hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    out["bounds"] = bounds(spec_run, profile, args.batch, trace=routes, cache_slots=slots if routes else None,
                           context=memory.ctx, sched=sched, progress=progress)
    limit = out["bounds"].get("oracle", out["bounds"]["all_resident"])["tokens_per_s"]
    for r in results:
        if r.get("tokens_per_s") is not None:
            r["of_bound"] = r["tokens_per_s"] / limit  # share of the oracle bound (all-resident without a trace)
    return out


def _report(sim: dict[str, Any], file: Any) -> None:
    t, b = sim["trace"], sim["bounds"]
    if t is not None:
        fitted = f"; predictors fitted on {t['predictor_fit']}" if "predictor_fit" in t else ""
        print(f"trace: {t['name']} ({t['tokens']} tokens), {t['origin']}{fitted}", file=file)
    oracle = b.get("oracle", {}).get("tokens_per_s")
    print(f"bounds tok/s: all-resident {b['all_resident']['tokens_per_s']:.2f} "
          f"(fits: {b['all_resident']['fits']}), all-miss {b['all_miss']['tokens_per_s']:.2f}"
          + (f", oracle {oracle:.2f}" if oracle is not None else ""), file=file)
    if "model_run" in sim:
        m = sim["model_run"]
        print(f"measured on {m['layers']} of {m['of']} layers ({m['why']}), {m['slots']} expert slots; bounds are "
              "the simulator's for those layers", file=file)
    measured = [r for r in sim["results"] if r.get("tokens_per_s") is not None]
    for r in sim["results"]:
        speed = f"{r['tokens_per_s']:.2f} tok/s" if r.get("tokens_per_s") is not None else "does not fit"
        line = f"{r['policy']:>12}: hit {r['hit_rate']:.3f}  {speed}" if "hit_rate" in r else f"{r['policy']:>12}: {speed}"
        if r.get("h2d_gb_per_s") is not None:
            line += f"  h2d {r['h2d_gb_per_s']:.1f} GB/s"
        if r.get("peak_vram_gb") is not None:
            line += f"  peak VRAM {r['peak_vram_gb']:.1f} GB"
        if r.get("of_bound") is not None:
            line += f"  {r['of_bound']:.0%} of the bound"
        if r.get("sim_tokens_per_s") is not None:
            line += f"  (simulated: hit {r['sim_hit_rate']:.3f}, {r['sim_tokens_per_s']:.2f} tok/s)"
        if "held_back" in r and (r["prefetches"] or r["held_back"]):  # measured runs count what the budget held back
            line += (f"  prefetched {r['prefetches']} ({r['prefetch_hits']} used), "
                     f"{r['held_back']} predictions held back by the link budget")
        print(line, file=file)
    lru = next((r for r in measured if r["policy"] == "lru"), None)
    others = [r for r in measured if r["policy"] not in ("lru", "all-resident")]
    if lru and others:
        best = max(others, key=lambda r: r["tokens_per_s"])
        print(f"best: {best['policy']} {best['tokens_per_s']:.2f} tok/s = "
              f"{best['tokens_per_s'] / lru['tokens_per_s']:.2f}x LRU", file=file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prophet-bench`` console script: 0 on success, 2 on bad input (one line on stderr)."""
    try:
        args = parser().parse_args(argv)
        record = run(args)
    except ProphetError as exc:
        print(f"prophet-bench: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, MemoryError) and not any(s in text for s in ("out of memory", "can't allocate memory")):
            raise
        print(f"prophet-bench: error: out of memory ({text.splitlines()[0][:200]}); lower --slots, --ctx, --batch "
              "or --layers", file=sys.stderr)
        return 2
    line = json.dumps(record)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
