"""Where a decode step's time goes on the GPU: wall time per step against the sum of its kernels' device times.

A 4-layer Mixtral-8x7B-shaped model (real widths, random bf16 weights, routing forced from a synthetic trace of
Mixtral's shape) decodes at batch 1, resident (every expert in a slot: no host sync) and at 4 of 8 slots per
layer (the cached step: one host sync per MoE layer, copies of misses). For each setting: the median wall time
per step (synchronized), the sum of the step's CUDA kernel times (torch.profiler), the experts kernels' own time
(CUDA events around each call), and the host-bound share, 1 - kernels / step. Copies are not kernels: at 4 slots
the link time of misses is reported separately (``h2d_gb_per_step``).

Writes ``step_time_<gpu>.json`` to ``--out`` and prints one JSON line last. ``--dry-run`` (automatic without CUDA)
runs the same code on a tiny model on the CPU for two steps and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import prophet
from prophet import decode as dec
from prophet.models.registry import get_spec
from prophet.predict.data import as_router_trace
from prophet.provenance import git_sha
from prophet.routing import ForcedRouting
from prophet.sim.replay import schedule
from prophet.trace.synth import synthetic_trace
from prophet.wrap import reconfigure, runtime_of

PROMPT = 16


class ExpertTimer:
    """CUDA events around each experts-kernel call of the runtime; `total_ms` sums the finished pairs."""

    def __init__(self, runtime) -> None:
        self.runtime, self.real, self.pairs = runtime, runtime._kernel, []
        runtime._kernel = self

    def __call__(self, *args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.real(*args)
        end.record()
        self.pairs.append((start, end))
        return out

    def total_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs)

    def remove(self) -> None:
        self.runtime._kernel = self.real


def measure(model, routing, setting: str, steps: int, cuda: bool) -> dict:
    """Decode ``steps`` timed steps after a prefill and a warm-up step; profile the timed window on CUDA."""
    device = next(model.parameters()).device
    kv = dec.kv_cache_for(model, device, PROMPT + steps + 2, PROMPT + steps + 2, 1, next(model.parameters()).dtype)
    runtime = runtime_of(model)

    def forward(tokens: torch.Tensor, pos: int) -> torch.Tensor:
        routing.begin(tokens.shape[1])
        position = torch.arange(pos, pos + tokens.shape[1], device=device)
        return model(input_ids=tokens, cache=kv, cache_position=position, use_cache=True).logits[:, -1:].argmax(-1)

    routing.reset()
    with torch.inference_mode():
        if kv is not None:
            kv.reset()
        runtime.begin_sequence()
        vocab = model.config.get_text_config().vocab_size
        token = forward(torch.randint(3, vocab, (1, PROMPT), device=device), 0)
        token = forward(token, PROMPT)  # warm-up
        before = prophet.stats(model).total
        timer = ExpertTimer(runtime) if cuda else None
        walls = []
        activities = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                token = forward(token, PROMPT + 1 + i)
                if cuda:
                    torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
        experts_ms = timer.total_ms() / steps if timer else None
        if timer:
            timer.remove()
    after = prophet.stats(model).total
    kernels_ms = None
    if cuda:
        kernels_us = sum(e.self_device_time_total for e in prof.key_averages()
                         if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.key)
        kernels_ms = kernels_us / 1e3 / steps
    step_ms = float(np.median(walls)) * 1e3
    lookups = (after.hits - before.hits) + (after.misses - before.misses)
    return {
        "setting": setting, "steps": steps, "step_ms_median": step_ms, "step_ms_p90": float(np.percentile(walls, 90)) * 1e3,
        "kernels_ms_per_step": kernels_ms, "experts_kernels_ms_per_step": experts_ms,
        "host_bound_share": None if kernels_ms is None else max(0.0, 1.0 - kernels_ms / step_ms),
        "hit_rate": (after.hits - before.hits) / lookups if lookups else None,
        "h2d_gb_per_step": (after.bytes_h2d - before.bytes_h2d) / steps / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, two steps, nothing written")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    spec = get_spec("mixtral")
    if cuda:
        spec, device, dtype, steps = dec.truncate(spec, args.layers), torch.device("cuda"), torch.bfloat16, args.steps
    else:
        print("step_time: dry run on the CPU (tiny model, two steps, nothing written)")
        spec, device, dtype, steps = spec.tiny(), torch.device("cpu"), torch.float32, 2
    L, E, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    trace = as_router_trace(synthetic_trace(32, E, K, num_sequences=1, tokens_per_sequence=256, progress=False))
    trace = dataclasses.replace(trace, experts=trace.experts[:, :L], weights=trace.weights[:, :L],
                                exact=trace.exact[:, :L], hidden=None)  # Mixtral's routing, first L layers
    sched = schedule(trace, 1, 2 + steps, prompt=PROMPT)
    model = dec.random_model(spec, dtype, device, cache_slots=L * E)
    routing = ForcedRouting(trace.experts, sched.rows, device)
    results = []
    for setting, slots in (("resident", E), ("4 slots per layer", 4)):
        reconfigure(model, slots_per_layer=slots)
        routing.attach(runtime_of(model).layers)
        results.append(measure(model, routing, setting, steps, cuda))
        routing.detach()
    for r in results:
        share = "n/a" if r["host_bound_share"] is None else f"{r['host_bound_share']:.0%}"
        print(f"{r['setting']:>18}: step {r['step_ms_median']:.2f} ms, kernels {r['kernels_ms_per_step']} ms, "
              f"host-bound {share}, hit rate {r['hit_rate']}")
    record = {"benchmark": "step_time", "gpu": torch.cuda.get_device_name() if cuda else None, "layers": L,
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "python": platform.python_version(),
              "git_sha": git_sha(), "results": results}
    if cuda:
        args.out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name().replace(" ", "_")
        (args.out / f"step_time_{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
