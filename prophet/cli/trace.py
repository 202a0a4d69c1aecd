"""``prophet-bench trace``: record, inspect, convert, summarise, fit, synthesise and plot router traces.

``record`` runs a checkpoint (or a registry model's ``-tiny`` twin) on seeded random prompts under
`prophet.trace.record`. ``convert`` reads any supported format (Prophet, the neutral ``.npz``, vLLM-style
JSONL, vLLM ``routed_experts`` responses, SGLang's routed-experts payload, MoE-Infinity's saved activation
matrices) and writes a Prophet trace directory; ``--model`` supplies what a format does not store (layers,
experts, top-k). ``fit`` regenerates the shipped generator parameters in ``prophet/trace/params``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prophet.cli.common import positive
from prophet.trace import stats, synth
from prophet.trace.readers import FORMATS, load

HELP = "record, info, convert, stats, fit, synth and plot router traces"


def register(sub: Any) -> None:
    p = sub.add_parser("trace", help=HELP, description=__doc__.split("\n\n")[0])
    cmds = p.add_subparsers(dest="trace_cmd", required=True, parser_class=type(p))
    q = cmds.add_parser("record", help="record a model's routing on seeded random prompts")
    q.add_argument("dst", help="trace directory to write")
    q.add_argument("--model", required=True, help="checkpoint dir, or <alias>-tiny for a registry model's toy twin")
    q.add_argument("--prompts", type=positive, default=4)
    q.add_argument("--prompt-tokens", type=positive, default=16)
    q.add_argument("--new-tokens", type=positive, default=32)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q = cmds.add_parser("info", help="shape, model and metadata of a trace")
    _source(q, "path")
    q = cmds.add_parser("stats", help="headline statistics as JSON")
    _source(q, "path")
    q = cmds.add_parser("convert", help="read any supported format, write a Prophet trace directory")
    _source(q, "src")
    q.add_argument("dst")
    q.add_argument("--overwrite", action="store_true")
    q = cmds.add_parser("fit", help="fit synthetic-generator parameters to a trace")
    _source(q, "src")
    q.add_argument("name")
    q.add_argument("-o", "--out", dest="params_out", required=True, help="output .npz")
    q.add_argument("--source", default=None, help="describes the source in the parameter file")
    q = cmds.add_parser("synth", help="generate a synthetic trace")
    q.add_argument("dst")
    q.add_argument("--shape", nargs=3, type=positive, metavar=("LAYERS", "EXPERTS", "TOP_K"), required=True)
    q.add_argument("--params", default=None, help=f"built-in parameter set ({', '.join(synth.BUILTIN)}) or .npz")
    q.add_argument("--sequences", type=positive, default=1)
    q.add_argument("--tokens", type=positive, default=256, help="tokens per sequence")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q = cmds.add_parser("plot", help="PNG figures of a trace's statistics (needs matplotlib)")
    _source(q, "path")
    q.add_argument("out_dir")
    p.set_defaults(handler=main)


def _source(q: argparse.ArgumentParser, name: str) -> None:
    q.add_argument(name)
    q.add_argument("--format", dest="fmt", choices=FORMATS, default="auto", help="the file's format (default: by its name)")
    q.add_argument("--model", default=None, help="registry alias giving the layers, experts and top-k a format "
                   "does not store (vLLM, SGLang, MoE-Infinity, JSONL)")
    q.add_argument("--num-experts", type=positive, default=None, help="expert count, where --model is not given")


def _load(args: argparse.Namespace, path: str) -> Any:
    from prophet.bench import resolve_model
    from prophet.trace.format import TraceModel

    model = None
    if args.model is not None:
        spec = resolve_model(args.model)
        model = TraceModel(name=spec.name, model_type=spec.model_type, num_layers=spec.num_moe_layers,
                           num_experts=spec.num_experts, top_k=spec.top_k)
    return load(path, model=model, num_experts=args.num_experts, fmt=args.fmt)


def main(args: argparse.Namespace) -> None:
    cmd = args.trace_cmd
    if cmd == "record":
        _record(args)
    elif cmd == "info":
        t = _load(args, args.path)
        print(t)
        print(json.dumps({"model": t.model.to_dict(), "meta": t.meta}, indent=1, default=str))
    elif cmd == "stats":
        print(json.dumps(stats.summary(_load(args, args.path)), indent=1))
    elif cmd == "convert":
        print(_load(args, args.src).save(args.dst, overwrite=args.overwrite))
    elif cmd == "fit":
        print(synth.fit(_load(args, args.src), args.name, source=args.source).save(args.params_out))
    elif cmd == "synth":
        L, E, K = args.shape
        if args.params is None:
            params = synth.for_shape(L, E, K, seed=args.seed)
        else:
            base = synth.builtin(args.params) if args.params in synth.BUILTIN else synth.SynthParams.load(args.params)
            params = base.adapt(L, E, K, seed=args.seed)
        print(synth.generate(params, args.sequences, args.tokens, seed=args.seed).save(args.dst, overwrite=args.overwrite))
    elif cmd == "plot":
        from prophet.trace.plots import plot_all

        for path in plot_all(_load(args, args.path), args.out_dir):
            print(path)


def _record(args: argparse.Namespace) -> None:
    from pathlib import Path

    from prophet.bench import TINY_SUFFIX, resolve_model
    from prophet.trace.generate import record_random_prompts

    if Path(args.model).is_dir():
        from transformers import AutoModelForCausalLM

        from prophet.errors import UnsupportedModelError

        try:
            model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        except (OSError, ValueError) as exc:
            raise UnsupportedModelError(f"--model {args.model}: transformers cannot load it ({exc})") from None
    elif args.model.lower().endswith(TINY_SUFFIX):
        model = resolve_model(args.model).tiny_model(seed=args.seed).eval()
    else:
        from prophet.errors import ConfigError

        raise ConfigError(f"--model {args.model}: record needs a checkpoint dir or a toy twin such as mixtral-tiny "
                          "(a full registry model's weights are not here)")
    trace = record_random_prompts(model, args.dst, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                                  new_tokens=args.new_tokens, seed=args.seed, overwrite=args.overwrite)
    print(f"{trace} -> {args.dst}", file=sys.stderr)
