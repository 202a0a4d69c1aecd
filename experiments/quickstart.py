"""Quick start: wrap a small random-weight MoE model, generate with a tiny expert cache, show what moved.

Runs anywhere (CPU or GPU): builds the tiny model of a registered family (no download), generates greedily
with and without Prophet, checks the tokens are identical, and prints the cache statistics.

    python experiments/quickstart.py --model mixtral --slots-per-layer 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import prophet
from prophet.models.registry import get_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral", help="registry name or alias, e.g. mixtral, olmoe, gpt-oss-20b")
    ap.add_argument("--slots-per-layer", type=int, default=2)
    ap.add_argument("--policy", default="lru", choices=["lru", "lfu", "fifo"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    spec = get_spec(args.model)
    model = spec.tiny_model(seed=0).eval()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, 8))
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    ref = model.generate(ids, **gen)
    plain_s = time.perf_counter() - start

    prophet.wrap(model, device=args.device, slots_per_layer=args.slots_per_layer, policy=args.policy)
    device = next(model.parameters()).device
    start = time.perf_counter()
    out = model.generate(ids.to(device), **gen).cpu()
    wrapped_s = time.perf_counter() - start
    stats = prophet.stats(model)
    print(f"{spec.name} (tiny, random weights): {stats.total_experts} experts in {len(stats.layers)} MoE layers, "
          f"{args.slots_per_layer} slot(s) per layer, policy {args.policy}, device {device}")
    print(stats.table())
    same = torch.equal(out, ref)
    print(f"tokens identical to the unwrapped model: {same}; {plain_s:.2f} s unwrapped, {wrapped_s:.2f} s wrapped")
    print(json.dumps({"model": spec.name, "identical": same, "hit_rate": round(stats.hit_rate, 4),
                      "slots": stats.slots, "total_experts": stats.total_experts, "prophet": prophet.__version__}))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
