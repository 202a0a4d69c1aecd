"""The full soak: 10,000 decode steps of a tiny Mixtral through a small expert cache with a path-matching
predictor (online memory bounded by ``max_online``), host memory sampled after a 10% warm-up.

CI runs a short version (`tests/test_soak.py`); this is the long one. Writes
``experiments/results/soak_decode.json`` and fails (exit 1) if resident memory rose more than 2%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import prophet
from prophet.models.registry import get_spec
from prophet.predict import PathMatchPredictor
from prophet.provenance import git_sha, versions
from prophet.soak import soak

LIMIT = 0.02  # the most resident memory may rise over the baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--slots-per-layer", type=int, default=2)
    ap.add_argument("--max-online", type=int, default=512)
    ap.add_argument("--out", default="experiments/results/soak_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and a shared host loses from them
    model = get_spec("mixtral").tiny_model(seed=0)
    text = model.config
    predictor = PathMatchPredictor(text.num_hidden_layers, text.num_local_experts, text.num_experts_per_tok,
                                   max_online=args.max_online)
    prophet.wrap(model, device="cpu", slots_per_layer=args.slots_per_layer, predictor=predictor)
    start = time.perf_counter()
    result = soak(model, args.steps, seq_len=args.seq_len, predictor=predictor, progress=True)
    seconds = time.perf_counter() - start
    stats = prophet.stats(model).total
    record = {
        "what": __doc__.splitlines()[0],
        "model": "mixtral (tiny)", "device": "cpu", "slots_per_layer": args.slots_per_layer,
        "experts_per_layer": text.num_local_experts, "predictor": f"pathmatch, max_online={args.max_online}",
        "seconds": seconds, "limit": LIMIT, **result.to_dict(),
        "predictor_memory_tokens": predictor.size, "hits": stats.hits, "misses": stats.misses,
        "prefetches": stats.prefetches, "git_sha": git_sha(), "versions": versions(),
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("steps", "sequences", "baseline_bytes", "growth", "drift", "seconds")}))
    if result.growth > LIMIT:
        print(f"resident memory rose {result.growth:.2%} over the baseline (limit {LIMIT:.0%})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
