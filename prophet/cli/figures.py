"""``prophet-bench figures``: every figure of the paper from the committed results, as PNG and PDF.

It runs the checkout's ``experiments/figures/make_all.py`` (figures read result JSON only; the sweeps in
``experiments/replay/sweeps.py`` write them), so it works from a clone of the repository, not from a wheel.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path
from typing import Any

from prophet.errors import ConfigError

HELP = "draw every figure from experiments/results/ into experiments/figures/out/"
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "figures" / "make_all.py"


def register(sub: Any) -> None:
    p = sub.add_parser("figures", help=HELP, description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(REPO / "experiments" / "results"), help="folder of result JSON files")
    p.add_argument("--out-dir", default=str(REPO / "experiments" / "figures" / "out"), help="where figures go")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> None:
    if not SCRIPT.is_file():
        raise ConfigError(f"no {SCRIPT.relative_to(REPO)} here: figures are drawn from a clone of the repository")
    try:
        import matplotlib  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise ConfigError("figures need matplotlib: pip install 'prophet-moe[figures]'") from None
    results = Path(args.results)
    if not results.is_dir():
        raise ConfigError(f"--results {results}: no such folder; give the folder of the result JSON files")
    runpy.run_path(str(SCRIPT))["main"](results, Path(args.out_dir))
