"""CPU time of every registry model's default ``prophet-bench`` simulation, against a 60 s target (issue 14, item 7).

Each case runs ``python -m prophet.cli run <args> --no-progress --out <json>`` in a child process, one at a time,
and is timed in the child's CPU time (user + sys, `resource.getrusage(RUSAGE_CHILDREN)`), so other processes
on a shared machine do not count. Cases: every registry model with its defaults (its trained context, the H100
profile) and the issue's two large cases (Qwen3-30B on the RTX 4090 profile at 8K context, DeepSeek-V3 on the
H200 profile).

``--baseline DIR`` runs each case first with the source tree in DIR (e.g. ``git worktree add DIR <commit>``)
and then with this checkout, interleaved case by case: the speed-up is a ratio within one run, and the two JSON
records must agree on every result (tokens/s, hit rates, counts; wall-clock fields and versions aside).
Exits 1 when a case of this checkout exceeds ``--target`` CPU seconds or differs from its baseline.

Usage: ``python experiments/bench_sim_speed.py [--only qwen3-moe,mixtral] [--baseline DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prophet.models.registry import list_specs  # noqa: E402
from prophet.provenance import git_sha, versions  # noqa: E402

TARGET_S = 60.0
ISSUE_CASES = {"qwen3-moe-4090-8k": ["--model", "qwen3-moe", "--gpu", "rtx-4090", "--ctx", "8k"],
               "deepseek-v3-h200": ["--model", "deepseek-v3", "--gpu", "h200"]}
RUN_SPECIFIC = {"wall_s", "git_sha", "versions", "progress"}  # fields that differ between identical simulations


def cases() -> dict[str, list[str]]:
    """Case name -> ``prophet-bench run`` arguments: the issue's cases, then every registry model's defaults."""
    out = dict(ISSUE_CASES)
    for spec in list_specs():
        alias = spec.aliases[0] if spec.aliases else spec.name
        out[alias] = ["--model", alias]
    return out


def run_case(args: list[str], src: Path, out: Path) -> float:
    """CPU seconds (user + sys) of one ``prophet-bench run`` with the package from ``src``; its JSON to ``out``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "prophet.cli", "run", *args, "--no-progress", "--out", str(out)],
                          env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"prophet-bench {' '.join(args)} failed ({src}):\n{proc.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def results_of(record: dict[str, Any]) -> Any:
    """A record without its run-specific fields: what must be identical between two equal simulations."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in RUN_SPECIFIC}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip({k: record[k] for k in ("config", "plan", "trace", "results", "bounds")})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma list of case names (default: all)")
    p.add_argument("--baseline", type=Path, default=None, help="source tree to compare with, case by case")
    p.add_argument("--target", type=float, default=TARGET_S, help="CPU seconds a case may take")
    p.add_argument("--out", type=Path, default=REPO / "experiments/results/sim_speed_bench.json")
    args = p.parse_args()
    todo = cases()
    if args.only:
        todo = {name: todo[name] for name in args.only.split(",")}
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cli in todo.items():
            row: dict[str, Any] = {"case": name, "args": " ".join(cli)}
            if args.baseline is not None:
                row["baseline_cpu_s"] = run_case(cli, args.baseline, Path(tmp, "base.json"))
            row["cpu_s"] = run_case(cli, REPO, Path(tmp, "new.json"))
            new = json.loads(Path(tmp, "new.json").read_text())
            if args.baseline is not None:
                row["speedup"] = row["baseline_cpu_s"] / row["cpu_s"]
                row["identical"] = results_of(json.loads(Path(tmp, "base.json").read_text())) == results_of(new)
            row["tokens_per_s"] = {r["policy"]: r.get("tokens_per_s") for r in new["results"]}
            row["meets_target"] = row["cpu_s"] <= args.target
            if not row["meets_target"] or row.get("identical") is False:
                failed.append(name)
            print(json.dumps(row), flush=True)
            rows.append(row)
    record = {"benchmark": "bench_sim_speed", "target_cpu_s": args.target, "git_sha": git_sha(),
              "baseline": None if args.baseline is None else str(args.baseline), "versions": versions(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "how": __doc__.split("\n\n")[1],
              "results": rows, "failed": failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(rows) - len(failed)} of {len(rows)} cases within {args.target:.0f} CPU s"
          + (" and identical to the baseline" if args.baseline is not None else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
