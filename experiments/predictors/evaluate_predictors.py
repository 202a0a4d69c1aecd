"""Issue 5 yardsticks: predictor recall and cache hit rates on the shared real router traces.

Every number is out of sample: predictors are fitted on some sequences and measured on the others (Mixtral:
fit on one of its two sequences, test on the other, both ways; FLAME: four folds of 8 test sequences, fitted
on the other 24). Hit rates drive the runtime's own `ExpertCache`/`Prefetcher` (`prophet.predict.evaluate`),
batch 1, layer by layer, with each predictor freshly fitted (online memories must not carry one replay's
test tokens into the next). LRU/LFU/Belady are also given on the whole trace, to compare with the numbers
in the traces' README. Writes ``experiments/results/predictors.json`` and prints the tables.

Usage: ``python experiments/predictors/evaluate_predictors.py [--traces DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prophet.config import PrefetchConfig
from prophet.envs import shared_traces_dir
from prophet.policies import LFU, LRU, Belady, EvictionPolicy, access_positions
from prophet.predict import (
    CoOccurrencePredictor,
    EnsemblePredictor,
    FrequencyPredictor,
    MLPPredictor,
    OraclePredictor,
    PathMatchPredictor,
    ReusePredictor,
    RoutingPredictor,
)
from prophet.predict.data import RouterTrace, load
from prophet.predict.evaluate import recall_report
from prophet.predict.statistical import ActivationMatrixPredictor
from prophet.provenance import git_sha
from prophet.sim.replay import access_stream, replay_counts

REPO = Path(__file__).resolve().parents[2]
# slots: per-layer cache sizes of the README's whole-trace table; headline: where predictors are measured.
TRACES = {
    "mixtral-8x7b_humaneval_decode": {"slots": (3, 4, 6), "headline": 4, "expert_bytes": 3 * 4096 * 14336 * 2},
    # FLAME-MoE-290M's expert size is not in the trace's metadata: loads are reported, bytes are not.
    "flame-moe-290m_prefill": {"slots": (12, 32), "headline": 32, "expert_bytes": None},
}

Factory = Callable[[RouterTrace, RouterTrace], RoutingPredictor]  # (fit, test) -> fitted predictor


def _ensemble(L: int, E: int, K: int, **kw: int) -> EnsemblePredictor:
    """Path matching for the near steps, co-occurrence and recent reuse to steady it (weights set a priori)."""
    members = [PathMatchPredictor(L, E, K), CoOccurrencePredictor(L, E, K, order=2), ReusePredictor(L, E, K, decay=0.8)]
    return EnsemblePredictor(members, [0.6, 0.2, 0.2], **kw)


def predictors(L: int, E: int, K: int) -> dict[str, Factory]:
    """Every predictor of issue 5, as factories of fitted instances (prefetch settings: next layer, top-K)."""

    def fitted(make: Callable[[], RoutingPredictor]) -> Factory:
        return lambda fit, test: make().fit([fit])

    return {
        "frequency": fitted(lambda: FrequencyPredictor(L, E, K)),
        "reuse": fitted(lambda: ReusePredictor(L, E, K)),
        "cooccurrence": fitted(lambda: CoOccurrencePredictor(L, E, K)),
        "cooccurrence-2": fitted(lambda: CoOccurrencePredictor(L, E, K, order=2)),
        "activation_matrix": fitted(lambda: ActivationMatrixPredictor(L, E, K)),
        "pathmatch": fitted(lambda: PathMatchPredictor(L, E, K)),
        "mlp": fitted(lambda: MLPPredictor(L, E, K)),
        "ensemble": fitted(lambda: _ensemble(L, E, K)),
        "oracle": lambda fit, test: OraclePredictor(test),
    }


def splits(trace: RouterTrace) -> list[tuple[list[int], list[int]]]:
    s = trace.num_sequences
    if s == 2:
        return [([0], [1]), ([1], [0])]
    folds = np.array_split(np.arange(s), 4)
    return [([i for i in range(s) if i not in set(f)], f.tolist()) for f in folds]


def _policy(uses: dict, predictor: RoutingPredictor | None) -> Callable[[], EvictionPolicy]:
    """Prediction-aware eviction reading ``predictor``; Belady (knowing ``uses``) without one."""
    if predictor is None:
        return lambda: Belady(uses)
    return predictor.policy_factory()


def hit_rate_runs(
    fit: RouterTrace, test: RouterTrace, slots: int, factories: dict[str, Factory], expert_bytes: int | None
) -> list[dict]:
    """Policies x predictors x prefetch on ``test``, ``slots`` per layer."""
    uses = access_positions(access_stream(test))
    K = test.top_k
    runs: list[tuple[str, Callable[[], EvictionPolicy] | None, str | None, PrefetchConfig | None]] = [
        ("lru", LRU, None, None),
        ("lfu", LFU, None, None),
        ("belady", None, None, None),  # no policy and no predictor: Belady
        ("predicted[pathmatch]", None, "pathmatch", None),
        ("predicted[oracle]", None, "oracle", None),
        ("lru+prefetch[pathmatch]", LRU, "pathmatch", PrefetchConfig(max_inflight=64)),
        ("predicted+prefetch[pathmatch]", None, "pathmatch", PrefetchConfig(max_inflight=64)),
        ("predicted+prefetch[pathmatch,p>=0.3]", None, "pathmatch", PrefetchConfig(max_inflight=64, min_score=0.3)),
        ("predicted+prefetch[pathmatch,p>=0.5]", None, "pathmatch", PrefetchConfig(max_inflight=64, min_score=0.5)),
        ("predicted+prefetch[ensemble]", None, "ensemble", PrefetchConfig(max_inflight=64)),
        ("predicted+prefetch[ensemble,p>=0.5]", None, "ensemble", PrefetchConfig(max_inflight=64, min_score=0.5)),
        ("predicted+prefetch[oracle]", None, "oracle", PrefetchConfig(max_inflight=64)),
    ]
    out = []
    for label, policy, pred_name, prefetch in runs:
        predictor = factories[pred_name](fit, test) if pred_name else None
        if predictor is not None:
            predictor.horizon, predictor.top = 1, K
        res = replay_counts(
            test, policy or _policy(uses, predictor), slots_per_layer=slots, predictor=predictor, prefetch=prefetch,
            expert_bytes=expert_bytes, name=label,
        )
        out.append(res.to_dict())
    return out


def mean_recall(reports: list[dict]) -> dict[str, dict[str, float]]:
    """Step-weighted mean over splits of each distance's recall@k / precision@k."""
    out: dict[str, dict[str, float]] = {}
    for d in reports[0]["distances"]:
        entries = [r["distances"][d] for r in reports]
        steps = np.array([e["steps"] for e in entries], float)
        keys = [k for k in entries[0] if k.startswith(("recall@", "precision@")) and not k.endswith("per_layer")]
        out[d] = {"label": entries[0]["label"], "steps": int(steps.sum())}
        for k in keys:
            vals = np.array([e[k] for e in entries], float)
            ok = ~np.isnan(vals) & (steps > 0)
            out[d][k] = float((vals[ok] * steps[ok]).sum() / steps[ok].sum()) if ok.any() else float("nan")
    return out


def print_recall(name: str, table: dict[str, dict], K: int) -> None:
    first = next(iter(table.values()))
    cols = list(first)
    print(f"\n{name}: recall@{K} (recall@{2 * K}) per look-ahead distance, mean over test splits")
    print(f"{'predictor':<20}" + "".join(f"{first[c]['label']:>16}" for c in cols))
    for pred, dist in table.items():
        print(f"{pred:<20}" + "".join(f"{dist[c][f'recall@{K}']:>8.3f} ({dist[c][f'recall@{2 * K}']:.3f})" for c in cols))


def print_hits(name: str, slots: int, rows: list[dict], expert_bytes: int | None) -> None:
    print(f"\n{name}: {slots} slots per layer, test splits summed")
    print(f"{'policy':<38}{'hit rate':>9}{'loads/tok':>10}{'prefetch':>9}{'pf hits':>8}{'wasted':>8}"
          + ("  GB/token" if expert_bytes else ""))
    for r in rows:
        gb = f"{r['bytes_h2d'] / r['tokens'] / 1e9:>10.2f}" if expert_bytes else ""
        print(f"{r['policy']:<38}{r['hit_rate']:>9.4f}{r['loads_per_token']:>10.2f}{r['prefetches']:>9}"
              f"{r['prefetch_hits']:>8}{r['wasted_prefetches']:>8}{gb}")


def summed(runs: list[list[dict]]) -> list[dict]:
    """Counters of the same policy summed over splits (hit rate = total hits / total accesses)."""
    out = []
    for rows in zip(*runs, strict=True):
        tot = {k: sum(r[k] for r in rows) for k in ("tokens", "hits", "misses", "prefetches", "prefetch_hits",
                                                      "wasted_prefetches", "loads", "bytes_h2d")}
        tot["policy"] = rows[0]["policy"]
        tot["hit_rate"] = tot["hits"] / max(tot["hits"] + tot["misses"], 1)
        tot["loads_per_token"] = tot["loads"] / max(tot["tokens"], 1)
        out.append(tot)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = shared_traces_dir()
    parser.add_argument("--traces", type=Path, default=default)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "predictors.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the MLP's small matrices: threads only contend on a busy 2-core machine
    torch.manual_seed(0)
    results: dict = {
        "meta": {"git": git_sha(), "python": platform.python_version(), "torch": torch.__version__,
                 "numpy": np.__version__, "machine": platform.machine()},
        "traces": {},
    }
    for name, cfg in TRACES.items():
        trace = load(args.traces / f"{name}.npz")
        L, E, K = trace.num_layers, trace.num_experts, trace.top_k
        factories = predictors(L, E, K)
        entry: dict = {"splits": splits(trace), "recall": {}, "hit_rates": {}, "full_trace": {}}
        # Whole trace, no predictor: the README's reference setting.
        uses = access_positions(access_stream(trace))
        for slots in cfg["slots"]:
            entry["full_trace"][str(slots)] = [
                replay_counts(trace, f, slots_per_layer=slots, expert_bytes=cfg["expert_bytes"], name=n).to_dict()
                for n, f in (("lru", LRU), ("lfu", LFU), ("belady", _policy(uses, None)))
            ]
        slots = cfg["headline"]
        hit_runs: list[list[dict]] = []
        reports: dict[str, list[dict]] = {p: [] for p in factories}
        for fit_idx, test_idx in tqdm(entry["splits"], desc=name):
            fit, test = trace.sequences(fit_idx), trace.sequences(test_idx)
            for pname, make in factories.items():
                reports[pname].append(recall_report(make(fit, test), test))
            hit_runs.append(hit_rate_runs(fit, test, slots, factories, cfg["expert_bytes"]))
        entry["recall"] = {p: {"mean": mean_recall(r), "splits": r} for p, r in reports.items()}
        entry["hit_rates"] = {str(slots): {"summed": summed(hit_runs), "splits": hit_runs}}
        results["traces"][name] = entry
        print_recall(name, {p: v["mean"] for p, v in entry["recall"].items()}, K)
        for n in cfg["slots"]:
            print(f"\n{name}: whole trace, {n} slots per layer: " + ", ".join(
                f"{r['policy']} {r['hit_rate']:.4f}" for r in entry["full_trace"][str(n)]))
        print_hits(name, slots, entry["hit_rates"][str(slots)]["summed"], cfg["expert_bytes"])
        for i, rows in enumerate(hit_runs):
            print(f"  split {i} (test {entry['splits'][i][1]}): " + ", ".join(
                f"{r['policy']} {r['hit_rate']:.3f}" for r in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, allow_nan=True))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
