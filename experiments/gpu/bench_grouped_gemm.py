"""Benchmark the Triton grouped-GEMM MoE kernels against the memory limit and against transformers.

For Mixtral-8x7B, DeepSeek-V2-Lite and OLMoE expert shapes in bf16 and 1..256 tokens, times
`prophet.kernels.moe.moe_experts` (experts read from slab views of a slot pool, as the cache holds them)
next to a per-expert PyTorch loop and transformers v5's ``grouped_mm`` / ``batched_mm`` experts backends
(a MixtralExperts module with ``config._experts_implementation`` set). The HBM ceiling is measured first,
in the same run, with a large device-to-device copy (bytes read + written). Achieved bandwidth counts the
fewest bytes the layer must move: the weights of the distinct experts touched plus the activations in
and out. Every implementation is checked against the reference before it is timed; times are medians of
`triton.testing.do_bench` (warm-up, L2 flushed before each run). Prints a table and ends with one JSON line;
writes the full results to ``$OUT``/--out (if given) and to ``experiments/results/grouped_gemm_<device>.json``.

    python experiments/gpu/bench_grouped_gemm.py [--models mixtral-8x7b olmoe] [--tokens 1 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prophet.kernels.moe import moe_experts, moe_experts_reference
from prophet.kernels.tuning import device_name
from prophet.models.adapter import ExpertFormat
from prophet.provenance import git_sha

REPO = Path(__file__).resolve().parents[2]
# name: (hidden H, intermediate I, experts E, top-k)
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "olmoe": (2048, 1024, 64, 8),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCHED_MM_MAX_BYTES = 16 << 30  # batched_mm gathers one weight copy per (token, k) pair: skip above this
TOLERANCE = 2e-2  # relative L2 error for bf16
WARMUP_MS, REP_MS = 50, 50  # do_bench: a long warm-up lets the GPU clocks ramp up after set-up pauses


@dataclass
class Problem:
    """One model's experts in a slot pool (slab views, as the cache holds them) and its routing."""

    name: str
    fmt: ExpertFormat
    experts: int
    top_k: int
    w1: torch.Tensor  # [S, 2I, H] view into pool [S, slab]
    w2: torch.Tensor  # [S, H, I] view into the same pool
    expert_to_slot: torch.Tensor  # [E] slot of each expert (a permutation: slot ids are not expert ids)

    @property
    def expert_bytes(self) -> int:
        return self.fmt.nbytes(self.w1.dtype)

    def route(self, tokens: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Fresh hidden states and top-k routing over distinct experts, as a softmax router gives."""
        device = self.w1.device
        logits = torch.randn(tokens, self.experts, generator=gen, device=device)
        top, experts = logits.topk(self.top_k, dim=1)
        weights = torch.softmax(top, dim=1).to(self.w1.dtype)
        hidden = torch.randn(tokens, self.fmt.hidden_size, generator=gen, device=device, dtype=self.w1.dtype)
        return {"hidden": hidden, "experts": experts, "slots": self.expert_to_slot[experts], "weights": weights}


def make_problem(name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Problem:
    hid, inter, experts, top_k = MODELS[name]
    fmt = ExpertFormat(hid, inter)
    n1 = fmt.w1_rows
    pool = torch.empty(experts, fmt.numel, dtype=dtype, device=device)  # [S, slab], S = E: all resident
    pool.normal_(0.0, hid**-0.5, generator=gen)
    w1 = pool[:, : n1 * hid].view(experts, n1, hid)
    w2 = pool[:, n1 * hid :].view(experts, hid, inter)
    w2.mul_((hid / inter) ** 0.5)  # down weights ~ N(0, 1/I)
    perm = torch.randperm(experts, generator=gen, device=device)
    return Problem(name, fmt, experts, top_k, w1, w2, perm)


def torch_loop(
    hidden: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    fmt: ExpertFormat,
) -> torch.Tensor:
    """Baseline: one pair of F.linear per used slot (the shape of transformers' eager experts)."""
    top_k = slots.shape[1]
    flat = slots.reshape(-1)
    order = torch.argsort(flat, stable=True)
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    router = weights.reshape(-1)
    for slot, pairs in zip(used.tolist(), torch.split(order, counts.tolist()), strict=True):
        tok = pairs // top_k
        gate, up = F.linear(hidden[tok], w1[slot]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[slot]) * router[pairs, None]
        out.index_add_(0, tok, y.float())
    return out.to(hidden.dtype)


def hf_experts(problem: Problem) -> torch.nn.Module | None:
    """transformers' MixtralExperts holding the problem's experts in its own (contiguous) storage."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError as exc:
        print(f"transformers MixtralExperts unavailable ({exc}): no transformers baselines")
        return None
    if getattr(MixtralExperts.forward, "__wrapped__", None) is None:
        print("this transformers' MixtralExperts has no experts backends: no transformers baselines")
        return None
    fmt = problem.fmt
    config = MixtralConfig(
        hidden_size=fmt.hidden_size,
        intermediate_size=fmt.intermediate_size,
        num_local_experts=problem.experts,
        num_experts_per_tok=problem.top_k,
    )
    with torch.device("meta"):
        module = MixtralExperts(config)
    slots = problem.expert_to_slot
    module.gate_up_proj = torch.nn.Parameter(problem.w1[slots].contiguous(), requires_grad=False)
    module.down_proj = torch.nn.Parameter(problem.w2[slots].contiguous(), requires_grad=False)
    return module


def hf_backends() -> list[str]:
    """The transformers experts backends this installation registers (``config._experts_implementation``)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as exc:
        print(f"transformers has no experts backends ({exc}): no transformers baselines")
        return []
    return [impl for impl in ("grouped_mm", "batched_mm") if impl in ALL_EXPERTS_FUNCTIONS]


def hf_call(module: torch.nn.Module, impl: str) -> Callable[..., torch.Tensor]:
    def call(hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        module.config._experts_implementation = impl
        return module(hidden, experts, weights)

    return call


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def graph_ms(fn: Callable[[], object]) -> float | None:
    """Median time of a CUDA-graph replay of ``fn`` (no launch gaps), or None if it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return median_ms(graph.replay)
    except RuntimeError as exc:
        print(f"  graph capture failed: {exc}")
        return None


def hbm_copy_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read + written, over 2 GiB buffers."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * (2 << 30) / ms / 1e6


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_point(
    problem: Problem, module: torch.nn.Module | None, tokens: int, gen: torch.Generator, hbm: float
) -> dict:
    """One (model, tokens) point: correctness of every implementation, then its median time and rates."""
    fmt = problem.fmt
    r = problem.route(tokens, gen)
    args = (r["hidden"], r["slots"], r["weights"], problem.w1, problem.w2, fmt)
    distinct = int(torch.unique(r["slots"]).numel())
    act_bytes = 2 * r["hidden"].numel() * r["hidden"].element_size()
    nbytes = distinct * problem.expert_bytes + act_bytes
    flops = 2 * tokens * problem.top_k * (fmt.w1_rows * fmt.hidden_size + fmt.hidden_size * fmt.intermediate_size)
    ref = moe_experts_reference(*args)

    impls: dict[str, Callable[[], torch.Tensor]] = {
        "prophet": lambda: moe_experts(*args),
        "torch_loop": lambda: torch_loop(*args),
    }
    if module is not None:
        hf_args = (r["hidden"], r["experts"], r["weights"])
        for impl in hf_backends():
            if impl == "batched_mm" and tokens * problem.top_k * problem.expert_bytes > BATCHED_MM_MAX_BYTES:
                continue
            impls[f"hf_{impl}"] = functools.partial(hf_call(module, impl), *hf_args)

    point: dict = {
        "model": problem.name,
        "tokens": tokens,
        "pairs": tokens * problem.top_k,
        "distinct_experts": distinct,
        "bytes": nbytes,
        "flops": flops,
        "impls": {},
    }
    for name, fn in impls.items():
        try:
            err = relative_error(fn(), ref)
        except Exception as exc:  # a baseline the installed transformers cannot run: reported, not fatal
            point["impls"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        entry: dict = {"rel_err": err}
        if math.isnan(err) or err > TOLERANCE:
            entry["error"] = f"wrong result: relative error {err:.3g} > {TOLERANCE}"
        else:
            ms = median_ms(fn)
            entry |= {"ms": ms, "GBps": nbytes / ms / 1e6, "TFLOPs": flops / ms / 1e9}
            entry["pct_hbm"] = 100 * entry["GBps"] / hbm
        point["impls"][name] = entry
    ours = point["impls"]["prophet"]
    if "ms" in ours:
        ours["graph_ms"] = graph_ms(impls["prophet"])
        hf = [v["ms"] for k, v in point["impls"].items() if k.startswith("hf_") and "ms" in v]
        if hf:
            point["speedup_vs_best_hf"] = min(hf) / ours["ms"]
        if "ms" in point["impls"]["torch_loop"]:
            point["speedup_vs_torch_loop"] = point["impls"]["torch_loop"]["ms"] / ours["ms"]
    return point


def fmt_ms(entry: dict) -> str:
    return f"{entry['ms']:.3f}" if "ms" in entry else "-"


def print_row(p: dict) -> None:
    ours = p["impls"]["prophet"]
    cols = [f"{p['model']:<17}", f"{p['tokens']:>4}", f"{p['distinct_experts']:>3}"]
    if "ms" in ours:
        graph = ours.get("graph_ms")
        cols += [
            f"{ours['ms']:8.3f}",
            f"{graph:8.3f}" if graph else f"{'-':>8}",
            f"{ours['GBps']:7.0f}",
            f"{ours['pct_hbm']:5.1f}",
            f"{ours['TFLOPs']:6.1f}",
        ]
    else:
        cols += [f"{ours.get('error', '?')[:40]:>40}"]
    for name in ("torch_loop", "hf_grouped_mm", "hf_batched_mm"):
        cols.append(f"{fmt_ms(p['impls'].get(name, {})):>9}")
    speed = p.get("speedup_vs_best_hf")
    cols.append(f"{speed:6.2f}x" if speed else "      -")
    print(" ".join(cols), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_gemm.py needs a CUDA GPU")
    import transformers
    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(args.seed)
    hbm = hbm_copy_gbps(device)
    props = torch.cuda.get_device_properties(device)
    print(f"device {torch.cuda.get_device_name(device)}: {props.multi_processor_count} SMs; "
          f"measured HBM copy bandwidth {hbm:.0f} GB/s (read + write)")
    header = (f"{'model':<17} {'tok':>4} {'exp':>3} {'ms':>8} {'graph_ms':>8} {'GB/s':>7} {'%HBM':>5} {'TF/s':>6} "
              f"{'loop_ms':>9} {'grouped':>9} {'batched':>9} {'vs_hf':>7}")
    points = []
    start = time.time()
    for name in args.models:
        problem = make_problem(name, torch.bfloat16, device, gen)
        module = hf_experts(problem)
        print(header)
        for tokens in args.tokens:
            point = bench_point(problem, module, tokens, gen, hbm)
            points.append(point)
            print_row(point)
        del problem, module
        torch.cuda.empty_cache()

    def prophet_values(model: str, hi: int, key: str) -> list[float]:
        return [
            p["impls"]["prophet"][key] if key in p["impls"]["prophet"] else p[key]
            for p in points
            if p["model"] == model and p["tokens"] <= hi and (key in p["impls"]["prophet"] or key in p)
        ]

    mixtral_pct = prophet_values("mixtral-8x7b", 16, "pct_hbm")
    summary = {
        "mixtral_min_pct_hbm_1_16": min(mixtral_pct) if mixtral_pct else None,
        "min_speedup_vs_best_hf_1_64": {
            m: min(v) if (v := prophet_values(m, 64, "speedup_vs_best_hf")) else None for m in args.models
        },
    }
    record = {
        "bench": "grouped_gemm",
        "device": torch.cuda.get_device_name(device),
        "hbm_copy_GBps": hbm,
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "git_sha": git_sha(),
        "config": {"dtype": "bfloat16", "models": {m: MODELS[m] for m in args.models}, "tokens": args.tokens,
                   "seed": args.seed, "timer": f"triton.testing.do_bench median, warmup {WARMUP_MS} ms, rep {REP_MS} ms"},
        "summary": summary,
        "seconds": round(time.time() - start, 1),
    }
    file_name = f"grouped_gemm_{device_name(device)}.json"
    full = record | {"points": points}
    targets = [REPO / "experiments" / "results" / file_name] + ([args.out / file_name] if args.out else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(full, indent=1) + "\n")
    print(json.dumps(record | {"results_file": str(targets[0].relative_to(REPO))}))


if __name__ == "__main__":
    main()
