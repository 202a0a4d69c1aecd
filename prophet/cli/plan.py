"""``prophet-bench plan``: the GPU memory plan only (non-expert weights, KV, workspace, expert slots)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from prophet.bench import profile_name, resolve_model
from prophet.cli.common import add_out
from prophet.cli.run import add_arguments
from prophet.plan import plan
from prophet.provenance import git_sha, versions

HELP = "the memory plan of a model, context and batch on a GPU, and nothing else"


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help=HELP, description=__doc__)
    add_arguments(p)
    add_out(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> dict[str, Any]:
    spec = resolve_model(args.model)
    profile, device_bytes, detected = profile_name(args.gpu)
    memory = plan(spec, device_bytes or profile, args.ctx or spec.context_length, args.batch, kv_dtype=args.kv_dtype,
                  expert_dtype=args.expert_dtype)
    if detected:
        memory = dataclasses.replace(memory, gpu=detected)
    print(memory.table(), file=sys.stderr)
    return {"tool": "prophet-bench plan", "profile": profile, "detected": detected, "versions": versions(),
            "git_sha": git_sha(), "plan": memory.to_dict()}
