"""``prophet-bench``: plan the GPU memory for a model and context, then measure (or simulate) decode speed.

Without a GPU (and, for now, with one: real decode is not implemented yet) it prints the memory plan, replays a
router trace through `prophet.sim` with the plan's expert slots, and prints tokens/s for each policy beside the
bounds. The default trace is a synthetic one for the model's shape (`prophet.trace.synth`), so the command runs
on a fresh machine. The last stdout line is one JSON record; bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from prophet.errors import ProphetError, TraceError, UnsupportedModelError
from prophet.models.registry import get_spec, list_specs
from prophet.models.spec import ModelSpec
from prophet.plan import DEFAULT_GPU, Plan, detect_gpu, plan
from prophet.provenance import git_sha, versions

SYNTH_SEQUENCES, SYNTH_TOKENS = 4, 128  # 512 synthetic tokens: ~1 s to generate, lanes cycle through them
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
    p.add_argument("--weights", choices=("real", "random"), default="random", help="GPU decode only: checkpoint or random weights")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16 or fp8")
    p.add_argument("--trace", default=None, help="router trace to replay (default: synthetic, for the model's shape)")
    p.add_argument("--policy", default="lru,prophet", help="comma list: lru, lfu, fifo, belady, prophet")
    p.add_argument("--predictor", default=None, help="prefetch predictor (default for prophet: cooccurrence)")
    p.add_argument("--steps", type=int, default=512, help="decode steps to replay")
    p.add_argument("--compare", action="store_true", help="add the baselines: on-demand LRU and all experts resident")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def resolve_model(name: str) -> ModelSpec:
    """A registry spec by alias, or the one whose shape matches a local checkpoint's ``config.json``."""
    path = Path(name)
    if not path.is_dir():
        return get_spec(name)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"--model {name}: the folder has no config.json; give a checkpoint dir or a registry alias")
    cfg = json.loads(config_file.read_text())
    for spec in list_specs():
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


def load_trace(path: str | None, spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """The trace to replay and a description naming it and its origin; refuses one of another shape."""
    if path is None:
        from prophet.trace.synth import synthetic_trace

        trace = synthetic_trace(spec.num_moe_layers, spec.num_experts, spec.top_k,
                                num_sequences=SYNTH_SEQUENCES, tokens_per_sequence=SYNTH_TOKENS)
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


def simulate(args: argparse.Namespace, spec: ModelSpec, memory: Plan, profile: str, trace: Any,
             info: dict[str, Any]) -> dict[str, Any]:
    """Replay each policy with the plan's expert slots (one shared pool, as `prophet.wrap` builds it)."""
    from prophet.predict.data import as_router_trace
    from prophet.sim import bounds, replay, schedule
    from prophet.sim.replay import make_predictor, policy_args

    progress = not args.no_progress
    routes = as_router_trace(trace)
    sched = schedule(routes, args.batch, args.steps)
    common = {"cache_slots": memory.expert_slots, "batch": args.batch, "context": memory.ctx,
              "sched": sched, "progress": progress}
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if args.compare and "lru" not in policies:
        policies.insert(0, "lru")
    results = []
    for name in policies:
        policy, predictor = policy_args(name, args.predictor)
        if isinstance(predictor, str):
            predictor = make_predictor(predictor, routes, sched)
        r = replay(routes, spec, profile, policy=policy, predictor=predictor, **common)
        results.append({**r.to_dict(), "policy": name})
    limits = bounds(spec, profile, args.batch, trace=routes, cache_slots=memory.expert_slots,
                    context=memory.ctx, sched=sched, progress=progress)
    if args.compare:
        resident = limits["all_resident"]
        results.append({"policy": "all-resident", "hit_rate": 1.0, "fits": memory.fits_all_resident,
                        "tokens_per_s": resident["tokens_per_s"] if memory.fits_all_resident else None})
    return {"trace": info, "results": results, "bounds": limits}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, then simulate; returns the JSON record (and prints the human-readable report to stderr)."""
    from prophet.sim import get_profile

    spec = resolve_model(args.model)
    if args.batch < 1 or args.steps < 1:
        raise _UsageError(f"--batch {args.batch} --steps {args.steps}: both must be at least 1")
    profile, device_bytes, detected = _profile_name(args.gpu)
    hardware = get_profile(profile).to_dict()
    ctx = args.ctx or spec.context_length
    memory = plan(spec, device_bytes or profile, ctx, args.batch, kv_dtype=args.kv_dtype)
    trace, info = load_trace(args.trace, spec)  # all input checked before any output: an error is one line
    if detected:
        memory = dataclasses.replace(memory, gpu=detected)
        hardware["detected"] = detected
        print("prophet-bench: real decode on the GPU is not implemented yet; simulating with the "
              f"{profile} profile instead", file=sys.stderr)
    print(memory.table(), file=sys.stderr)
    sim = simulate(args, spec, memory, profile, trace, info)
    _report(sim, file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k != "no_progress"} | {"model": spec.name, "ctx": ctx}
    return {
        "tool": "prophet-bench", "mode": "simulated", "hardware": hardware, "versions": versions(),
        "git_sha": git_sha(), "config": config,
        "plan": memory.to_dict(),
        **sim,
    }


def _report(sim: dict[str, Any], file: Any) -> None:
    t, b = sim["trace"], sim["bounds"]
    print(f"trace: {t['name']} ({t['tokens']} tokens), {t['origin']}", file=file)
    oracle = b.get("oracle", {}).get("tokens_per_s")
    print(f"bounds tok/s: all-resident {b['all_resident']['tokens_per_s']:.2f} "
          f"(fits: {b['all_resident']['fits']}), all-miss {b['all_miss']['tokens_per_s']:.2f}"
          + (f", oracle {oracle:.2f}" if oracle is not None else ""), file=file)
    measured = [r for r in sim["results"] if r.get("tokens_per_s") is not None]
    for r in sim["results"]:
        speed = f"{r['tokens_per_s']:.2f} tok/s" if r.get("tokens_per_s") is not None else "does not fit"
        print(f"{r['policy']:>12}: hit {r['hit_rate']:.3f}  {speed}", file=file)
    lru = next((r for r in measured if r["policy"] == "lru"), None)
    others = [r for r in measured if r["policy"] not in ("lru", "all-resident")]
    if lru and others:
        best = max(others, key=lambda r: r["tokens_per_s"])
        print(f"best: {best['policy']} {best['tokens_per_s']:.2f} tok/s = "
              f"{best['tokens_per_s'] / lru['tokens_per_s']:.2f}x LRU", file=file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prophet-bench`` console script: 0 on success, 2 on bad input (one line on stderr)."""
    try:
        record = run(parser().parse_args(argv))
    except ProphetError as exc:
        print(f"prophet-bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
