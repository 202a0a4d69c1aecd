"""GPU check of the offload path on a Mixtral-8x7B-shaped stack of a few MoE layers with random weights.

Measures, in one run on the lent GPU:
1. pinned (and pageable) host->device GB/s per expert slab, and the fixed cost per copy (a fit over sizes);
2. stall per miss: one MoE layer step at batch 1 with all hits vs with one demand miss per step;
3. overlap: prefetch copies on the side stream while the compute stream runs expert steps; the copy and
   compute intervals (CUDA events on each stream) must intersect and the wall time must be well under the
   sum of the two run alone.
Writes ``offload_check_<gpu>.json`` to ``--out`` (and prints one JSON line last).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from prophet.cache import ExpertCache
from prophet.config import PrefetchConfig
from prophet.models.adapter import ExpertFormat
from prophet.policies import LRU
from prophet.predict.base import Prediction
from prophet.prefetch import Prefetcher
from prophet.runtime import Runtime
from prophet.store import HostStore
from prophet.transfer import CudaCopyEngine

MIXTRAL = ExpertFormat(hidden_size=4096, intermediate_size=14336)


def events_ms(fn, repeat: int, stream: torch.cuda.Stream | None = None) -> list[float]:
    """Per-call milliseconds of ``fn`` measured with CUDA events on ``stream``."""
    stream = stream or torch.cuda.current_stream()
    out = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def copy_bandwidth(dev: torch.device) -> dict:
    """H2D GB/s for pinned and pageable sources of several sizes, and the per-copy fixed cost."""
    rows = []
    side = torch.cuda.Stream(dev)
    for mb in (1, 4, 12.6, 17.3, 64, 352.3):
        n = int(mb * 1e6 / 2)
        dst = torch.empty(n, dtype=torch.bfloat16, device=dev)
        for pinned in (True, False):
            src = torch.empty(n, dtype=torch.bfloat16, pin_memory=pinned)
            src.fill_(1.0)
            with torch.cuda.stream(side):
                times = events_ms(lambda d=dst, s=src: d.copy_(s, non_blocking=True), 3, side)  # warm-up
                times = events_ms(lambda d=dst, s=src: d.copy_(s, non_blocking=True), 10 if mb < 100 else 5, side)
            med = statistics.median(times)
            rows.append({"mb": mb, "pinned": pinned, "ms": med, "gb_s": n * 2 / med / 1e6})
    pinned_rows = [r for r in rows if r["pinned"]]
    # least squares: ms = a + bytes / bw
    xs = [r["mb"] for r in pinned_rows]
    ys = [r["ms"] for r in pinned_rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"rows": rows, "fixed_cost_us": (my - slope * mx) * 1e3, "fit_gb_s": 1.0 / slope}  # ms per MB -> GB/s


def build_runtime(layers: int, slots_per_layer: int, dev: torch.device, kernels: str) -> Runtime:
    store = HostStore(layers, 8, MIXTRAL, torch.bfloat16, pin=True)
    slab = torch.randn(MIXTRAL.numel, device=dev, dtype=torch.bfloat16) * 0.02
    for li in range(layers):
        for e in range(8):
            store.slab(li, e).copy_(slab.roll(li * 8 + e))
    cache = ExpertCache(store, dev, CudaCopyEngine(dev), LRU, slots_per_layer=slots_per_layer)
    return Runtime([], store, cache, Prefetcher(cache), None, kernels, dev)


def step_ms(rt: Runtime, layer: int, ids: list[int], hidden: torch.Tensor) -> float:
    idx = torch.tensor([ids], device=hidden.device)
    w = torch.full((1, len(ids)), 1.0 / len(ids), device=hidden.device)
    start = time.perf_counter()
    rt.run_layer(layer, hidden, idx, w)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def stall_per_miss(rt: Runtime, hidden: torch.Tensor) -> dict:
    """Batch-1 step time with all hits vs one demand miss per step (2 slots per layer, LRU)."""
    layer = 0
    for _ in range(3):
        step_ms(rt, layer, [0, 1], hidden)
    hits = [step_ms(rt, layer, [0, 1], hidden) for _ in range(20)]
    misses = []
    for i in range(10):  # alternate expert 2+i%2 into the slot LRU frees: each step misses exactly one
        before = rt.cache.stats[layer].misses
        misses.append(step_ms(rt, layer, [0, 2 + i % 6], hidden))
        assert rt.cache.stats[layer].misses - before == 1
    hit_ms, miss_ms = statistics.median(hits), statistics.median(misses)
    return {"hit_step_ms": hit_ms, "miss_step_ms": miss_ms, "stall_per_miss_ms": miss_ms - hit_ms}


def overlap(rt: Runtime, hidden: torch.Tensor, steps: int) -> dict:
    """Compute alone, copies alone, and both at once; intervals from events on each stream."""
    dev = hidden.device
    layers = rt.store.num_layers
    resident = [0, 1]

    def compute():
        for i in range(steps):
            idx = torch.tensor([resident] * hidden.shape[0], device=dev)
            w = torch.full(idx.shape, 0.5, device=dev)
            rt.run_layer(i % 2, hidden, idx, w)

    for layer in range(2):  # layers 0-1 hold experts 0-1; layers 2.. are prefetch targets
        rt.cache.release(layer, rt.cache.acquire(layer, resident))
    torch.cuda.synchronize()
    t = time.perf_counter()
    compute()
    torch.cuda.synchronize()
    compute_ms = (time.perf_counter() - t) * 1e3

    preds = [Prediction(layer, e, 1.0 - 0.01 * e) for layer in range(2, layers) for e in range(2)]
    rt.prefetcher.config = PrefetchConfig(max_inflight=64)
    t = time.perf_counter()
    rt.prefetcher.submit(preds, current_layer=1)
    torch.cuda.synchronize()
    copy_ms = (time.perf_counter() - t) * 1e3
    copied = sum(s.prefetches for s in rt.cache.stats)

    for layer in range(2, layers):  # evict the prefetched experts again: swap in other ones
        rt.cache.release(layer, rt.cache.acquire(layer, [6, 7]))
    torch.cuda.synchronize()
    engine = rt.cache.engine
    copy_start = torch.cuda.Event(enable_timing=True)
    copy_end = torch.cuda.Event(enable_timing=True)
    comp_start = torch.cuda.Event(enable_timing=True)
    comp_end = torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    copy_start.record(engine.stream)
    rt.prefetcher.submit(preds, current_layer=1)
    copy_end.record(engine.stream)
    comp_start.record()
    compute()
    comp_end.record()
    torch.cuda.synchronize()
    both_ms = (time.perf_counter() - t) * 1e3
    # intervals relative to copy_start
    c0, c1 = 0.0, copy_start.elapsed_time(copy_end)
    k0, k1 = copy_start.elapsed_time(comp_start), copy_start.elapsed_time(comp_end)
    overlap_ms = max(0.0, min(c1, k1) - max(c0, k0))
    return {
        "steps": steps, "batch": hidden.shape[0], "slabs_copied": copied,
        "compute_alone_ms": compute_ms, "copy_alone_ms": copy_ms, "both_ms": both_ms,
        "sum_alone_ms": compute_ms + copy_ms, "copy_interval_ms": [c0, c1], "compute_interval_ms": [k0, k1],
        "overlap_ms": overlap_ms, "overlap_share_of_shorter": overlap_ms / min(c1 - c0, k1 - k0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kernels", default="reference", choices=["reference", "triton", "auto"])
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    result: dict = {"gpu": name, "torch": torch.__version__, "kernels": args.kernels, "layers": args.layers,
                    "expert_mb": MIXTRAL.nbytes(torch.bfloat16) / 1e6}
    result["copy"] = copy_bandwidth(dev)
    print("copy:", json.dumps(result["copy"]["rows"]), flush=True)
    rt = build_runtime(args.layers, 2, dev, args.kernels)
    hidden = torch.randn(1, MIXTRAL.hidden_size, device=dev, dtype=torch.bfloat16)
    result["stall"] = stall_per_miss(rt, hidden)
    print("stall:", result["stall"], flush=True)
    rt = build_runtime(args.layers, 2, dev, args.kernels)
    result["overlap"] = overlap(rt, torch.randn(64, MIXTRAL.hidden_size, device=dev, dtype=torch.bfloat16), 200)
    result["seconds"] = time.perf_counter() - t0
    tag = name.replace(" ", "_").replace("/", "_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"offload_check_{tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
