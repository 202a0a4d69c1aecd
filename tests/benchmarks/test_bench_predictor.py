"""Cost of Prophet's predictor per MoE layer at batch 1, inside the step's budget (issue 16): ``observe`` +
``predict`` (the next layer's top-k, what the prefetcher submits) + the next layer's eviction scores (what a
prediction-aware pool asks when it needs a victim), path matching fitted on sequence 0 of the shared real Mixtral
trace and replaying sequence 1 (out of sample).

Run with ``pytest tests/benchmarks --benchmark-only -p no:cacheprovider -s``. Target (this 2-core CPU): <= 10 us
per layer, median of 15 rounds of this thread's CPU time. The plain `PathMatchReference` runs interleaved with it,
so the ratio holds however loaded the machine is. `PathMatchPredictor` runs its compiled kernel where a C compiler
is found (`prophet/pathmatch.c`; the line printed says which).
"""

import time

import numpy as np
import pytest

from prophet.predict import PathMatchPredictor
from prophet.predict.data import load
from prophet.predict.pathmatch import PathMatchReference

pytestmark = pytest.mark.benchmark

TARGET_US = 10.0


def test_predictor_per_layer(benchmark, shared_traces):
    trace = load(shared_traces / "mixtral-8x7b_humaneval_decode.npz")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    fit, test = trace.sequences([0]), trace.sequences([1])
    ids = [[test.experts[t, layer][None].astype(np.int64) for layer in range(L)] for t in range(test.num_tokens)]
    weights = np.full((1, K), 1.0 / K, np.float32)

    def driver(predictor):
        tokens = iter(range(10**9))
        predictor.eviction_scores([(0, 0)])  # as under a prediction-aware policy from the first step

        def token() -> None:
            t = next(tokens) % len(ids)
            if t == 0:
                predictor.reset()
            for layer in range(L):
                predictor.observe(layer, ids[t][layer], weights)
                predictor.predict()
                predictor.eviction_scores([((layer + 1) % L, e) for e in range(0, E, 2)])

        return token

    fast_predictor = PathMatchPredictor(L, E, K).fit([fit])
    benchmark.extra_info["compiled_kernel"] = fast_predictor._kernel is not None
    fast = driver(fast_predictor)
    ref = driver(PathMatchReference(L, E, K).fit([fit]))
    benchmark.pedantic(fast, rounds=20, warmup_rounds=5)
    times: dict[str, list[float]] = {"fast": [], "reference": []}
    for _ in range(15):  # interleaved rounds of 4 tokens each
        for name, run in (("fast", fast), ("reference", ref)):
            start = time.thread_time()
            for _ in range(4):
                run()
            times[name].append((time.thread_time() - start) / 4 / L * 1e6)
    per_layer = {name: float(np.median(v)) for name, v in times.items()}
    benchmark.extra_info.update({f"median_us_per_layer_cpu_{k}": v for k, v in per_layer.items()})
    print(f"\npathmatch predictor: {per_layer['fast']:.1f} us per layer (reference {per_layer['reference']:.1f}, "
          f"{per_layer['reference'] / per_layer['fast']:.2f}x; CPU time, median of 15; spread "
          f"{min(times['fast']):.1f}-{max(times['fast']):.1f}; target {TARGET_US:.0f}; compiled kernel "
          f"{'on' if fast_predictor._kernel is not None else 'off'})")
    assert per_layer["fast"] <= TARGET_US, f"predictor: {per_layer['fast']:.1f} us per layer misses {TARGET_US:.0f} us"
