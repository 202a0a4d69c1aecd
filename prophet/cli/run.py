"""``prophet-bench run`` (the default): plan the GPU memory, then measure decode on a device or simulate it.

``prophet-bench --model mixtral --ctx 128k`` is this subcommand. See `prophet.bench` for what it does.
"""

from __future__ import annotations

import argparse
from typing import Any

from prophet import bench
from prophet.cli.common import add_out, names, non_negative, parse_tokens, positive
from prophet.plan import DEFAULT_GPU

HELP = "plan, then measure decode (GPU or --device cpu) or simulate it (the default subcommand)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixtral", help="registry alias (e.g. mixtral, olmoe) or a local checkpoint dir")
    p.add_argument("--ctx", type=parse_tokens, default=None, help="context per sequence: 32768, 128k, 1m (default: trained)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--gpu", default=None, help=f"hardware profile (default: the detected GPU, else {DEFAULT_GPU})")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16 or fp8")
    p.add_argument("--expert-dtype", default=None, help="experts stored quantized (planned and simulated): int4, "
                   "int8, fp8, mxfp4, or a modelled width: int2..int7, or <b>bit such as 2.6bit (default: bf16)")


def register(sub: Any) -> None:
    p = sub.add_parser("run", help=HELP, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--weights", choices=("real", "random"), default="random",
                   help="measured decode: the checkpoint's weights (--model is a checkpoint dir) or random weights")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="measure decode here (auto: on the GPU when there is one, else simulate)")
    p.add_argument("--simulate", action="store_true", help="replay in the simulator even when a GPU is present")
    p.add_argument("--layers", type=positive, default=None,
                   help="random weights: build the first N layers only (default: as many as host memory holds)")
    p.add_argument("--slots", type=int, default=None, help="expert slots for the whole model, instead of the plan's")
    p.add_argument("--trace", default=None, help="router trace to replay or force (default: synthetic, for the "
                   "model's shape); with --weights real, the routing the predictor learns from")
    p.add_argument("--fit", default=None, help="trace the predictors learn from (default: the first half of --trace's "
                   "sequences, the rest replayed)")
    p.add_argument("--in-sample", action="store_true", help="fit predictors on the replayed routing itself "
                   "(optimistic; labelled in the output)")
    p.add_argument("--repeat", action="store_true", help="allow --steps beyond the replayed routing (it is replayed "
                   "again; labelled)")
    p.add_argument("--policy", type=names, default=("lru", "prophet"),
                   help="comma list: lru, lfu, fifo, belady, predicted, prophet (default lru,prophet)")
    p.add_argument("--predictor", default=None, help="predictor of the prophet policy (default: the one chosen by "
                   "simulated speed for the miss mode: value-copy copy-only, value with --on-miss auto/host); "
                   "the other policies run on demand")
    p.add_argument("--steps", type=positive, default=None, help="decode steps to replay or time (default: every "
                   "replayed token once)")
    p.add_argument("--warmup", type=non_negative, default=16, help="measured decode: untimed steps after the prefill")
    p.add_argument("--compare", action="store_true", help="add the baselines: on-demand LRU and all experts resident")
    add_out(p)
    p.add_argument("--on-miss", choices=("copy", "auto", "host"), default="copy",
                   help="where missed experts run; auto or host adds each policy's row beside its copy-only one")
    p.add_argument("--warm", choices=("decode", "prefill"), default=None,
                   help="fill the empty cache first with the fitted routing's most used experts, for every policy: "
                   "copies on decode's clock, or landed during the prompt's prefill (simulated; default: no warm start)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> dict[str, Any]:
    opts = bench.BenchOptions(
        model=args.model, ctx=args.ctx, batch=args.batch, gpu=args.gpu, weights=args.weights, device=args.device,
        simulate=args.simulate, layers=args.layers, slots=args.slots, kv_dtype=args.kv_dtype,
        expert_dtype=args.expert_dtype, trace=args.trace,
        fit=args.fit, in_sample=args.in_sample, repeat=args.repeat, policies=args.policy, predictor=args.predictor,
        steps=args.steps, warmup=args.warmup, compare=args.compare, progress=not args.no_progress,
        on_miss=args.on_miss, warm=args.warm,
    )
    return bench.run(opts)
