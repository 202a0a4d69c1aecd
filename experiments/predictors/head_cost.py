"""Cost of the learned hidden-state head's observe + predict per MoE layer at batch 1: fused against reference.

Why: issue 16 budgets <= 10 us per layer at batch 1 on this CPU for a predictor on the critical path. Both heads
get the same random parameters (the cost does not depend on training) in the shape the headline experiment
uses (`hidden_state_predictors.py`: 4 layers, 8 experts, top-2, 32-dim sketch, 128 hidden units, 2 layers
ahead), fed sketches and, through the recorder's projection, the full 128-dim router input. Each call is timed
alone in CPU time (``time.thread_time``, so another process on the core does not count); the median, 10th and
90th percentiles over the calls of several alternated rounds are reported, and the ratio of medians in the same run;
the cheapest predictor's cost through the same protocol is the floor every predictor pays.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prophet.predict import FrequencyPredictor
from prophet.predict.heads import HiddenStateHead, ReferenceHead
from prophet.provenance import git_sha
from prophet.trace import SketchInfo
from prophet.trace.sketch import sketch_projection

REPO = Path(__file__).resolve().parents[2]
L, E, K, SKETCH, HIDDEN, UNITS, AHEAD = 4, 8, 2, 32, 128, 128, 2
TARGET_US = 10.0


def randomized(head: HiddenStateHead, seed: int) -> HiddenStateHead:
    """``head`` with random standardization and maps (all a cost measurement needs)."""
    rng = np.random.default_rng(seed)
    head.mean = rng.normal(size=head.mean.shape).astype(np.float32)
    head.scale = rng.uniform(0.5, 2.0, size=head.scale.shape).astype(np.float32)
    head.layers = [[(rng.normal(size=w.shape).astype(np.float32) * 0.1, rng.normal(size=b.shape).astype(np.float32))
                    for w, b in _shapes(head)] for _ in range(L)]
    return head


def _shapes(head: HiddenStateHead) -> list[tuple[np.ndarray, np.ndarray]]:
    out = AHEAD * E
    if head.hidden_units is None:
        return [(np.empty((head.num_features, out)), np.empty(out))]
    return [(np.empty((head.num_features, head.hidden_units)), np.empty(head.hidden_units)),
            (np.empty((head.hidden_units, out)), np.empty(out))]


def per_call_us(head: HiddenStateHead | FrequencyPredictor, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """CPU microseconds of each observe + 2-layer predict, ``hidden [N, L, 1, W]``, ``experts [N, L, 1, K]``."""
    out = np.empty(hidden.shape[0] * L)
    head.reset()
    for t in range(hidden.shape[0]):
        for layer in range(L):
            start = time.thread_time()
            head.observe(layer, experts[t, layer], weights, hidden[t, layer])
            head.predict(horizon=2)
            out[t * L + layer] = time.thread_time() - start
    return out * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "head_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    proj = sketch_projection(HIDDEN, SketchInfo(dim=SKETCH, seed=0))
    cases = {"mlp_sketch": ({"hidden_units": UNITS}, None), "linear_sketch": ({}, None),
             "mlp_live_projection": ({"hidden_units": UNITS}, proj)}
    gen = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(args.tokens * L)]).view(args.tokens, L, 1, K)
    weights = torch.full((1, K), 0.5)
    results = {}
    for name, (shape, projection) in tqdm(cases.items(), desc="cases"):
        width = SKETCH if projection is None else HIDDEN
        hidden = torch.randn(args.tokens, L, 1, width, generator=gen)
        heads = {kind: randomized(cls(L, E, K, sketch_dim=SKETCH, max_distance=AHEAD, projection=projection, **shape), 1)
                 for kind, cls in (("fused", HiddenStateHead), ("reference", ReferenceHead))}
        worst = 0.0  # the two heads' scores on the same inputs
        for t in range(50):
            for layer in range(L):
                for head in heads.values():
                    head.observe(layer, experts[t, layer], weights, hidden[t, layer])
                worst = max(worst, float(np.abs(heads["fused"].scores([1, 2]) - heads["reference"].scores([1, 2])).max()))
        rounds: dict[str, list[np.ndarray]] = {kind: [] for kind in heads}
        for _ in range(args.rounds):  # alternated, so a busy spell on the shared machine hits both
            for kind, head in heads.items():
                rounds[kind].append(per_call_us(head, hidden, experts, weights))
        row = {"max_abs_score_diff": worst}
        for kind, runs in rounds.items():
            row[kind] = {"median_us_per_round": [round(float(np.median(r)), 2) for r in runs],
                         "p10_us": round(float(np.percentile(np.concatenate(runs), 10)), 2),
                         "p90_us": round(float(np.percentile(np.concatenate(runs), 90)), 2),
                         "median_us": round(float(np.median(np.concatenate(runs))), 2)}
        row["speedup_median"] = round(row["reference"]["median_us"] / row["fused"]["median_us"], 2)
        row["meets_target"] = row["fused"]["median_us"] <= TARGET_US
        results[name] = row
        print(f"{name:>20}: fused {row['fused']['median_us']:6.2f} us (p10 {row['fused']['p10_us']}, p90 "
              f"{row['fused']['p90_us']}), reference {row['reference']['median_us']:6.2f} us, "
              f"{row['speedup_median']}x, max |diff| {worst:.1e}")
    floor = np.concatenate([per_call_us(FrequencyPredictor(L, E, K), hidden, experts, weights) for _ in range(args.rounds)])
    results["floor_frequency_predictor"] = {"median_us": round(float(np.median(floor)), 2),
                                            "note": "the protocol's bookkeeping (observe, predict) with the cheapest "
                                                    "predictor: what any predictor pays before its own math"}
    print(f"floor (frequency predictor): {results['floor_frequency_predictor']['median_us']:6.2f} us")
    report = {"what": __doc__.splitlines()[0], "target_us_per_layer": TARGET_US,
              "shape": {"layers": L, "experts": E, "top_k": K, "sketch": SKETCH, "hidden": HIDDEN, "units": UNITS,
                        "ahead": AHEAD, "batch": 1},
              "timing": f"time.thread_time per call, {args.tokens} tokens x {L} layers x {args.rounds} rounds, one thread",
              "cases": results, "versions": {"git": git_sha(), "numpy": np.__version__, "torch": torch.__version__}}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
