"""Benchmarks (run with ``pytest --benchmark-only -s tests/trace``): recording overhead on a tiny model's decode
(target <= 5%) and loading 1M token-layer rows (target <= 1 s, CRC check and validation included)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch
from trace_helpers import make_trace, tiny_mixtral

import prophet.trace as pt

pytestmark = pytest.mark.benchmark


def test_bench_record_overhead_tiny_decode(benchmark, tmp_path):
    # Two identical models, one recorded; each benchmark round (recorded) follows one plain round in its
    # setup, so both see the same machine load and the overhead is the ratio of their medians.
    benchmark.group = "record-overhead"
    plain, recorded = tiny_mixtral(layers=4), tiny_mixtral(layers=4)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))

    def decode(model: torch.nn.Module) -> None:
        model.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)

    plain_times: list[float] = []

    def plain_round() -> None:
        t0 = time.perf_counter()
        decode(plain)
        plain_times.append(time.perf_counter() - t0)

    with pt.record(recorded, tmp_path / "t"):
        benchmark.pedantic(decode, args=(recorded,), setup=plain_round, rounds=60, warmup_rounds=3)
    plain_times = plain_times[3:]  # the warmup rounds' setups
    overhead = benchmark.stats.stats.median / statistics.median(plain_times) - 1
    overhead_min = benchmark.stats.stats.min / min(plain_times) - 1  # less sensitive to a busy machine
    benchmark.extra_info.update(
        plain_median_s=statistics.median(plain_times), overhead=overhead, overhead_min=overhead_min
    )
    print(
        f"\nrecording overhead on tiny decode (32 tokens, 4 MoE layers): {overhead:+.1%} by medians, "
        f"{overhead_min:+.1%} by minima (target <= 5%)"
    )


def test_bench_load_1m_token_layer_rows(benchmark, tmp_path):
    benchmark.group = "load"
    n, layers = 31_250, 32  # 1,000,000 token-layer rows, Mixtral-shaped
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((n, layers, 8)), axis=-1)[..., :2]
    path = make_trace(experts, list(range(0, n + 1, 250))).save(tmp_path / "big")
    trace = benchmark.pedantic(pt.load, args=(path,), rounds=10, warmup_rounds=1)
    assert len(trace) * trace.num_layers == 1_000_000
