"""``prophet-bench``: one command line, one parser, one error path.

Subcommands, one module each: ``run`` (plan, then measure or simulate decode; the default, so
``prophet-bench --model mixtral --ctx 128k`` is ``prophet-bench run --model mixtral --ctx 128k``), ``plan``
(the memory plan only), ``replay`` (a trace through the simulator), ``figures`` (every figure) and ``trace``
(record, info, convert, ...). A subcommand that produces a record prints it as the last stdout line (and to
``--out``, whose place is checked before any work). Bad input of any subcommand is one line on stderr,
``prophet-bench: error: ...``, and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Any

from prophet.cli import figures, plan, replay, run, trace
from prophet.cli.common import Parser, check_out, emit
from prophet.errors import ProphetError

SUBCOMMANDS = {"run": run, "plan": plan, "replay": replay, "figures": figures, "trace": trace}


def parser() -> Parser:
    p = Parser(prog="prophet-bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module in SUBCOMMANDS.values():
        module.register(sub)
    return p


def _with_default(argv: list[str]) -> list[str]:
    """``run`` when the first argument names no subcommand (``prophet-bench --model mixtral``)."""
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["run", *argv]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prophet-bench`` console script: 0 on success, 2 on bad input (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(_with_default(argv))
        out = check_out(getattr(args, "out", None))
        record: dict[str, Any] | None = args.handler(args)
    except ProphetError as exc:
        print(f"prophet-bench: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, MemoryError) and not any(s in text for s in ("out of memory", "can't allocate memory")):
            raise
        print(f"prophet-bench: error: out of memory ({_one_line(text)[:200]}); lower --slots, --ctx, --batch "
              "or --layers", file=sys.stderr)
        return 2
    if record is not None:
        emit(record, out)
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())
