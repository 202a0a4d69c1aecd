"""Replay sweeps behind the paper's figures; each writes one JSON file to experiments/results/.

    python experiments/replay/sweeps.py [capacity dedup vram context ...]   (default: all)

capacity  hit rate vs slots per layer per policy, with Belady (shared Mixtral and FLAME traces)
dedup     distinct experts per step vs batch (real traces; uniform routing for other models) and SpecMoE's
          "memory saved by batch dedup" recomputed on the FLAME trace
vram      tokens/s vs VRAM budget per policy with the bounds: Mixtral-8x7B on H100 (shared trace),
          DeepSeek-V2-Lite on RTX 4090 (synthetic trace of its shape from `prophet.trace.synth`)
context   tokens/s vs context length (KV against expert slots), Mixtral-8x7B on H100 80 GB, 32K-512K
quant     expert formats: Mixtral-8x7B on RTX 4090 at 32K context with experts in bf16, fp8, int8, mxfp4,
          int4 and modelled 3/2-bit widths; slots from the plan at each format's bytes per expert, LRU copy-only
          and prophet; target: int4 copy-only >= 3x bf16 copy-only tokens/s (fails otherwise)
prefetch  the link budget: tokens/s vs shared slots at batch 1 and 8 for prediction-aware eviction with no
          prefetch, every prediction copied, and copies within the budget, beside LRU, LFU and Belady
          (Mixtral trace; path matching fitted on sequence 0, replayed on sequence 1: out of sample)

Slots for a VRAM budget or context come from `prophet.plan.plan` (one shared pool). Every policy that learns
(``prophet``) is fitted out of sample: on the first half of a trace's sequences, while every policy replays the
other half (`prophet.sim.samples.split_sample`); each result file says which.

Traces are read from ``$PROPHET_SHARED_TRACES`` (default: ``shared/traces`` beside the checkout;
`prophet.envs.shared_traces_dir`), never copied. Without them the sweeps fall back to the project's own
``traces/tiny-mixtral`` (4 MoE layers, replayed at Mixtral-8x7B's sizes), say so, and skip the FLAME cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prophet.envs import shared_traces_dir
from prophet.errors import PlanError
from prophet.models.registry import get_spec
from prophet.plan import plan
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.sim import bounds, expected_distinct, get_profile, replay, schedule
from prophet.sim.compare import replay_policies
from prophet.sim.replay import policy_args
from prophet.sim.samples import Sample, split_sample
from prophet.trace import load
from prophet.trace.synth import synthetic_trace

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
TRACES = shared_traces_dir()
OWN_TRACE = ROOT / "traces" / "tiny-mixtral"  # the project's own recording, 4 MoE layers x 8 experts, top-2
MIXTRAL_TRACE = "mixtral-8x7b_humaneval_decode"
FLAME_TRACE = "flame-moe-290m_prefill"
POLICIES = ("lru", "lfu", "belady", "prophet")
# The sweeps' prophet rows keep path matching (the policy they were recorded with, so their results files stay
# reproducible); `prophet-bench` and `policy_select.py` now run the policy chosen per miss mode.
PROPHET_PREDICTOR = "pathmatch"
SPECMOE_CLAIMS = {8: 0.24, 32: 0.49, 64: 0.65}  # SpecMoE's "memory saved by batch dedup"; 87.6% at 64 elsewhere


@functools.cache
def shared() -> bool:
    """Whether the shared real traces are here; if not, say so (once)."""
    found = (TRACES / f"{MIXTRAL_TRACE}.npz").exists()
    if not found:
        print(f"shared traces not found at {TRACES} (set PROPHET_SHARED_TRACES): falling back to the project's own "
              f"{OWN_TRACE.relative_to(ROOT)} on Mixtral-8x7B's sizes cut to its 4 layers; FLAME cases skipped")
    return found


def _trace(name: str) -> RouterTrace:
    if name == MIXTRAL_TRACE and not shared():
        return dataclasses.replace(as_router_trace(load(OWN_TRACE)), name="tiny-mixtral")
    return dataclasses.replace(as_router_trace(load(TRACES / f"{name}.npz")), name=name)


def _mixtral(trace: RouterTrace) -> Any:
    """Mixtral-8x7B, cut to the trace's MoE layers when it is the project's own 4-layer trace."""
    spec = get_spec("mixtral-8x7b")
    return spec if trace.num_layers == spec.num_moe_layers else dataclasses.replace(spec, num_layers=trace.num_layers)


def _rows(sample: Sample, spec: Any, gpu: str, names: tuple[str, ...], **kw: Any) -> list[dict[str, Any]]:
    """One row per policy on the held-out part, predictors fitted on the other (`replay_policies`)."""
    sched = kw.pop("sched", None) or schedule(sample.replay, kw.get("batch", 1))
    return replay_policies(sample, spec, get_profile(gpu), names, PROPHET_PREDICTOR, sched, progress=False, **kw)


def _flame_spec() -> Any:
    """FLAME-MoE-290M is not in the registry; its routing shape (8 MoE layers, 64 experts, top-6) on OLMoE's
    sizes serves hit-rate replays, which do not depend on sizes."""
    return dataclasses.replace(get_spec("olmoe"), name="FLAME-MoE-290M (shape)", num_layers=8, top_k=6)


def _write(name: str, record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def _policy(name: str) -> dict[str, Any]:
    """replay() arguments of a policy name (see `prophet.sim.replay.policy_args`)."""
    policy, predictor = policy_args(name, PROPHET_PREDICTOR if name == "prophet" else None)
    return {"policy": policy, "predictor": predictor}


def capacity() -> Path:
    runs = []
    mixtral = _trace(MIXTRAL_TRACE)
    cases = [(mixtral, _mixtral(mixtral), range(2, 9))]
    if shared():
        cases.append((_trace(FLAME_TRACE), _flame_spec(), (6, 8, 12, 16, 24, 32, 48, 64)))
    samples = {}
    for trace, spec, slots in cases:
        sample = split_sample(trace)
        samples[trace.name] = sample.to_dict()
        for c in tqdm(list(slots), desc=f"capacity {trace.name}"):
            for r in _rows(sample, spec, "h100-sxm", ("lru", "lfu", "fifo", "belady", "prophet"), slots_per_layer=c):
                runs.append({"trace": trace.name, "slots_per_layer": c, "num_experts": spec.num_experts,
                             "policy": r["policy"], "hit_rate": r["hit_rate"]})
    return _write("sim_capacity", {"what": "hit rate vs per-layer slots, batch 1, every policy on the held-out "
                                           "sequences", "samples": samples, "runs": runs})


def dedup() -> Path:
    batches = [1, 2, 4, 8, 16, 32, 64]
    curves = []
    for trace_name in (MIXTRAL_TRACE, FLAME_TRACE) if shared() else (MIXTRAL_TRACE,):
        trace = _trace(trace_name)
        k = trace.top_k
        for b in batches:
            sched = schedule(trace, b, steps=max(trace.num_tokens // b, 16))
            d = sched.distinct()  # [S, L]
            saved = 1.0 - d / (b * k)  # per layer-step
            curves.append({"source": f"trace {trace_name}", "num_experts": trace.num_experts, "top_k": k, "batch": b,
                           "distinct": float(d.mean()), "memory_saved": float(saved.mean())})
    for name in ("mixtral-8x7b", "deepseek-v2-lite", "olmoe", "qwen3-30b"):
        spec = get_spec(name)
        for b in batches:
            d = expected_distinct(spec.num_experts, spec.top_k, b)
            curves.append({"source": f"uniform {spec.name}", "num_experts": spec.num_experts, "top_k": spec.top_k,
                           "batch": b, "distinct": d, "memory_saved": 1.0 - d / (b * spec.top_k)})
    flame = {c["batch"]: c["memory_saved"] for c in curves if c["source"] == f"trace {FLAME_TRACE}"}
    if not flame:
        return _write("sim_dedup", {"what": "distinct experts per layer step vs batch", "curves": curves})
    specmoe = {
        "definition": "memory saved = 1 - distinct experts loaded / (batch x top-k), per MoE layer and decode step, "
        "averaged over steps and layers; a batch interleaves B lanes that start at rows i*N/B of the trace",
        "trace": FLAME_TRACE,
        "rows": [{"batch": b, "specmoe_claim": claim, "ours": flame[b]} for b, claim in SPECMOE_CLAIMS.items()],
        "specmoe_other_claim": {"batch": 64, "value": 0.876, "ours": flame[64]},
    }
    _write("sim_specmoe_dedup", specmoe)
    return _write("sim_dedup", {"what": "distinct experts per layer step vs batch", "curves": curves})


def _budget_runs(sample: Sample, spec: Any, gpu: str, budgets: list[float], context: int) -> list[dict]:
    out = []
    for gb in tqdm(budgets, desc=f"vram {spec.name} on {gpu}"):
        try:
            slots = plan(spec, int(gb * 1e9), context).expert_slots
        except PlanError:
            continue
        slots = min(slots, spec.num_moe_layers * spec.num_experts)
        sched = schedule(sample.replay)
        b = bounds(spec, gpu, 1, trace=sample.replay, cache_slots=slots, context=context, sched=sched)
        rows = _rows(sample, spec, gpu, POLICIES, cache_slots=slots, context=context, sched=sched)
        out.append({"vram_gb": gb, "cache_slots": slots, "bounds": b, "results": rows})
    return out


def vram() -> Path:
    mixtral = _trace(MIXTRAL_TRACE)
    sample = split_sample(mixtral)
    points = _budget_runs(sample, _mixtral(mixtral), "h100-sxm", [16, 24, 32, 48, 64, 80], 2048)
    ds = get_spec("deepseek-v2-lite")

    def synth(seed: int) -> RouterTrace:
        return as_router_trace(synthetic_trace(ds.num_moe_layers, ds.num_experts, ds.top_k, num_sequences=4,
                                               tokens_per_sequence=128, seed=0, sample_seed=seed))

    ds_sample = Sample(synth(0), synth(1), "predictors fit on another sample (seed 1) of the same synthetic "
                       "generator, replayed on sample seed 0: out of sample", False)
    deepseek = _budget_runs(ds_sample, ds, "rtx-4090", [8, 10, 12, 16, 20, 24], 2048)
    return _write("sim_vram", {
        "what": "tokens/s vs VRAM budget, batch 1, context 2048, one shared slot pool sized by prophet.plan",
        "panels": [
            {"model": "Mixtral-8x7B", "gpu": "h100-sxm", "trace": mixtral.name, "sample": sample.to_dict(),
             "points": points},
            {"model": "DeepSeek-V2-Lite", "gpu": "rtx-4090", "trace": "synthetic (prophet.trace.synth, 4 x 128 tokens)",
             "sample": ds_sample.to_dict(), "points": deepseek},
        ],
    })


def context() -> Path:
    trace = _trace(MIXTRAL_TRACE)
    spec = _mixtral(trace)
    sched = schedule(trace)
    points = []
    for ctx in tqdm([32 << 10, 64 << 10, 128 << 10, 256 << 10, 384 << 10, 512 << 10], desc="context"):
        try:
            slots = min(plan(spec, "h100-sxm", ctx).expert_slots, spec.num_moe_layers * spec.num_experts)
        except PlanError as err:
            points.append({"context": ctx, "cache_slots": 0, "error": str(err)})
            continue
        b = bounds(spec, "h100-sxm", 1, trace=trace, cache_slots=slots, context=ctx, sched=sched)
        results = [
            {**replay(trace, spec, "h100-sxm", cache_slots=slots, context=ctx, sched=sched, progress=False,
                      **_policy(p)).to_dict(), "policy": p}
            for p in ("lru", "belady")
        ]
        points.append({"context": ctx, "cache_slots": slots, "kv_gb": spec.kv_bytes(ctx) / 1e9,
                       "slots_gb": slots * spec.expert_bytes() / 1e9, "bounds": b,
                       "results": results})
    return _write("sim_context", {"what": "Mixtral-8x7B on H100 80 GB: context vs tokens/s, batch 1", "points": points,
                                  "gpu": get_profile("h100-sxm").to_dict()})


def prefetch() -> Path:
    from prophet.config import PrefetchConfig
    from prophet.predict.pathmatch import PathMatchPredictor

    trace = _trace(MIXTRAL_TRACE)
    spec = _mixtral(trace)
    train, test = trace.sequences([0]), trace.sequences([1])
    variants = {  # name -> prefetch config of prediction-aware eviction (None: the cost model's link budget)
        "prophet, no prefetch": PrefetchConfig(enabled=False),
        "prophet, every prediction copied": PrefetchConfig(),
        "prophet, link budget": None,
    }
    runs = []
    for batch in (1, 8):
        sched = schedule(test, batch, steps=max(test.num_tokens // batch, 32))
        for slots in tqdm([96, 128, 172, 208, 232], desc=f"prefetch batch {batch}"):
            common = dict(cache_slots=slots, batch=batch, sched=sched, progress=False)
            point = {"batch": batch, "cache_slots": slots, "results": []}
            for pol in ("lru", "lfu", "belady"):
                point["results"].append({**replay(test, spec, "h100-sxm", policy=pol, **common).to_dict(), "policy": pol})
            for name, config in variants.items():
                pred = PathMatchPredictor(spec.num_moe_layers, spec.num_experts, spec.top_k).fit([train])
                r = replay(test, spec, "h100-sxm", policy=pred.policy_factory(),
                           predictor=pred, prefetch=config, **common)
                point["results"].append({**r.to_dict(), "policy": name})
            runs.append(point)
    return _write("sim_prefetch_budget", {
        "what": "tokens/s vs shared slots: prefetch within the link budget against none and against every "
                "prediction, Mixtral-8x7B on h100-sxm, context 2048",
        "trace": f"{trace.name}: path matching fitted on sequence 0, replayed on sequence 1 (out of sample)",
        "points": runs,
    })


QUANT_TARGET = 3.0  # issue 18: int4 experts >= 3x the bf16 copy-only speed, Mixtral on rtx-4090 at 32K


def quant() -> Path:
    from prophet.formats import expert_nbytes, weight_format

    trace, gpu, ctx = _trace(MIXTRAL_TRACE), "rtx-4090", 32 << 10
    spec, sample = _mixtral(trace), split_sample(trace)
    sched = schedule(sample.replay)
    total = spec.num_moe_layers * spec.num_experts
    points = []
    for name in tqdm(["bf16", "fp8", "int8", "mxfp4", "int4", "int3", "int2"], desc="quant"):
        fmt = None if name == "bf16" else name
        memory = plan(spec, gpu, ctx, expert_dtype=fmt)
        slots = min(memory.expert_slots, total)
        b = bounds(spec, gpu, 1, trace=sample.replay, cache_slots=slots, context=ctx, sched=sched, expert_dtype=fmt)
        results = _rows(sample, spec, gpu, ("lru", "prophet"), cache_slots=slots, context=ctx, sched=sched,
                        expert_dtype=fmt)
        one = expert_nbytes(spec.expert_format, weight_format(name))
        points.append({"expert_dtype": name, "expert_mib": one / 2**20, "bits_per_param": 8 * one / spec.expert_params,
                       "cache_slots": slots, "slots_gib": slots * one / 2**30, "bounds": b, "results": results})
    base = points[0]["results"][0]["tokens_per_s"]
    for p in points:
        p["lru_speedup_vs_bf16"] = p["results"][0]["tokens_per_s"] / base
    int4 = next(p for p in points if p["expert_dtype"] == "int4")["lru_speedup_vs_bf16"]
    path = _write("sim_quant", {
        "what": f"Mixtral-8x7B on {gpu} at {ctx} tokens, batch 1: expert formats (bytes per expert incl. scales) "
                "vs plan slots and tokens/s; copy-only = on-demand LRU",
        "trace": trace.name, "sample": sample.to_dict(), "target": {"int4_lru_vs_bf16_lru": QUANT_TARGET, "measured": int4,
                                            "met": int4 >= QUANT_TARGET},
        "gpu": get_profile(gpu).to_dict(), "points": points,
    })
    if int4 < QUANT_TARGET:
        raise SystemExit(f"quant: int4 copy-only is {int4:.2f}x bf16, below the {QUANT_TARGET}x target")
    return path


SWEEPS = {"capacity": capacity, "dedup": dedup, "vram": vram, "context": context, "prefetch": prefetch,
          "quant": quant}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="*", help=f"any of {', '.join(SWEEPS)} (default: all)")
    args = p.parse_args(argv)
    for name in args.sweeps or SWEEPS:
        start = time.perf_counter()
        SWEEPS[name]()
        print(f"{name}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
