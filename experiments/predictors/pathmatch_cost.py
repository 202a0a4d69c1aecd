"""Cost of the path-matching predictor per MoE layer at batch 1 (compiled kernel, numpy fast paths and the plain
reference) as its memory grows (issue 16's budget: observe + predict <= 10 us per layer on this CPU).

Each layer step does what the decode step asks of it: ``observe`` the layer's experts, ``predict`` (the next
layer's top-k, what the prefetcher submits) and the next layer's eviction scores (what a prediction-aware pool
asks for a victim). Routing is sequence 1 of the shared real Mixtral trace; the memory is its sequence 0 (83
tokens, out of sample) and, to see the cost grow with the memory, synthetic Mixtral-shaped traces of 1k, 4k and
16k tokens (`prophet.trace.synth`; the online window holds up to 16k decoded tokens). `PathMatchPredictor`
(with its compiled kernel, `prophet/pathmatch.c`, and with ``native=False``, its numpy fast paths) and
`PathMatchReference` give the same predictions (tests/predict/test_predict_fastpaths.py); they run in
interleaved rounds, timed in this thread's CPU time, medians over rounds. The kernel's votes differ from numpy's
in the last float32 bits, so the out-of-sample recall of both (fitted on sequence 0, replaying sequence 1) is
recorded too. Writes ``experiments/results/pathmatch_cost_cpu.json``.

Usage: ``python experiments/predictors/pathmatch_cost.py [--rounds 9] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from prophet.envs import shared_traces_dir
from prophet.predict import PathMatchPredictor
from prophet.predict.data import RouterTrace, as_router_trace, load
from prophet.predict.evaluate import recall_report
from prophet.predict.pathmatch import PathMatchReference
from prophet.provenance import git_sha
from prophet.trace.synth import synthetic_trace

REPO = Path(__file__).resolve().parents[2]
TOKENS_PER_ROUND = 2


def per_layer_us(memories: dict[str, RouterTrace], test: RouterTrace, rounds: int) -> list[dict]:
    L, E, K = test.num_layers, test.num_experts, test.top_k
    ids = [[test.experts[t, layer][None].astype(np.int64) for layer in range(L)] for t in range(test.num_tokens)]
    out = []
    for name, memory in memories.items():
        predictors = {"kernel": PathMatchPredictor(L, E, K, online=False).fit([memory]),
                      "numpy": PathMatchPredictor(L, E, K, online=False, native=False).fit([memory]),
                      "reference": PathMatchReference(L, E, K, online=False).fit([memory])}
        if predictors["kernel"]._kernel is None:
            raise SystemExit("the path-matching kernel did not build here (no C compiler?): nothing to compare")
        times: dict[str, list[float]] = {k: [] for k in predictors}
        for r in range(rounds + 1):  # round 0 warms up
            for key, p in predictors.items():
                p.eviction_scores([(0, 0)])  # as under a prediction-aware policy
                start = time.thread_time()
                for t in range(r * TOKENS_PER_ROUND, (r + 1) * TOKENS_PER_ROUND):
                    for layer in range(L):
                        p.observe(layer, ids[t % len(ids)][layer], None)
                        p.predict()
                        p.eviction_scores([((layer + 1) % L, e) for e in range(0, E, 2)])
                if r:
                    times[key].append((time.thread_time() - start) / TOKENS_PER_ROUND / L * 1e6)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out.append({"memory": name, "memory_rows": predictors["kernel"].size,
                    **{f"{k}_us_per_layer_median": v for k, v in med.items()},
                    "speedup_vs_reference": med["reference"] / med["kernel"],
                    "speedup_vs_numpy": med["numpy"] / med["kernel"],
                    **{f"{k}_us_rounds": v for k, v in times.items()}})
        print(f"{name:>28} ({out[-1]['memory_rows']:>5} rows): kernel {med['kernel']:6.1f} us/layer, numpy "
              f"{med['numpy']:6.1f}, reference {med['reference']:6.1f} ({med['reference'] / med['kernel']:.2f}x)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "pathmatch_cost_cpu.json")
    args = parser.parse_args()
    trace = load(shared_traces_dir() / "mixtral-8x7b_humaneval_decode.npz")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    memories = {"real sequence 0": trace.sequences([0])}
    for n in (1000, 4000, 16000):
        memories[f"synthetic {n}"] = as_router_trace(synthetic_trace(
            L, E, K, num_sequences=max(1, n // 1000), tokens_per_sequence=min(n, 1000), sample_seed=1,
            progress=False))
    results = per_layer_us(memories, trace.sequences([1]), args.rounds)
    recall = {}
    for name, native in (("kernel", True), ("numpy", False)):  # out of sample: fit sequence 0, replay sequence 1
        report = recall_report(PathMatchPredictor(L, E, K, native=native).fit([trace.sequences([0])]),
                               trace.sequences([1]))
        recall[name] = {v["label"]: v["recall@2"] for v in report["distances"].values()}
        print(f"recall@2 ({name}): {recall[name]}")
    record = {"benchmark": "pathmatch_cost", "machine": platform.processor() or platform.machine(),
              "numpy": np.__version__, "git_sha": git_sha(), "rounds": args.rounds,
              "tokens_per_round": TOKENS_PER_ROUND, "target_us": 10.0, "results": results,
              "recall_out_of_sample": {"fit": "sequence 0", "replay": "sequence 1", "recall@2": recall}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
