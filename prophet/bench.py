"""What ``prophet-bench run`` does: plan the GPU memory for a model and context, then measure or simulate decode.

Both modes print the memory plan first. On a GPU it measures decode (`prophet.decode`): a checkpoint's own
weights and routing (``weights="real"``), or random weights of the model's real shape with routing forced from
a trace (``weights="random"``), with the plan's share of expert slots; it reports tokens/s, hit rate,
host->device GB/s and peak VRAM per policy, the simulator's estimate for the same run, and the bounds. Without
a GPU (or with ``simulate``) it replays the trace through `prophet.sim` instead. ``device="cpu"`` measures on
the CPU (for small models and for checking the harness). The default trace is a synthetic one for the model's
shape (`prophet.trace.synth`), so the command runs on a fresh machine.

Predictors learn out of sample (`prophet.sim.samples`): from ``fit`` when given, else from the first half of
the trace's sequences while the rest is replayed; in sample only with ``in_sample``, and labelled. No trace
row is played twice unless ``repeat``. The command line is `prophet.cli.run`; this module takes typed options.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from prophet.errors import ConfigError, TraceError, UnsupportedModelError
from prophet.hybrid import allowed
from prophet.models.registry import get_spec, list_specs
from prophet.models.spec import ModelSpec
from prophet.plan import DEFAULT_GPU, Plan, detect_gpu, dtype_name, plan
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.provenance import git_sha, versions
from prophet.sim.compare import assign, best_line, check_policies, learns, replay_policies
from prophet.sim.samples import Sample, replay_steps, split_sample

SYNTH_SEQUENCES, SYNTH_TOKENS = 4, 128  # 512 synthetic tokens: ~1 s to generate
PROMPT_TOKENS = 16  # prefill length of a measured decode; its routing is the trace rows before the decode's
REAL_STEPS = 128  # timed steps of a checkpoint's own routing when --steps is not given (no trace bounds them)
TINY_SUFFIX = "-tiny"  # --model mixtral-tiny: the registry model's toy-sized twin (ModelSpec.tiny)


@dataclass(frozen=True)
class BenchOptions:
    """One ``prophet-bench run``; validated at construction, so bad input fails before any plan or trace."""

    model: str = "mixtral"
    ctx: int | None = None  # tokens per sequence (default: the model's trained context)
    batch: int = 1
    gpu: str | None = None  # hardware profile (default: the detected GPU, else DEFAULT_GPU)
    weights: str = "random"  # "random" (forced routing) or "real" (a checkpoint's own)
    device: str = "auto"  # "auto", "cuda" or "cpu"
    simulate: bool = False
    layers: int | None = None  # random weights: the first N layers only
    slots: int | None = None  # expert slots of the whole model instead of the plan's
    kv_dtype: str = "bf16"
    expert_dtype: str | None = None  # simulate experts stored quantized (int4, fp8, 2.6bit, ...; default: bf16)
    trace: str | None = None  # routing to replay or force (default: synthetic)
    fit: str | None = None  # routing predictors learn from (default: split the trace)
    in_sample: bool = False
    repeat: bool = False
    policies: tuple[str, ...] = ("lru", "prophet")
    predictor: str | None = None  # the prophet policy's predictor (default: `prophet.sim.replay.PROPHET_PREDICTOR` of the miss mode)
    steps: int | None = None  # default: every replayed token once
    warmup: int = 16
    compare: bool = False
    progress: bool = True
    on_miss: str = "copy"  # "auto" or "host": each policy's hybrid row beside its copy-only one
    warm: str | None = None  # warm start from the fitted routing's frequencies: "decode" or "prefill" (`prophet.warm`)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.warmup < 0 or (self.steps is not None and self.steps < 1):
            raise ConfigError(f"--batch {self.batch} --steps {self.steps} --warmup {self.warmup}: batch and steps must "
                              "be at least 1, warmup at least 0")
        for flag, value in (("--slots", self.slots), ("--layers", self.layers)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: give at least 1")
        if self.weights not in ("random", "real") or self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--weights {self.weights} --device {self.device}: weights random or real; device auto, "
                              "cuda or cpu")
        if self.fit is not None and self.in_sample:
            raise ConfigError("--fit and --in-sample contradict each other: give one")
        check_policies(self.all_policies, self.predictor)
        allowed(self.on_miss)
        if self.warm not in (None, "decode", "prefill"):
            raise ConfigError(f"--warm {self.warm}: use decode (the warm copies on decode's clock) or prefill "
                              "(landed during the prompt's prefill)")

    @property
    def all_policies(self) -> list[str]:
        """The requested policies, with LRU first when the baselines are compared."""
        names = list(self.policies)
        return ["lru", *names] if self.compare and "lru" not in names else names


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
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"--model {name}: config.json is unreadable ({exc}); fix it or give an alias") from None
    for spec in [*list_specs(), *(s.tiny() for s in list_specs())]:
        ref = spec.hf_config().to_dict()
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        if all(cfg.get(k) == ref.get(k) for k in keys if k in ref):
            return spec
    raise UnsupportedModelError(
        f"--model {name}: no registry model has this config's shape (model_type={cfg.get('model_type')!r}, "
        f"hidden_size={cfg.get('hidden_size')}); pass a registry alias with the same shape"
    )


def profile_name(gpu: str | None) -> tuple[str, int | None, str | None]:
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


def read_trace(path: str, spec: ModelSpec, flag: str = "--trace") -> RouterTrace:
    """A trace file as a `RouterTrace`; refuses a missing file or one of another model's shape."""
    from prophet.trace import load

    if not Path(path).exists():
        raise TraceError(f"{flag} {path}: no such file; give a trace path or leave {flag} out")
    trace = load(path)
    shape = (trace.model.num_layers, trace.model.num_experts)
    if shape != (spec.num_moe_layers, spec.num_experts):
        raise TraceError(
            f"{flag} {trace_name(path)} has {shape[0]} MoE layers x {shape[1]} experts but {spec.name} has "
            f"{spec.num_moe_layers} x {spec.num_experts}; replay a trace of {spec.name} or pick the matching --model"
        )
    return dataclasses.replace(as_router_trace(trace), name=trace_name(path))


def trace_name(path: str) -> str:
    """A trace's short name for summaries: its file or folder name without the suffix."""
    return Path(path).resolve().stem


def _synthetic(spec: ModelSpec, sample_seed: int, progress: bool) -> RouterTrace:
    from prophet.trace.synth import synthetic_trace

    trace = synthetic_trace(spec.num_moe_layers, spec.num_experts, spec.top_k, num_sequences=SYNTH_SEQUENCES,
                            tokens_per_sequence=SYNTH_TOKENS, sample_seed=sample_seed, progress=progress)
    return dataclasses.replace(as_router_trace(trace), name=f"synthetic {spec.name} (sample seed {sample_seed})")


def choose_sample(opts: BenchOptions, spec: ModelSpec) -> tuple[Sample, dict[str, Any]]:
    """The routing to replay and to fit on, and a description of both for the record."""
    needs_fit = learns(opts.all_policies, opts.predictor)
    if opts.trace is None:
        if opts.in_sample or opts.fit is not None:
            raise ConfigError("--fit and --in-sample apply to --trace; the synthetic default fits on other tokens "
                              "of the same generator (out of sample)")
        trace = _synthetic(spec, 0, opts.progress)
        origin = (f"synthetic (prophet.trace.synth for {spec.num_moe_layers} layers x {spec.num_experts} experts, "
                  f"top-{spec.top_k}, seed 0)")
        if needs_fit:
            fit = _synthetic(spec, 1, opts.progress)
            sample = Sample(trace, fit, "predictors fit on other tokens from the same synthetic generator (sample "
                            "seed 1), replayed on sample seed 0: out of sample", False)
        else:
            sample = split_sample(trace, learns=False)
    elif opts.weights == "real":
        trace = read_trace(opts.trace, spec)
        origin = f"file {opts.trace} (recorded from this model)"
        sample = Sample(trace, trace, "the checkpoint routes itself on random prompts; the whole trace trains the "
                        "predictor: out of sample", False)
    else:
        trace = read_trace(opts.trace, spec)
        origin = f"file {opts.trace}"
        fit = None if opts.fit is None else read_trace(opts.fit, spec, "--fit")
        sample = split_sample(trace, fit=fit, in_sample=opts.in_sample, learns=needs_fit)
    info = {"name": trace.name, "origin": origin, "tokens": trace.num_tokens, "sequences": trace.num_sequences,
            "layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k, "sample": sample.to_dict()}
    return sample, info


def decode_device(opts: BenchOptions) -> torch.device | None:
    """Where to measure decode, or None to simulate."""
    if opts.simulate:
        return None
    if opts.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if opts.device == "cuda":
            raise ConfigError("--device cuda: no CUDA device here; leave --device out to simulate, or use --device cpu")
        return None
    return torch.device("cuda", torch.cuda.current_device())


def _check_measured(opts: BenchOptions) -> None:
    """What a measured decode refuses, said before the plan prints."""
    for name in opts.all_policies:
        policy, predictor = assign(name, opts.predictor, everywhere=False)
        if policy == "belady" or predictor == "oracle":
            raise ConfigError(f"--policy {name}: {policy if policy == 'belady' else 'the oracle'} needs the future, "
                              "which a measured decode does not have; use --simulate for it")
    if opts.expert_dtype is not None:
        raise ConfigError(f"--expert-dtype {opts.expert_dtype}: measured decode runs the checkpoint's own dtype; "
                          "simulate quantized experts with --simulate (prophet.wrap(expert_dtype=...) runs them)")
    if opts.kv_dtype not in ("bf16", "bfloat16"):
        raise ConfigError(f"--kv-dtype {opts.kv_dtype}: measured decode keeps the KV cache in the weights' dtype "
                          "(transformers' attention); plan and simulate other KV dtypes with --simulate")
    if opts.weights == "real" and opts.layers is not None:
        raise ConfigError("--layers applies to --weights random; a checkpoint runs whole")


def run(opts: BenchOptions, report: TextIO | None = None) -> dict[str, Any]:
    """Plan, then measure or simulate; returns the JSON record and prints the human summary to ``report``
    (default: stderr)."""
    from prophet.sim import get_profile

    report = report or sys.stderr
    spec = resolve_model(opts.model)
    device = decode_device(opts)
    if device is None and opts.weights == "real":
        raise ConfigError("--weights real runs the checkpoint on a device; add --device cpu, or run where there is a GPU")
    if device is not None:
        _check_measured(opts)
    dtype = run_dtype(device)
    profile, device_bytes, detected = profile_name(opts.gpu)
    hardware = get_profile(profile).to_dict()
    ctx = opts.ctx or spec.context_length
    memory = plan(spec, device_bytes or profile, ctx, opts.batch, weight_dtype=dtype, kv_dtype=opts.kv_dtype,
                  expert_dtype=opts.expert_dtype)
    if detected:
        memory = dataclasses.replace(memory, gpu=detected)
        hardware["detected"] = detected
    if device is not None:
        lead = PROMPT_TOKENS + opts.warmup
        if opts.steps is not None and lead + opts.steps > memory.ctx:
            raise ConfigError(f"--ctx {memory.ctx} is shorter than the {lead + opts.steps} positions decoded (a "
                              f"{PROMPT_TOKENS}-token prompt, --warmup and --steps); raise --ctx or lower --steps")
    layers = random_layers(opts, spec, memory, device) if device is not None and opts.weights == "random" else None
    real_untraced = opts.weights == "real" and opts.trace is None
    sample, info = (None, None) if real_untraced else choose_sample(opts, spec)
    steps = decode_steps(opts, device, memory, sample, info)
    print(memory.table(), file=report)
    config = dataclasses.asdict(opts) | {"model": spec.name, "ctx": ctx}
    record: dict[str, Any] = {
        "tool": "prophet-bench", "mode": "simulated" if device is None else "measured", "hardware": hardware,
        "bounds_profile": profile, "weights_dtype": dtype_name(dtype), "versions": versions(), "git_sha": git_sha(),
        "config": config, "plan": memory.to_dict(),
    }
    if device is None:
        out = simulate(opts, spec, memory, profile, sample, info, steps)
    else:
        out = measure(opts, spec, memory, profile, sample, info, device, steps, layers)
        record["device"] = device_name(device)
    record |= out
    summary(record, report)
    return record


def decode_steps(opts: BenchOptions, device: torch.device | None, memory: Plan, sample: Sample | None,
                 info: dict[str, Any] | None) -> int:
    """Timed (or replayed) steps: ``steps`` when given, else every replayed token once after a measured decode's
    prompt and warm-up; refuses more than the routing holds without ``repeat``, and what the context cannot hold."""
    lead = 0 if device is None else PROMPT_TOKENS + opts.warmup
    if sample is None or opts.weights == "real":
        return opts.steps or min(REAL_STEPS, max(memory.ctx - lead, 1))
    steps, info["steps"] = replay_steps(sample.replay.num_tokens, opts.batch, opts.steps, opts.repeat, lead)
    if device is not None and lead + steps > memory.ctx:
        raise ConfigError(f"--ctx {memory.ctx} is shorter than the {lead + steps} positions decoded; raise --ctx "
                          "or give a smaller --steps")
    return steps


def run_dtype(device: torch.device | None) -> torch.dtype:
    """Weights of a measured decode: bf16 on a GPU, fp32 on the CPU (its kernels run fp32 fastest); the
    simulator models bf16."""
    return torch.float32 if device is not None and device.type == "cpu" else torch.bfloat16


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def _slots(opts: BenchOptions, memory: Plan) -> int:
    """Expert slots of the whole model: ``--slots`` when given, else the plan's."""
    return min(opts.slots, memory.total_experts) if opts.slots is not None else memory.expert_slots


def simulate(opts: BenchOptions, spec: ModelSpec, memory: Plan, profile: str, sample: Sample,
             info: dict[str, Any], steps: int) -> dict[str, Any]:
    """Replay each policy with the plan's expert slots (one shared pool, as `prophet.wrap` builds it)."""
    from prophet.sim import bounds, schedule

    sched = schedule(sample.replay, opts.batch, steps)
    slots = _slots(opts, memory)
    common = {"cache_slots": slots, "batch": opts.batch, "context": memory.ctx, "expert_dtype": opts.expert_dtype}
    results = replay_policies(sample, spec, profile, opts.all_policies, opts.predictor, sched,
                              progress=opts.progress, on_miss=_modes(opts), warm=opts.warm, **common)
    limits = bounds(spec, profile, trace=sample.replay, sched=sched, progress=opts.progress, **common)
    if opts.compare:
        resident = limits["all_resident"]
        results.append({"policy": "all-resident", "hit_rate": 1.0, "fits": memory.fits_all_resident,
                        "tokens_per_s": resident["tokens_per_s"] if memory.fits_all_resident else None})
    return {"trace": info, "results": results, "bounds": limits}


def _first_layers(trace: RouterTrace, layers: int) -> RouterTrace:
    """A `RouterTrace` of the first ``layers`` MoE layers (what a model cut to its first layers runs)."""
    return dataclasses.replace(trace, experts=trace.experts[:, :layers], weights=trace.weights[:, :layers],
                               exact=trace.exact[:, :layers], hidden=None)


def _slots_for(opts: BenchOptions, spec: ModelSpec, memory: Plan) -> Callable[[ModelSpec], int]:
    """Expert slots of a model cut to its first layers: the plan's (or ``--slots``') share of its MoE layers."""
    share = _slots(opts, memory) / spec.num_moe_layers

    def slots_for(part: ModelSpec) -> int:
        return max(1, round(share * part.num_moe_layers))

    return slots_for


def random_layers(opts: BenchOptions, spec: ModelSpec, memory: Plan, device: torch.device) -> int:
    """Layers of the random-weight model that host memory holds (`prophet.decode.layers_that_fit`), checked
    before any trace is read or model built; refuses what does not fit, with the numbers."""
    from prophet import decode as dec

    return dec.layers_that_fit(spec, run_dtype(device), device, _slots_for(opts, spec, memory), resident=opts.compare,
                               layers=opts.layers)


def measure(opts: BenchOptions, spec: ModelSpec, memory: Plan, profile: str, sample: Sample | None,
            info: dict[str, Any] | None, device: torch.device, steps: int, layers: int | None) -> dict[str, Any]:
    """Decode on ``device`` for each policy (and the baselines with ``compare``), beside the simulator's
    estimate of the same run and the bounds. Random weights run the first ``layers`` layers (default: as many
    as host memory holds) with the plan's share of slots; a checkpoint runs whole with the plan's slots."""
    from prophet import decode as dec
    from prophet.config import PrefetchConfig
    from prophet.load import load
    from prophet.sim import CostModel, bounds, expected_distinct, get_profile, replay, schedule
    from prophet.sim.replay import make_predictor, prophet_prefetch
    from prophet.warm import fitted_order

    dtype = run_dtype(device)
    warmup, lead = opts.warmup, PROMPT_TOKENS + opts.warmup
    if opts.weights == "real":
        spec_run, slots, routes, routing, sched = spec, _slots(opts, memory), None, None, None
        fit = None if sample is None else sample.fit  # a trace recorded from this model, to learn from
        if info is not None:
            info["predictor_fit"] = "this trace (the model routes itself; the trace only trains the predictor)"
        model = load(opts.model, dtype=dtype, device=device, cache_slots=slots)
        why = "checkpoint weights, the model's own routing"
    else:
        assert sample is not None and layers is not None
        slots_for = _slots_for(opts, spec, memory)
        spec_run = dec.truncate(spec, layers)
        moe = spec_run.num_moe_layers
        slots = slots_for(spec_run)
        routes = _first_layers(sample.replay, moe)
        fit = None if sample.fit is None else _first_layers(sample.fit, moe)
        sched = schedule(routes, opts.batch, 1 + warmup + steps, prompt=PROMPT_TOKENS)  # the prompt is one step
        routing = dec.ForcedRouting(routes.experts, sched.rows, device)
        if layers < spec.num_layers:
            why = ("--layers" if opts.layers else f"host memory: all {spec.num_layers} layers need "
                   f"{dec.host_bytes(spec, dtype, device, slots_for(spec), opts.compare) / 2**30:.1f} GiB, "
                   f"{dec.available_host_bytes() / 2**30:.1f} GiB available")
            print(f"prophet-bench: running {layers} of {spec.num_layers} layers ({why}), {slots} of "
                  f"{moe * spec.num_experts} expert slots (the plan's {memory.slots_share:.1%})", file=sys.stderr)
        else:
            why = "all layers"
        print("prophet-bench: building the random-weight model", file=sys.stderr)
        model = dec.random_model(spec_run, dtype, device, slots)
    kv = dec.kv_cache_for(model, device, lead + steps, memory.ctx, opts.batch, dtype)
    distinct = float(sched.distinct().mean()) if sched else expected_distinct(spec.num_experts, spec.top_k, opts.batch)
    cost = CostModel(spec_run, get_profile(profile), torch.bfloat16, memory.ctx)
    budget = PrefetchConfig(**cost.link_budget(distinct, opts.batch))  # as the simulator gates its prefetches
    warm = fitted_order([fit]) if opts.warm and fit is not None else None  # the runtime's copies are real: no
    runs = []  # "prefill" accounting here, they overlap the prompt's forward (`Step.begin_sequence`)
    for mode in _modes(opts):
        for name in opts.all_policies:
            policy, predictor_name = assign(name, opts.predictor, everywhere=False, on_miss=mode)
            if predictor_name is None:
                runs.append(dec.PolicyRun(_label(name, mode), policy, on_miss=mode, warm=warm))
                continue
            if fit is None:
                print(f"prophet-bench: skipping --policy {name} ({mode}): its predictor learns from a trace; give "
                      "--trace, one recorded from this model (prophet.trace.record)", file=sys.stderr)
                continue
            predictor = make_predictor(predictor_name, fit, sched)
            factory = predictor.policy_factory() if policy == "predicted" else policy
            prefetch = (prophet_prefetch(predictor_name, mode) if name == "prophet" else None) or budget
            runs.append(dec.PolicyRun(_label(name, mode), factory, predictor, prefetch, on_miss=mode, warm=warm))
    results = dec.run_policies(model, runs, routing, cache_slots=slots, batch=opts.batch, prompt=PROMPT_TOKENS,
                               steps=steps, warmup=warmup, kv=kv, resident=opts.compare, progress=opts.progress)
    out: dict[str, Any] = {"trace": info, "results": results,
                           "model_run": {"layers": spec_run.num_layers, "of": spec.num_layers,
                                         "moe_layers": spec_run.num_moe_layers, "slots": slots,
                                         "weights": opts.weights, "dtype": str(dtype).removeprefix("torch."),
                                         "why": why, "prompt_tokens": PROMPT_TOKENS, "warmup_steps": warmup}}
    if routes is not None:  # the simulator's estimate of the very same rows, for checking the cost model
        head = schedule(routes, opts.batch, 1 + warmup, prompt=PROMPT_TOKENS)  # the untimed prefix of the same rows
        for r in results:
            if r["policy"] == "all-resident":
                continue
            mode = r.get("on_miss", "copy")
            name = r["policy"].removesuffix(_label("", mode))
            policy, predictor_name = assign(name, opts.predictor, everywhere=False, on_miss=mode)
            prefetch = (prophet_prefetch(predictor_name, mode) if name == "prophet" else None) or budget
            whole, prefix = (  # one link budget for both, so the prefix is the start of the same replay
                replay(routes, spec_run, profile, policy=policy, cache_slots=slots, batch=opts.batch, on_miss=mode,
                       context=memory.ctx, sched=s, progress=False, prefetch=prefetch, sequences=False, warm=warm,
                       predictor=make_predictor(predictor_name, fit, sched) if predictor_name else None)
                for s in (sched, head)
            )
            hits, misses = whole.hits - prefix.hits, whole.misses - prefix.misses  # the timed window only
            seconds = whole.step_s * whole.steps - prefix.step_s * prefix.steps
            r["sim_tokens_per_s"] = opts.batch * steps / seconds
            r["sim_hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    out["bounds"] = bounds(spec_run, profile, opts.batch, trace=routes, cache_slots=slots if routes else None,
                           context=memory.ctx, sched=sched, progress=opts.progress)
    if device.type == "cuda":  # a share of the bound only means something on the GPU the profile models
        limit = out["bounds"].get("oracle", out["bounds"]["all_resident"])["tokens_per_s"]
        for r in results:
            if r.get("tokens_per_s") is not None:
                r["of_bound"] = r["tokens_per_s"] / limit  # share of the oracle bound (all-resident without a trace)
    return out


def _modes(opts: BenchOptions) -> tuple[str, ...]:
    """The ``on_miss`` modes to run: copy-only, and the requested hybrid one beside it."""
    return ("copy",) if opts.on_miss == "copy" else ("copy", opts.on_miss)


def _label(name: str, mode: str) -> str:
    """A result row's name: the policy, with the ``on_miss`` mode after it unless it is copy."""
    return name if mode == "copy" else f"{name} ({mode})"


def summary(record: dict[str, Any], file: TextIO) -> None:
    """The human-readable report: how it was run, on what, from which routing, then one row per policy."""
    t, b, hw = record["trace"], record["bounds"], record["hardware"]
    where = f"the {hw['name']} profile" + (f" (detected: {hw['detected']})" if "detected" in hw else " (not detected: no such GPU here)")
    if record["mode"] == "simulated":
        print(f"simulated on {where}, {record['weights_dtype']} weights", file=file)
    else:
        print(f"measured on {record['device']}, {record['weights_dtype']} weights; bounds and the simulator's estimates "
              f"model {where}" + ("" if record["device"].startswith(("NVIDIA", "AMD")) else ", not this device"),
              file=file)
    if t is not None:
        print(f"trace: {t['name']} ({t['tokens']} tokens, {t['sequences']} sequences), {t['origin']}", file=file)
        print(f"sample: {t['sample']['how']}", file=file)
        if "steps" in t:
            print(f"steps: {t['steps']}", file=file)
        if "predictor_fit" in t:
            print(f"predictor: fit on {t['predictor_fit']}", file=file)
    oracle = b.get("oracle", {}).get("tokens_per_s")
    print(f"bounds tok/s: all-resident {b['all_resident']['tokens_per_s']:.2f} (fits: {b['all_resident']['fits']})"
          + (f", Belady's loads overlapped with compute {oracle:.2f}" if oracle is not None else "")
          + f"; reference: all-miss {b['all_miss']['tokens_per_s']:.2f}", file=file)
    if "model_run" in record:
        m = record["model_run"]
        print(f"measured on {m['layers']} of {m['of']} layers ({m['why']}), {m['slots']} expert slots; bounds are "
              "the simulator's for those layers", file=file)
    for r in record["results"]:
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
        if r.get("prefetches", 0) or r.get("held_back", 0):
            line += f"  prefetched {r['prefetches']} ({r.get('prefetch_hits', 0)} used)"
            if "held_back" in r:  # counted by the measured runtime; the simulator does not count them
                line += f", {r['held_back']} predictions held back by the link budget"
        if r.get("policy") == "belady":
            line += "  (needs the future: a bound, not a policy)"
        print(line, file=file)
    verdict = best_line([r for r in record["results"] if r.get("tokens_per_s") is not None])
    if verdict:
        print(verdict, file=file)
