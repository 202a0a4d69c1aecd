"""Tune the launch settings of the Triton MoE kernels on this GPU and write them as `prophet.kernels` data.

For each model shape of bench_grouped_gemm.py and each token count, a coordinate search over whole
`moe_experts_triton` calls (align step included), timed with `triton.testing.do_bench` medians:
  1. path and group block: the decode path (T*k <= DECODE_MAX_PAIRS) or prefill with 16/32/64-row blocks;
  2. gate_up tile (BLOCK_N, BLOCK_K, warps, stages) with the down tile fixed;
  3. down tile, then its split-K factor.
A candidate that fails to launch (shared memory) or disagrees with the reference is skipped and logged.
Writes ``prophet/kernels/configs/moe_H.._I.._bfloat16_<device>_triton-<version>.json`` (and a copy under --out / $OUT),
keyed by T*k so a call rounds its pair count up to the nearest tuned bucket.

    python experiments/gpu/tune_grouped_gemm.py [--models mixtral-8x7b] [--tokens 1 4 16] [--budget-s 200]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import triton
from bench_grouped_gemm import MODELS, TOKENS, TOLERANCE, Problem, make_problem, relative_error
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from prophet.kernels.moe import moe_experts_reference, moe_experts_triton
from prophet.kernels.tuning import (
    CONFIG_DIR,
    DECODE_MAX_PAIRS,
    GemmConfig,
    MoEConfig,
    config_file_name,
    device_name,
    write_configs,
)

DECODE_TILES = [
    GemmConfig(32, 256, 4, 4),
    GemmConfig(64, 128, 4, 4),
    GemmConfig(32, 128, 4, 4),
    GemmConfig(64, 256, 4, 3),
    GemmConfig(128, 64, 4, 4),
    GemmConfig(128, 128, 8, 3),
]
PREFILL_TILES = [
    GemmConfig(64, 64, 4, 3),
    GemmConfig(128, 64, 4, 3),
    GemmConfig(64, 128, 4, 4),
    GemmConfig(32, 128, 4, 4),
    GemmConfig(64, 256, 4, 3),
    GemmConfig(128, 128, 8, 3),
]
PREFILL_BLOCKS = (16, 32, 64)
SPLITS = (2, 4)


class Timer:
    """Times one routing of one problem under candidate configs; remembers the best."""

    def __init__(self, problem: Problem, tokens: int, gen: torch.Generator) -> None:
        r = problem.route(tokens, gen)
        self.args = (r["hidden"], r["slots"], r["weights"], problem.w1, problem.w2, problem.fmt)
        self.ref = moe_experts_reference(*self.args)
        self.best: tuple[float, MoEConfig] | None = None

    def __call__(self, cfg: MoEConfig) -> float:
        try:
            err = relative_error(moe_experts_triton(*self.args, config=cfg), self.ref)
            if math.isnan(err) or err > TOLERANCE:
                print(f"    skip {cfg}: relative error {err:.3g}")
                return math.inf
            ms = do_bench(lambda: moe_experts_triton(*self.args, config=cfg), warmup=10, rep=30, return_mode="median")
        except (OutOfResources, CompilationError) as exc:
            print(f"    skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            return math.inf
        if self.best is None or ms < self.best[0]:
            self.best = (ms, cfg)
        return ms


def tune_point(problem: Problem, tokens: int, gen: torch.Generator, thorough: bool) -> tuple[MoEConfig, float]:
    pairs = tokens * problem.top_k
    timer = Timer(problem, tokens, gen)
    starts = [MoEConfig("prefill", PREFILL_TILES[0], PREFILL_TILES[0], block_m=b) for b in PREFILL_BLOCKS]
    if pairs <= DECODE_MAX_PAIRS:
        starts.insert(0, MoEConfig("decode", DECODE_TILES[1], DECODE_TILES[1]))
    for cfg in starts:
        timer(cfg)
    if thorough and timer.best is not None:
        base = timer.best[1]
        tiles = DECODE_TILES if base.path == "decode" else PREFILL_TILES
        for tile in tiles:
            timer(MoEConfig(base.path, tile, base.down, base.block_m))
        base = timer.best[1]
        for tile in tiles:
            timer(MoEConfig(base.path, base.gate_up, tile, base.block_m))
        base = timer.best[1]
        for split in SPLITS:
            timer(MoEConfig(base.path, base.gate_up, base.down, base.block_m, split_k=split))
    if timer.best is None:
        raise SystemExit(f"no candidate ran for {problem.name} at {tokens} tokens")
    return timer.best[1], timer.best[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--budget-s", type=float, default=200.0, help="after this, only step 1 of the search")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_grouped_gemm.py needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(1)
    start = time.time()
    for name in args.models:
        problem = make_problem(name, torch.bfloat16, device, gen)
        fmt = problem.fmt
        table: dict[int, MoEConfig] = {}
        timings: dict[int, float] = {}
        for tokens in args.tokens:
            thorough = time.time() - start < args.budget_s
            cfg, ms = tune_point(problem, tokens, gen, thorough)
            pairs = tokens * problem.top_k
            table[pairs], timings[pairs] = cfg, ms
            print(f"{name} tokens={tokens} pairs={pairs}: {ms:.3f} ms {'' if thorough else '(step 1 only) '}{cfg}")
        file_name = config_file_name(fmt.hidden_size, fmt.intermediate_size, torch.bfloat16,
                                     device_name(device), triton.__version__)
        meta = {
            "model": name,
            "device": torch.cuda.get_device_name(device),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "top_k": problem.top_k,
            "experts": problem.experts,
            "median_ms": {str(k): round(v, 4) for k, v in timings.items()},
            "written": time.strftime("%Y-%m-%d"),
        }
        for folder in [CONFIG_DIR] + ([args.out] if args.out else []):
            folder.mkdir(parents=True, exist_ok=True)
            write_configs(folder / file_name, table, meta)
        print(f"wrote {CONFIG_DIR / file_name}")
        del problem
        torch.cuda.empty_cache()
    print(f"tuning took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
