"""Command line for traces: ``python -m prophet.trace {info,stats,convert,fit,synth,plot} ...``.

``fit`` is also how the shipped generator parameters in ``prophet/trace/params`` are regenerated (see the
README there).
"""

from __future__ import annotations

import argparse
import json
import sys

from prophet.errors import ProphetError
from prophet.trace import stats, synth
from prophet.trace.readers import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prophet.trace", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="shape, model and metadata of a trace")
    p.add_argument("path")
    p = sub.add_parser("stats", help="headline statistics as JSON")
    p.add_argument("path")
    p = sub.add_parser("convert", help="read any supported format, write a Prophet trace directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("fit", help="fit synthetic-generator parameters to a trace")
    p.add_argument("src")
    p.add_argument("name")
    p.add_argument("-o", "--out", required=True, help="output .npz")
    p.add_argument("--source", default=None, help="describes the source in the parameter file")
    p = sub.add_parser("synth", help="generate a synthetic trace")
    p.add_argument("dst")
    p.add_argument("--shape", nargs=3, type=int, metavar=("LAYERS", "EXPERTS", "TOP_K"), required=True)
    p.add_argument(
        "--params", default=None, help=f"built-in parameter set ({', '.join(synth.BUILTIN)}) or .npz"
    )
    p.add_argument("--sequences", type=int, default=1)
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("plot", help="PNG figures of a trace's statistics (needs matplotlib)")
    p.add_argument("path")
    p.add_argument("out_dir")

    args = parser.parse_args(argv)
    try:
        if args.cmd == "info":
            t = load(args.path)
            print(t)
            print(json.dumps({"model": t.model.to_dict(), "meta": t.meta}, indent=1, default=str))
        elif args.cmd == "stats":
            print(json.dumps(stats.summary(load(args.path)), indent=1))
        elif args.cmd == "convert":
            print(load(args.src, num_experts=args.num_experts).save(args.dst, overwrite=args.overwrite))
        elif args.cmd == "fit":
            params = synth.fit(load(args.src), args.name, source=args.source)
            print(params.save(args.out))
        elif args.cmd == "synth":
            L, E, K = args.shape
            if args.params is None:
                params = synth.for_shape(L, E, K, seed=args.seed)
            else:
                base = (
                    synth.builtin(args.params)
                    if args.params in synth.BUILTIN
                    else synth.SynthParams.load(args.params)
                )
                params = base.adapt(L, E, K, seed=args.seed)
            trace = synth.generate(params, args.sequences, args.tokens, seed=args.seed)
            print(trace.save(args.dst, overwrite=args.overwrite))
        elif args.cmd == "plot":
            from prophet.trace.plots import plot_all

            for path in plot_all(load(args.path), args.out_dir):
                print(path)
    except ProphetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
