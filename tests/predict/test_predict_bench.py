"""Cost of a predictor per MoE layer step at batch 1: ``observe`` + ``predict`` (next layer, top-k).

Run with ``pytest tests/predict/test_predict_bench.py --benchmark-only``. Target (issue 5): <= 20 us median
for routing-only predictors. ``numpy_floor`` times one trivial numpy call first: on a shared CPU every
number scales with it, so compare predictors in units of it when the machine is busy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from predict_helpers import random_trace

from prophet.predict import (
    ActivationMatrixPredictor,
    CoOccurrencePredictor,
    FrequencyPredictor,
    MLPPredictor,
    PathMatchPredictor,
    ReusePredictor,
)

pytestmark = pytest.mark.benchmark

SHAPES = {"mixtral": (32, 8, 2), "flame": (8, 64, 6)}  # (MoE layers, experts, top-k)
PREDICTORS = {
    "frequency": FrequencyPredictor,
    "reuse": ReusePredictor,
    "cooccurrence": CoOccurrencePredictor,
    "activation_matrix": ActivationMatrixPredictor,
    "pathmatch": PathMatchPredictor,
    "mlp": lambda L, E, K: MLPPredictor(L, E, K, epochs=1),
}


def test_numpy_floor(benchmark):
    a = np.zeros(8)
    benchmark(np.add, a, 1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", PREDICTORS)
def test_observe_and_predict_per_layer(benchmark, name, shape):
    L, E, K = SHAPES[shape]
    trace = random_trace(np.random.default_rng(0), 512, L, E, K, seqs=8)  # 512 stored tokens to match against
    predictor = PREDICTORS[name](L, E, K).fit([trace])
    steps = itertools.cycle(
        [(layer, torch.from_numpy(trace.experts[t, layer][None]), torch.full((1, K), 1.0 / K))
         for t in range(64) for layer in range(L)]
    )

    def step() -> None:
        layer, ids, weights = next(steps)
        predictor.observe(layer, ids, weights)
        predictor.predict()

    benchmark(step)
    benchmark.extra_info.update({"layers": L, "experts": E, "top_k": K, "target_us": 20})
