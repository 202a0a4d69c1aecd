"""Replay several policies on one schedule, each with predictors fitted out of sample (`prophet.sim.samples`).

What ``prophet-bench`` (plan + replay) and ``prophet-bench replay`` share: checking policy and predictor names
before any long work, the loop over policies, and which of them could run online (Belady and the oracle
predictor need the future).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prophet.errors import ConfigError
from prophet.hardware import HardwareProfile
from prophet.models.spec import ModelSpec
from prophet.policies import POLICY_FACTORIES
from prophet.predict.data import RouterTrace
from prophet.sim.replay import Schedule, make_predictor, policy_args, prophet_prefetch, replay, schedule
from prophet.sim.samples import Sample
from prophet.warm import fitted_order

NEEDS_FUTURE = ("belady", "oracle")  # a policy and a predictor that read the schedule ahead


def assign(name: str, predictor: str | None, everywhere: bool, on_miss: str = "copy") -> tuple[str, str | None]:
    """``(policy, predictor)`` of a policy name under ``on_miss``; ``predictor`` serves only
    ``prophet``/``predicted`` unless ``everywhere`` (then every policy prefetches with it)."""
    return policy_args(name, predictor if everywhere or name in ("prophet", "predicted") else None, on_miss)


def check_policies(names: Sequence[str], predictor: str | None, everywhere: bool = False) -> None:
    """Refuse unknown policy or predictor names now, before any plan, trace or replay."""
    if not names:
        raise ConfigError("--policy is empty: give a comma list such as lru,prophet")
    known = sorted([*POLICY_FACTORIES, "belady", "predicted", "prophet"])
    for name in names:
        if assign(name, predictor, everywhere)[0] not in [*POLICY_FACTORIES, "belady", "predicted"]:
            raise ConfigError(f"--policy {name}: unknown; use a comma list of {', '.join(known)}")
    used = {p for n in names if (p := assign(n, predictor, everywhere)[1])}
    if used:
        probe = RouterTrace(experts=np.zeros((2, 1, 1), np.int64), weights=np.ones((2, 1, 1), np.float32),
                            seq_offsets=np.array([0, 2]), exact=np.ones((2, 1), bool), num_experts=1, name="probe")
        for p in used:
            try:
                make_predictor(p, probe, schedule(probe))
            except ConfigError as exc:
                raise ConfigError(f"--predictor {p}: {exc}") from None


def learns(names: Sequence[str], predictor: str | None, everywhere: bool = False) -> bool:
    """Whether any of ``names`` needs a predictor fitted on routing (the oracle reads the schedule instead)."""
    return any(assign(n, predictor, everywhere)[1] not in (None, "oracle") for n in names)


def online(row: dict[str, Any]) -> bool:
    """Whether a result row's policy could run on a live model (not Belady, not the oracle, not a baseline)."""
    return row.get("policy") != "all-resident" and row.get("policy") != "belady" and row.get("predictor") != "oracle" \
        and row.get("tokens_per_s") is not None


def best_line(rows: list[dict[str, Any]]) -> str | None:
    """The summary's verdict: the fastest policy that can run online, against LRU measured beside it."""
    lru = next((r for r in rows if r.get("policy") == "lru" and r.get("tokens_per_s")), None)
    rivals = [r for r in rows if online(r) and r.get("policy") != "lru"]
    if lru is None or not rivals:
        return None
    best = max(rivals, key=lambda r: r["tokens_per_s"])
    ratio = best["tokens_per_s"] / lru["tokens_per_s"]
    if ratio <= 1.0:
        return f"best: lru {lru['tokens_per_s']:.2f} tok/s; no online policy beats it (best other: {best['policy']} {ratio:.2f}x)"
    return f"best: {best['policy']} {best['tokens_per_s']:.2f} tok/s = {ratio:.2f}x LRU (online policies only)"


def replay_policies(sample: Sample, spec: ModelSpec, profile: HardwareProfile, names: Sequence[str],
                    predictor: str | None, sched: Schedule, *, everywhere: bool = False, progress: bool = True,
                    on_miss: Sequence[str] = ("copy",), warm: str | None = None,
                    **replay_args: Any) -> list[dict[str, Any]]:
    """Replay ``sample.replay`` once per policy name and ``on_miss`` mode (predictors fitted on ``sample.fit``);
    rows keep the name, with the mode after it unless it is "copy". ``prophet`` takes its mode's predictor and,
    unless ``replay_args`` give one, prefetch (`prophet.sim.replay.policy_args`, `prophet_prefetch`). ``warm``
    ("decode" or "prefill"; None: none) warms every row's cache from the fitted routing's frequencies
    (`prophet.warm`; ``warm_during`` of `replay`)."""
    rows = []
    fit = sample.fit if sample.fit is not None else sample.replay
    order = fitted_order([fit]) if warm else None
    for mode in on_miss:
        for name in names:
            policy, pred = assign(name, predictor, everywhere, mode)
            model = None if pred is None else make_predictor(pred, fit, sched)
            label = name if mode == "copy" else f"{name} ({mode})"
            args = dict(replay_args)
            if name == "prophet" and args.get("prefetch") is None:
                args["prefetch"] = prophet_prefetch(pred, mode)
            r = replay(sample.replay, spec, profile, policy=policy, predictor=model, sched=sched, progress=progress,
                       label=label, on_miss=mode, warm=order, warm_during=warm or "decode", **args)
            rows.append({**r.to_dict(), "policy": label})
    return rows


def infer_spec(trace: RouterTrace) -> ModelSpec:
    """The first registry model whose MoE layers, experts and top-k match the trace."""
    from prophet.models.registry import list_specs

    shape = (trace.num_layers, trace.num_experts, trace.top_k)
    for spec in list_specs():
        if (spec.num_moe_layers, spec.num_experts, spec.top_k) == shape:
            return spec
    raise ConfigError(f"no registry model has {shape} (MoE layers, experts, top-k); pass --model")


def replay_record(trace: RouterTrace, spec: ModelSpec, profile: HardwareProfile, policies: Sequence[str], *,
                  predictor: str | None = None, fit: RouterTrace | None = None, in_sample: bool = False,
                  slots_per_layer: int | None = None, cache_slots: int | None = None, batch: int = 1,
                  steps: int | None = None, repeat: bool = False, context: int = 2048, overlap: bool = True,
                  on_miss: str = "copy", prefetch: str = "budget", expert_dtype: str | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """``prophet-bench replay``: each policy on the held-out routing (``predictor`` prefetching for every
    policy), beside the bounds; the record names the sample and how often it was played. ``on_miss`` other
    than "copy" adds each policy's rows with missed experts decided by `prophet.hybrid.decide`, beside the
    copy-only ones.

    ``prefetch``: ``budget`` copies a prediction only where the compute it hides outweighs the link time it
    risks (the default), ``all`` copies every prediction, ``none`` evicts by prediction but copies nothing ahead.
    """
    from prophet.config import PrefetchConfig
    from prophet.sim.bounds import bounds

    configs = {"budget": None, "all": PrefetchConfig(), "none": PrefetchConfig(enabled=False)}
    if prefetch not in configs:
        raise ConfigError(f"--prefetch {prefetch}: use one of {', '.join(configs)}")
    from prophet.sim.samples import replay_steps, split_sample

    check_policies(policies, predictor, everywhere=True)
    sample = split_sample(trace, fit=fit, in_sample=in_sample, learns=learns(policies, predictor, everywhere=True))
    steps, note = replay_steps(sample.replay.num_tokens, batch, steps, repeat)
    sched = schedule(sample.replay, batch, steps)
    cap = {"slots_per_layer": slots_per_layer, "cache_slots": cache_slots}
    results = replay_policies(sample, spec, profile, policies, predictor, sched, everywhere=True, progress=progress,
                              batch=batch, context=context, overlap=overlap,
                              on_miss=("copy",) if on_miss == "copy" else ("copy", on_miss),
                              prefetch=configs[prefetch], expert_dtype=expert_dtype, **cap)
    limits = bounds(spec, profile, batch, trace=sample.replay, context=context, sched=sched, expert_dtype=expert_dtype,
                    **cap)
    return {"results": results, "bounds": limits, "hardware": profile.to_dict(),
            "sample": {**sample.to_dict(), "steps": note, "trace": trace.name}}
