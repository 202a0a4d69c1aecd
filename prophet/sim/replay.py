"""Trace replay under the cost model, through the runtime's own cache, policies, predictors and prefetcher.

A batch of B sequences decodes in lockstep: lane b plays the trace's tokens (all sequences, in order,
cyclically) starting at row ``b * N // B``, one token per step, so a batch mixes different sequences at
different positions. Each MoE layer step dedups the batch's experts and drives the real `ExpertCache` in the
order `prophet.runtime.Runtime.run_layer` does: advance the prefetcher, acquire (waves when the batch wants more
experts than the pool holds), issue compute, release, observe, submit predictions. Only time is modelled: the
`SimCopyEngine` clock (copies serialized on one link, overlapping compute when ``overlap``) and the
`CostModel` roofline per layer. `replay_counts` runs the same step with free copies and no clock (the predictor
harness): same order, same counters.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from prophet.cache import ExpertCache, LayerStats
from prophet.config import PrefetchConfig
from prophet.errors import ConfigError
from prophet.hardware import HardwareProfile, get_profile
from prophet.hybrid import MissPlanner, RunningCosts, allowed
from prophet.models.adapter import ExpertFormat
from prophet.models.registry import get_spec
from prophet.models.spec import ModelSpec
from prophet.policies import POLICY_FACTORIES, Belady, EvictionPolicy, Key, PredictionAware, access_positions
from prophet.predict.base import Prediction
from prophet.predict.data import RouterTrace, as_router_trace
from prophet.prefetch import Prefetcher
from prophet.sim.cost import CostModel
from prophet.sim.engine import SimCopyEngine
from prophet.step import Step
from prophet.store import HostStore

# Replay moves one-element slabs; the engine charges the real expert size.
_TINY = ExpertFormat(hidden_size=1, intermediate_size=1)


# ---- the batched step schedule ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Which trace rows each step plays and the distinct experts of every (step, layer).

    rows     int64 [P, B]      trace row of lane b at position p
    flat     list[int]         distinct expert ids, ascending, of step-layer i = s * L + l at offsets[i]:offsets[i+1]
    offsets  int64 [S*L + 1]
    prompt   int               positions the first step plays at once (a prefill, deduplicated as one step, as the
                               runtime does); every later step plays one position
    """

    rows: np.ndarray
    flat: list[int]
    offsets: np.ndarray
    num_layers: int
    prompt: int = 1

    @property
    def steps(self) -> int:
        return int(self.rows.shape[0]) - self.prompt + 1

    @property
    def batch(self) -> int:
        return int(self.rows.shape[1])

    def positions(self, step: int) -> tuple[int, int]:
        """``[start, end)`` positions of ``step``."""
        return (0, self.prompt) if step == 0 else (self.prompt + step - 1, self.prompt + step)

    def tokens(self, step: int) -> np.ndarray:
        """``[T]`` trace rows of ``step`` in the runtime's token order (lane-major: t = b * n + p)."""
        start, end = self.positions(step)
        return self.rows[start:end].T.reshape(-1)

    def ids(self, step: int, layer: int) -> list[int]:
        i = step * self.num_layers + layer
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def distinct(self) -> np.ndarray:
        """``[S, L]`` distinct experts per step and layer."""
        return np.diff(self.offsets).reshape(self.steps, self.num_layers)


def schedule(trace: RouterTrace, batch: int = 1, steps: int | None = None, prompt: int = 1) -> Schedule:
    """Interleave ``batch`` lanes over ``trace`` for ``steps`` steps, the first playing ``prompt`` positions
    (default: every token once)."""
    if batch < 1 or prompt < 1:
        raise ConfigError(f"batch={batch}, prompt={prompt}: both must be at least 1")
    n, L, E = trace.num_tokens, trace.num_layers, trace.num_experts
    steps = steps if steps is not None else max(n // batch - prompt + 1, 1)
    if steps < 1:
        raise ConfigError(f"steps={steps}: must be at least 1")
    positions = prompt + steps - 1
    start = (np.arange(batch) * n) // batch  # [B]
    rows = (start[None, :] + np.arange(positions)[:, None]) % n  # [P, B]
    step_of = np.maximum(np.arange(positions) - prompt + 1, 0)  # [P] the step each position belongs to
    ex = trace.experts[rows]  # [P, B, L, K]
    p_i, _, l_i, _ = np.nonzero(ex >= 0)
    hot = np.zeros((steps, L, E), dtype=bool)  # [S, L, E]
    hot[step_of[p_i], l_i, ex[ex >= 0]] = True
    _, _, e_i = np.nonzero(hot)  # C order: by step, then layer, then expert
    offsets = np.concatenate([[0], np.cumsum(hot.sum(axis=2).ravel())]).astype(np.int64)
    return Schedule(rows=rows, flat=e_i.tolist(), offsets=offsets, num_layers=L, prompt=prompt)


def access_stream(sched: Schedule | RouterTrace) -> list[Key]:
    """Every ``(layer, expert)`` the cache is asked for when ``sched`` (or a trace's batch-1 schedule) is
    replayed, in order (what Belady must know; a step's experts ascending, as the step acquires them)."""
    if not isinstance(sched, Schedule):
        sched = schedule(as_router_trace(sched))
    L = sched.num_layers
    return [(layer, e) for s in range(sched.steps) for layer in range(L) for e in sched.ids(s, layer)]


class ScheduleOracle:
    """Perfect prediction of the replayed schedule: the exact experts of the next ``horizon`` layer steps.

    `prophet.predict.ensemble.OraclePredictor` follows one token stream; a batch's dedup union is only known to
    the schedule, so the simulator's bound reads it here. It counts `observe` calls to know where it is.
    """

    name = "oracle"

    def __init__(self, sched: Schedule, horizon: int | None = None) -> None:
        self.sched = sched
        self.horizon = horizon or sched.num_layers  # one token ahead, the most a per-layer pool can use safely
        self.pos = -1  # step-layer index last observed

    def observe(self, layer: int, expert_ids: Any, weights: Any, hidden: Any = None) -> None:
        self.pos += 1

    def predict(self) -> list[Prediction]:
        L = self.sched.num_layers
        step, layer = divmod(self.pos, L)
        out = []
        for d in range(1, self.horizon + 1):
            s, lay = divmod(self.pos + d, L)
            if s >= self.sched.steps:
                break
            out.extend(Prediction(layer + d, e, 1.0) for e in self.sched.ids(s, lay))
        return out


# ---- predictors and policies by name -------------------------------------------------------------------
# The prophet policy's predictor per miss mode, chosen by simulated tokens/s on sequence 0 of the shared Mixtral
# trace alone (`experiments/replay/policy_select.py`, `experiments/results/sim_policy.json`): with misses on the host
# the value policy (`prophet.predict.value`, its defaults are the hybrid setting chosen there); copy-only the
# faster of the value grid and path matching there: the value policy at its copy-only setting (`COPY_ONLY`).
PROPHET_PREDICTOR = {"copy": "value-copy", "auto": "value", "host": "value"}


def policy_args(name: str, predictor: str | None = None, on_miss: str = "copy") -> tuple[str, str | None]:
    """``(policy, predictor)`` for a policy name: ``prophet`` is prediction-aware eviction with a predictor
    (`PROPHET_PREDICTOR` of ``on_miss`` unless one is named), which also drives prefetch (`prophet_prefetch`);
    ``predicted`` alone gets co-occurrence. Other policies keep ``predictor`` (eviction by the policy, prefetch by
    the predictor)."""
    if name == "prophet":
        return "predicted", predictor or PROPHET_PREDICTOR.get(on_miss, PROPHET_PREDICTOR["copy"])
    if name == "predicted":
        return "predicted", predictor or "cooccurrence"
    return name, predictor


def prophet_prefetch(predictor: str | None, on_miss: str) -> PrefetchConfig | None:
    """The prefetch the prophet policy was selected with: the value policy with misses on the host keeps one copy
    in flight (an admission or prefetch never queues behind another while misses run on the host); otherwise None
    (the replay's default, the link budget)."""
    return PrefetchConfig(max_inflight=1) if predictor == "value" and on_miss != "copy" else None


def make_predictor(name: str, trace: RouterTrace, sched: Schedule) -> Any:
    """A predictor by name: ``oracle`` (perfect, from the schedule) or a `prophet.predict` predictor's ``name``,
    fitted on ``trace`` (pass routing other than the replayed one: `prophet.sim.samples`). ``a+b`` builds an ensemble."""
    if name == "oracle":
        return ScheduleOracle(sched)
    from prophet.predict import ensemble, pathmatch, statistical, value

    classes = {
        c.name: c
        for c in (
            statistical.FrequencyPredictor,
            statistical.ReusePredictor,
            statistical.CoOccurrencePredictor,
            statistical.ActivationMatrixPredictor,
            pathmatch.PathMatchPredictor,
            value.ValuePredictor,
        )
    }
    classes["value-copy"] = functools.partial(value.ValuePredictor, **value.COPY_ONLY)  # its copy-only setting
    parts = name.split("+")
    unknown = [p for p in parts if p not in classes]
    if unknown:
        raise ConfigError(f"predictor {unknown[0]!r} unknown: use oracle, {', '.join(sorted(classes))}, or a+b")
    members = [classes[p](trace.num_layers, trace.num_experts, trace.top_k) for p in parts]
    pred = members[0] if len(members) == 1 else ensemble.EnsemblePredictor(members)
    return pred.fit([trace])


def _policy_factory(
    policy: str | Callable[[], EvictionPolicy], uses: Callable[[], dict], predictor: Any
) -> tuple[str, Callable[[], EvictionPolicy]]:
    """``(name, factory)``: ``belady`` (knows the schedule), ``predicted`` (the predictor's eviction score),
    or a `prophet.policies.POLICY_FACTORIES` name; a callable is used as is."""
    if callable(policy):
        return getattr(policy, "name", getattr(policy, "__name__", "custom")), policy
    if policy == "belady":
        shared = uses()
        return policy, lambda: Belady(shared)
    if policy == "predicted":
        if not hasattr(predictor, "eviction_score"):
            raise ConfigError("policy='predicted' needs a predictor with eviction_score (a prophet.predict predictor)")
        if hasattr(predictor, "policy_factory"):
            return policy, predictor.policy_factory()
        return policy, lambda: PredictionAware(predictor.eviction_score)
    if policy not in POLICY_FACTORIES:
        known = ", ".join(sorted([*POLICY_FACTORIES, "belady", "predicted"]))
        raise ConfigError(f"policy={policy!r} is not known: use one of {known}")
    return policy, POLICY_FACTORIES[policy]


# ---- results -------------------------------------------------------------------------------------------
@dataclass
class ReplayResult:
    """One replay's cache counters and, under a cost model, its modelled speed. Times are seconds per decode
    step (B tokens); with free copies (`replay_counts`) every time is 0 and ``gpu`` is ``"free copies"``.

    total = compute + stall + cpu exactly; copy_busy is link time, which overlaps compute. ``loads`` counts
    host->device copies (demand misses, prefetches and admissions).
    """

    model: str
    gpu: str
    policy: str
    predictor: str | None
    slots: str
    slots_total: int
    batch: int
    steps: int
    tokens: int
    context: int
    overlap: bool
    cpu_fallback: bool  # on_miss is not "copy"
    on_miss: str
    tokens_per_s: float
    step_s: float
    compute_s: float
    stall_s: float
    cpu_s: float  # CPU time of host experts beyond the GPU's share of the layer (on_miss)
    copy_busy_s: float
    hit_rate: float
    hits: int
    misses: int
    cpu_misses: int
    loads: int
    bytes_h2d: int
    prefetches: int
    prefetch_hits: int
    wasted_prefetches: int
    distinct_per_layer: float  # mean distinct experts per layer step (after batch dedup)
    wall_s: float  # how long the replay took on this machine
    per_layer_hit_rate: list[float] = field(default_factory=list)
    warmed: int = 0  # warm-start copies (in loads unless warm_during="prefill")
    warm_during: str = "decode"  # whose clock the warm-start copies ran on

    @property
    def loads_per_token(self) -> float:
        return self.loads / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loads_per_token": self.loads_per_token}


class _SimPlanner(MissPlanner):
    """`MissPlanner` on the cost model's costs and the simulated link's clock."""

    def __init__(self, on_miss: str, cost: CostModel, engine: SimCopyEngine) -> None:
        super().__init__(on_miss, RunningCosts(cost.miss_costs()))
        self.engine = engine

    def queues(self, layer: int) -> tuple[float, float]:
        return max(0.0, self.engine.link_free - self.engine.now), 0.0

    def ready_s(self, load: Any) -> float:
        return max(0.0, load.done_at - self.engine.now)


def _device_idle(engine: SimCopyEngine, totals: dict[str, Any], gpu: float, cpu: float) -> None:
    """A layer step with no expert on the device: its time is the non-expert part or the host's, whichever is
    longer; copies issued now start at its beginning."""
    begin = engine.now
    engine.now = begin + max(gpu, cpu)
    engine.issue_at = begin
    totals["compute"] += gpu
    totals["cpu"] += max(gpu, cpu) - gpu


class _SimHost:
    """The simulator's `prophet.step.HostPath`: host experts cost the model's time, one after another on the
    host threads; the device's last wave ends no earlier than they do."""

    def __init__(self, engine: SimCopyEngine, totals: dict[str, Any], planner: _SimPlanner, distinct: int,
                 idle_gpu_s: float) -> None:
        self.engine, self.totals, self.planner = engine, totals, planner
        self.distinct, self.idle_gpu_s = distinct, idle_gpu_s
        self.experts: list[int] = []
        self.cpu = 0.0

    def submit(self, experts: list[int], tokens: dict[int, int]) -> None:
        self.experts = experts
        costs = self.planner.running.costs
        self.cpu = sum(costs.host_s(tokens[e]) for e in experts)
        if len(experts) == self.distinct:  # every expert on the host: no device wave will move the clock
            _device_idle(self.engine, self.totals, self.idle_gpu_s, self.cpu)

    def join(self) -> None:
        """Nothing to wait for: the device's last wave already ran until the host was done."""


def replay(
    trace: Any,
    spec: ModelSpec | str,
    profile: HardwareProfile | str,
    *,
    policy: str | Callable[[], EvictionPolicy] = "lru",
    predictor: Any = None,
    slots_per_layer: int | None = None,
    cache_slots: int | None = None,
    batch: int = 1,
    steps: int | None = None,
    prompt: int = 1,
    context: int = 2048,
    dtype: torch.dtype = torch.bfloat16,
    expert_dtype: str | None = None,
    overlap: bool = True,
    cpu_fallback: bool = False,
    on_miss: str = "copy",
    prefetch: PrefetchConfig | None = None,
    sched: Schedule | None = None,
    sequences: bool = True,
    progress: bool = True,
    label: str | None = None,
    warm: Sequence[Key] | None = None,
    warm_during: str = "decode",
) -> ReplayResult:
    """Replay ``trace`` (a `prophet.trace.Trace` or `RouterTrace`) as ``spec`` on ``profile``.

    ``predictor``: None, a name (see `make_predictor`) or a `Predictor`; its predictions are prefetched
    (``prefetch`` config; by default enabled when a predictor is given, within the cost model's link budget,
    `prophet.prefetch.Prefetcher.threshold`). ``on_miss`` ("copy", "auto", "host"; ``cpu_fallback`` is
    ``on_miss="auto"``) decides in the step, as the runtime does, where each missed expert runs
    (`prophet.hybrid.decide` on ``cost.miss_costs()``): host experts run on the host CPU while the GPU runs the
    resident ones, and "auto" admits them into the cache with background copies ("host" never copies).
    ``sched`` reuses a precomputed `schedule` (it must match ``trace``, ``batch``, ``steps`` and
    ``prompt``). ``sequences``: reset the predictor where a trace sequence starts (batch 1); else only before the
    first step, as the runtime does for one generation over these rows.
    ``label`` names the progress bar (default: the policy), so it matches the caller's row name.
    ``expert_dtype`` stores the experts quantized (`CostModel`): copies and reads move that format's bytes.
    ``warm``: experts that fill free slots where a sequence starts (`prophet.warm`), as the runtime's step does;
    ``warm_during="decode"``: their copies start on the link at the sequence's first step and count in the clock
    and in ``loads``; ``"prefill"``: the first sequence's warm copies land before the clock starts, as when they
    overlap the prompt's prefill (which streams every expert through anyway; a decode trace has no prefill to
    time), and are not counted in ``loads``.
    """
    trace = as_router_trace(trace)
    spec = get_spec(spec) if isinstance(spec, str) else spec
    profile = get_profile(profile)
    L, E = trace.num_layers, trace.num_experts
    if (L, E) != (spec.num_moe_layers, spec.num_experts):
        raise ConfigError(
            f"trace has {L} layers x {E} experts but {spec.name} has {spec.num_moe_layers} x {spec.num_experts}; "
            "replay a trace of that model"
        )
    sched = sched or schedule(trace, batch, steps, prompt)
    cost = CostModel(spec, profile, dtype, context, expert_dtype)
    return _drive(trace, sched, policy, predictor, SimCopyEngine(profile, cost.expert_bytes, overlap=overlap), cost,
                  slots_per_layer=slots_per_layer, cache_slots=cache_slots, prefetch=prefetch,
                  on_miss="auto" if cpu_fallback else on_miss, sequences=sequences, progress=progress, label=label,
                  warm=warm, warm_during=warm_during, meta={"model": spec.name, "gpu": profile.name, "context": context, "overlap": overlap})


def replay_counts(
    trace: Any,
    policy: str | Callable[[], EvictionPolicy] = "lru",
    *,
    predictor: Any = None,
    slots_per_layer: int | None = None,
    cache_slots: int | None = None,
    batch: int = 1,
    steps: int | None = None,
    prompt: int = 1,
    prefetch: PrefetchConfig | None = None,
    expert_bytes: int | None = None,
    name: str | None = None,
    sequences: bool = True,
    progress: bool = False,
    warm: Sequence[Key] | None = None,
) -> ReplayResult:
    """The same step with free copies and no clock: cache counters only (the predictor harness).

    Predictions are prefetched only when ``prefetch`` is given and enabled. ``expert_bytes`` (one real expert's
    size) turns loads into ``bytes_h2d``; without it ``bytes_h2d`` counts loads.
    """
    trace = as_router_trace(trace)
    sched = schedule(trace, batch, steps, prompt)
    engine = SimCopyEngine(None, expert_bytes or 1)
    r = _drive(trace, sched, policy, predictor, engine, None, slots_per_layer=slots_per_layer,
               cache_slots=cache_slots, prefetch=prefetch or PrefetchConfig(enabled=False), on_miss="copy",
               sequences=sequences, progress=progress, label=name, warm=warm,
               meta={"model": trace.name, "gpu": "free copies", "context": 0, "overlap": True})
    if name is not None:
        r.policy = name
    return r


def _drive(
    trace: RouterTrace,
    sched: Schedule,
    policy: str | Callable[[], EvictionPolicy],
    predictor: Any,
    engine: SimCopyEngine,
    cost: CostModel | None,
    *,
    slots_per_layer: int | None,
    cache_slots: int | None,
    prefetch: PrefetchConfig | None,
    on_miss: str,
    sequences: bool,
    progress: bool,
    meta: dict[str, Any],
    label: str | None = None,
    warm: Sequence[Key] | None = None,
    warm_during: str = "decode",
) -> ReplayResult:
    """Run every step of ``sched`` through `prophet.step.Step` over a fresh cache on ``engine``; ``cost``
    (None: free) moves the clock by each layer's modelled compute."""
    wall = time.perf_counter()
    L, E = trace.num_layers, trace.num_experts
    B, S = sched.batch, sched.steps
    if isinstance(predictor, str):
        predictor = make_predictor(predictor, trace, sched)
    policy_name, factory = _policy_factory(policy, lambda: access_positions(access_stream(sched)), predictor)
    allowed(on_miss)  # a ConfigError naming the choices
    if on_miss != "copy" and policy_name == "belady":
        raise ConfigError(f"belady needs every expert to pass through the cache; it cannot run with on_miss={on_miss!r} "
                          "(cpu_fallback)")
    store = HostStore(L, E, _TINY, torch.float32, pin=False)
    cache = ExpertCache(
        store, torch.device("cpu"), engine, factory, cache_slots=cache_slots, slots_per_layer=slots_per_layer
    )
    if on_miss != "copy" and cache.holds_everything():
        # As `Runtime.settle`: a cache with a slot for every expert loads them all at wrap and never misses. With
        # misses computed on the host it would otherwise never fill; copy-only fills it at each expert's first use.
        cache.preload()
        cache.stats = [LayerStats() for _ in cache.stats]  # the preload happened before the replay
        engine.restart()
    distinct = float(sched.distinct().mean())
    # By default prefetch within the link budget: only predictions whose hidden compute outweighs their risk.
    config = prefetch or PrefetchConfig(enabled=predictor is not None, **cost.link_budget(distinct, B))
    prefetcher = Prefetcher(cache, config)
    planner = _SimPlanner(on_miss, cost, engine) if on_miss != "copy" else None
    step = Step(cache, prefetcher, predictor, planner, warm)
    if warm_during not in ("decode", "prefill"):
        raise ConfigError(f"warm_during={warm_during!r}: use 'decode' or 'prefill'")
    if warm and warm_during == "prefill":  # landed before decode's clock starts (`replay`)
        cache.warm(list(warm))
        cache.finish_loads()
        engine.restart()
    seq_start = np.zeros(trace.num_tokens, dtype=bool)
    seq_start[trace.seq_offsets[:-1]] = True
    resets = sequences and B == 1  # a batch mixes sequences: no single point to reset at
    totals = {"compute": 0.0, "cpu": 0.0}
    # GPU time of a layer step by (distinct experts, tokens), computed once per pair
    layer_seconds = functools.lru_cache(maxsize=None)(cost.layer_seconds if cost is not None else lambda n, t: 0.0)

    for s in tqdm(range(S), desc=f"replay {label or policy_name}", disable=not progress, leave=False):
        rows = sched.tokens(s)  # [T]
        tokens = len(rows)
        if seq_start[rows[0]] if resets else s == 0:
            step.begin_sequence()
        for layer in range(L):
            ids = sched.ids(s, layer)
            host = _SimHost(engine, totals, planner, len(ids), layer_seconds(0, tokens)) if planner is not None else None
            capacity = cache.capacity(layer)

            def compute(wave: Any, slots: list[int], index: int, ids=ids, host=host, layer=layer, tokens=tokens,
                        capacity=capacity) -> None:
                device = len(ids) - (len(host.experts) if host is not None else 0)
                gpu = layer_seconds(device, tokens)
                cpu = host.cpu if host is not None else 0.0
                share = gpu * len(wave) / device
                last = index == (device - 1) // capacity
                run = max(share, cpu) if last else share  # the host's experts finish with the layer
                begin = engine.now
                # the kernels are queued; the clock moves to their end, while copies the host issues now
                # (admissions, prefetches) start at ``begin`` on the link when copies overlap compute
                engine.now = begin + run
                engine.issue_at = begin
                totals["compute"] += share
                totals["cpu"] += run - share
                engine.computing(cache.pool(layer).data, slots, begin + run)

            def after(index: int, last: bool) -> None:
                if not last:  # the last wave's start stays the issue time of the admissions that follow it
                    engine.issue_at = None

            if not ids:  # nothing to compute: the layer's time is its non-expert part
                _device_idle(engine, totals, layer_seconds(0, tokens), 0.0)
            hidden = None if trace.hidden is None or B > 1 else trace.hidden[rows, layer]
            step.run(layer, ids, compute, trace.experts[rows, layer], trace.weights[rows, layer], hidden, after=after,
                     host=host)
            engine.issue_at = None

    total = cache.total_stats()
    seconds = engine.now
    n_tokens = S * B
    misses = total.misses  # host experts included (the step counts them)
    loads = engine.copies
    return ReplayResult(
        model=meta["model"],
        gpu=meta["gpu"],
        policy=policy_name,
        predictor=None if predictor is None else str(getattr(predictor, "name", type(predictor).__name__)),
        slots=f"{slots_per_layer} of {E} per layer" if slots_per_layer else f"{cache_slots} shared",
        slots_total=cache.num_slots,
        batch=B,
        steps=S,
        tokens=n_tokens,
        context=meta["context"],
        overlap=meta["overlap"],
        cpu_fallback=on_miss != "copy",
        on_miss=on_miss,
        tokens_per_s=n_tokens / seconds if seconds > 0 else float("inf"),
        step_s=seconds / S,
        compute_s=totals["compute"] / S,
        stall_s=engine.stall_seconds() / S,
        cpu_s=totals["cpu"] / S,
        copy_busy_s=engine.busy / S,
        hit_rate=total.hits / (total.hits + misses) if total.hits + misses else 0.0,
        hits=total.hits,
        misses=misses,
        cpu_misses=total.host_experts,
        loads=loads,
        bytes_h2d=loads * engine.expert_bytes,
        prefetches=total.prefetches - total.admitted,
        prefetch_hits=total.prefetch_hits,
        wasted_prefetches=total.wasted_prefetches,
        distinct_per_layer=distinct,
        wall_s=time.perf_counter() - wall,
        per_layer_hit_rate=[round(st.hit_rate, 4) for st in cache.stats],
        warmed=total.warmed,
        warm_during=warm_during,
    )
