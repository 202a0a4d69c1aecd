"""Per-MoE-layer bookkeeping cost of the runtime: dedup + acquire + remap + release, no GEMM and no copies.

Run with ``pytest tests/benchmarks --benchmark-only``. Targets (issue 4): <= 25 us median at batch 1 with
Mixtral routing on a 2-core CPU; the 64-expert top-8 batch-64 case is reported beside it.
"""

import pytest
import torch

from prophet.cache import ExpertCache
from prophet.layer import unique_experts
from prophet.models.adapter import ExpertFormat
from prophet.policies import LRU
from prophet.prefetch import Prefetcher
from prophet.runtime import Runtime
from prophet.store import HostStore
from prophet.transfer import SyncCopyEngine

pytestmark = pytest.mark.benchmark


def runtime(layers: int, experts: int) -> Runtime:
    fmt = ExpertFormat(hidden_size=8, intermediate_size=8)
    store = HostStore(layers, experts, fmt, torch.float32, pin=False)
    cache = ExpertCache(store, torch.device("cpu"), SyncCopyEngine(), LRU, slots_per_layer=experts)
    for layer in range(layers):  # warm: every expert resident, so the step measures bookkeeping only
        cache.release(layer, cache.acquire(layer, list(range(experts))))
    return Runtime([], store, cache, Prefetcher(cache), None, "reference", torch.device("cpu"))


def bookkeeping(rt: Runtime, routes: list[torch.Tensor]) -> None:
    for layer, top_k_index in enumerate(routes):
        ids, _ = unique_experts(top_k_index, rt.num_experts)
        rt.prefetcher.advance(layer)
        slots = rt.cache.acquire(layer, ids)
        rt._lut(ids, slots, fill=0)[top_k_index]
        rt.cache.release(layer, slots)


@pytest.mark.parametrize(
    "name, layers, experts, top_k, batch",
    [("mixtral_b1", 32, 8, 2, 1), ("e64_top8_b64", 16, 64, 8, 64)],
)
def test_layer_bookkeeping(benchmark, name, layers, experts, top_k, batch):
    rt = runtime(layers, experts)
    routes = [torch.stack([torch.randperm(experts)[:top_k] for _ in range(batch)]) for _ in range(layers)]
    benchmark.extra_info["per"] = f"{layers} layers per round"
    benchmark(bookkeeping, rt, routes)
    per_layer_us = benchmark.stats.stats.median / layers * 1e6
    benchmark.extra_info["median_us_per_layer"] = per_layer_us
    print(f"\n{name}: {per_layer_us:.1f} us per MoE layer (median)")
