"""Issue 16: hidden-state predictors on the trained tiny MoE, measured out of sample by dataset.

The tiny character-level Mixtral of ``experiments/train_tiny_moe.py`` (checkpoint in ``build/tiny-moe/model``)
reads windows of two disjoint texts: the plays it was trained on (the *fit* set) and the held-out plays it never
saw (the *test* set). Its routing is recorded with ``prophet.trace.record`` and a hidden-state sketch of each
dimension measured. Every predictor is scored on the held-out windows by recall@top_k at 1 and 2 layers ahead
(same token) and at the steps that wrap into the next token (`next_token_recall`: the next token's layer 0
from this token's last layer, d=1; its layer 1 from the last layer and its layer 0 from the one before, d=2),
with its CPU cost per layer (`cost_us`, on the trace's sketches), in three settings: *unfitted* (no traces),
*fitted* (fit on the training plays' windows: split by dataset, hence by sequence too) and *in sample* (fit on
the held-out windows themselves; an upper reference, not a result). Router look-ahead is training-free; it reads the full-width sketch (exact: the projection is
square) and a narrower one (lifted back by the pseudo-inverse). The learned head is measured against sketch
dimension, and run at every layer, every second layer and once per token (``every``, at the token's last
layer: the next-token look-ahead). Each replay starts from a copy of the fitted predictor (online predictors
learn while they replay; no replay sees another's memory). Writes
``experiments/results/hidden_state_predictors.json``.

Usage (from the repository root, after ``train_tiny_moe.py`` or with its checkpoint copied into ``build/``):
``python -m experiments.predictors.hidden_state_predictors [--model build/tiny-moe/model]``
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm
from transformers import MixtralForCausalLM

import prophet.trace
from experiments.train_tiny_moe import SEQ, corpus
from prophet.models import moe_layers
from prophet.predict import (
    CoOccurrencePredictor,
    FrequencyPredictor,
    HiddenStateHead,
    PathMatchPredictor,
    RouterLookahead,
    RouterTrace,
    as_router_trace,
    sketch_routers,
)
from prophet.predict.evaluate import recall_report
from prophet.provenance import git_sha
from prophet.trace import SketchInfo

REPO = Path(__file__).resolve().parents[2]
SEED = 0
FIT_WINDOWS, TEST_WINDOWS = 64, 32  # windows of SEQ characters from the training plays / the held-out plays
SKETCH_DIMS = (8, 16, 32, 64, 128)  # 128 = the hidden size: the sketch is then invertible
NARROW = 32  # the sketch width the headline table uses
DISTANCES = (1, 2)
UNITS = 128  # the learned head's hidden layer (the linear head is measured too)
TARGETS = {1: 0.85, 2: 0.75}  # issue 16: next layer, two layers ahead, held-out text
COST_TOKENS = 256  # test tokens replayed, timed, for the cost per layer


def windows(text: bytes, count: int) -> torch.Tensor:
    """``[count, SEQ]`` evenly spaced character windows of ``text``."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = torch.linspace(0, len(data) - SEQ - 1, count).long().tolist()
    return torch.stack([data[s : s + SEQ] for s in starts])


def record(model: MixtralForCausalLM, ids: torch.Tensor, dim: int, tmp: Path) -> RouterTrace:
    """Teacher-forced prefill of ``ids`` recorded with a ``dim``-wide sketch; the sketch becomes ``hidden``."""
    path = tmp / f"trace-{dim}-{len(ids)}"
    with torch.no_grad(), prophet.trace.record(model, path, hidden_sketch=dim, sketch_seed=SEED, overwrite=True):
        for batch in ids.split(16):
            model(input_ids=batch)
    trace = prophet.trace.load(path)
    return as_router_trace(trace, hidden=np.asarray(trace.sketch, np.float32))


def score(predictor, test: RouterTrace) -> dict:
    """Recall@top_k at 1, 2 layers ahead (same token) and at the steps into the next token, each from a copy."""
    rep = recall_report(copy.deepcopy(predictor), test, distances=list(DISTANCES))["distances"]
    k = test.top_k
    return {**{str(d): round(rep[str(d)][f"recall@{k}"], 4) for d in DISTANCES},
            **next_token_recall(copy.deepcopy(predictor), test)}


def next_token_recall(predictor, test: RouterTrace) -> dict[str, float]:
    """Recall@top_k of the next token's first layers from this token's last ones, batch 1, token by token:
    ``next0_d1`` (its layer 0 from layer L-1), ``next1_d2`` (its layer 1 from L-1), ``next0_d2`` (its layer 0
    from L-2). `recall_report` counts same-token targets only below d = L; this counts the wrapped ones."""
    L, K = test.num_layers, test.top_k
    hot = test.multi_hot()  # [N, L, E]
    cases = {"next0_d1": (L - 1, 1), "next1_d2": (L - 1, 2), "next0_d2": (L - 2, 2)}
    found = dict.fromkeys(cases, 0.0)
    total = dict.fromkeys(cases, 0.0)
    ok = {d: np.zeros((test.num_tokens, L), bool) for d in DISTANCES}  # aligned, exact (source, target) steps
    for d in DISTANCES:
        src_row, src_layer, dst_row, _ = test.pairs(d)
        ok[d][src_row, src_layer] = dst_row == src_row + 1
    for s in range(test.num_sequences):
        predictor.reset()
        for t in range(test.seq_offsets[s], test.seq_offsets[s + 1]):
            for layer in range(L):
                h = None if test.hidden is None else test.hidden[t, layer][None]
                predictor.observe(layer, test.experts[t, layer][None], test.weights[t, layer][None], h)
                for name, (src, d) in cases.items():
                    if layer == src and ok[d][t, layer]:
                        top = np.argsort(-predictor.scores([d])[0], kind="stable")[:K]
                        truth = hot[t + 1, (layer + d) % L]
                        found[name] += truth[top].sum()
                        total[name] += truth.sum()
    return {name: round(float(found[name] / total[name]), 4) for name in cases}


def cost_us(predictor, test: RouterTrace, tokens: int = COST_TOKENS) -> float:
    """Median over ``tokens`` test tokens of a token's CPU time (``time.thread_time``) for observe + predict()
    at each layer, batch 1, divided by its layers: the amortized cost per layer (a measurement on a shared
    machine, not a benchmark; `head_cost.py` is the head's benchmark)."""
    predictor = copy.deepcopy(predictor)
    predictor.reset()
    L = test.num_layers
    per_token = np.empty(tokens)
    for t in range(tokens):
        start = time.thread_time()
        for layer in range(L):
            h = None if test.hidden is None else test.hidden[t, layer][None]
            predictor.observe(layer, test.experts[t, layer][None], test.weights[t, layer][None], h)
            predictor.predict()
        per_token[t] = time.thread_time() - start
    return round(float(np.median(per_token)) / L * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "build" / "tiny-moe" / "model")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "hidden_state_predictors.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matrices: threads only contend on a busy machine
    if not (args.model / "model.safetensors").exists():
        raise SystemExit(f"{args.model}: no checkpoint; run experiments/train_tiny_moe.py first")
    model = MixtralForCausalLM.from_pretrained(args.model).eval()
    cfg = model.config
    L, E, K, H = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size
    train_text, held_text = corpus()
    fit_ids, test_ids = windows(train_text, FIT_WINDOWS), windows(held_text, TEST_WINDOWS)
    with torch.no_grad():
        loss = {name: float(model(input_ids=ids[:16], labels=ids[:16]).loss)
                for name, ids in (("fit", fit_ids), ("test", test_ids))}
    routers = [layer.router for layer in moe_layers(model)]
    start = time.perf_counter()
    traces: dict[int, tuple[RouterTrace, RouterTrace]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in tqdm(SKETCH_DIMS, desc="record"):
            traces[dim] = (record(model, fit_ids, dim, Path(tmp)), record(model, test_ids, dim, Path(tmp)))

    fit, test = traces[H]
    rows: dict[str, dict[str, dict]] = {}

    def measure(name: str, make, settings=("unfitted", "fitted", "in_sample"), pair=(fit, test)) -> None:
        """Recall of ``make()`` in each setting; the cost per layer of the first setting's predictor."""
        f, t = pair
        out = {}
        for setting in tqdm(settings, desc=name, leave=False):
            p = make()
            if setting == "fitted":
                p.fit([f])
            elif setting == "in_sample":
                p.fit([t])
            out[setting] = score(p, t)
            if "cost_us_per_layer" not in out:
                out["cost_us_per_layer"] = cost_us(p, t)
        rows[name] = out

    narrow = traces[NARROW]
    measure("pathmatch", lambda: PathMatchPredictor(L, E, K))
    measure("frequency", lambda: FrequencyPredictor(L, E, K), settings=("fitted", "in_sample"))
    measure("cooccurrence", lambda: CoOccurrencePredictor(L, E, K), settings=("fitted", "in_sample"))
    measure("router_lookahead", lambda: RouterLookahead(sketch_routers(routers, H, SketchInfo(H, SEED)), E, K),
            settings=("unfitted",))
    measure(f"router_lookahead_sketch{NARROW}",
            lambda: RouterLookahead(sketch_routers(routers, H, SketchInfo(NARROW, SEED)), E, K),
            settings=("unfitted",), pair=narrow)
    measure(f"linear_head_sketch{NARROW}", lambda: HiddenStateHead(L, E, K, sketch_dim=NARROW),
            settings=("fitted", "in_sample"), pair=narrow)
    measure(f"head_sketch{NARROW}", lambda: HiddenStateHead(L, E, K, sketch_dim=NARROW, hidden_units=UNITS),
            settings=("fitted", "in_sample"), pair=narrow)
    measure(f"head_sketch{NARROW}_no_history",
            lambda: HiddenStateHead(L, E, K, sketch_dim=NARROW, hidden_units=UNITS, history=False),
            settings=("fitted",), pair=narrow)
    for every in (2, L):  # the head run every 2nd layer / once per token, serving the layers between
        measure(f"head_sketch{NARROW}_every{every}",
                lambda every=every: HiddenStateHead(L, E, K, sketch_dim=NARROW, hidden_units=UNITS, every=every,
                                                    max_distance=every + 1),
                settings=("fitted", "in_sample"), pair=narrow)
    by_dim = {}
    for dim in tqdm(SKETCH_DIMS, desc="head vs sketch dim"):
        f, t = traces[dim]
        by_dim[str(dim)] = score(HiddenStateHead(L, E, K, sketch_dim=dim, hidden_units=UNITS).fit([f]), t)

    results = {
        "what": ("recall@top_k of the experts 1 and 2 MoE layers ahead (same token, keys '1', '2') and of the next "
                 "token's first layers (next0_d1: its layer 0 from this token's last layer; next1_d2: its layer 1 "
                 "from the last layer; next0_d2: its layer 0 from the layer before), and the CPU cost per layer of "
                 "observe + predict() at batch 1, tiny trained MoE, held-out plays"),
        "split": (f"by dataset: fit on {FIT_WINDOWS} windows of {SEQ} characters of the training plays, test on "
                  f"{TEST_WINDOWS} windows of the {3} held-out plays (never trained on); in_sample = fit on the test "
                  "windows (reference only); unfitted = no traces"),
        "model": {"path": str(args.model.relative_to(REPO)) if args.model.is_relative_to(REPO) else str(args.model),
                  "sha256": hashlib.sha256((args.model / "model.safetensors").read_bytes()).hexdigest()[:16],
                  "layers": L, "experts": E, "top_k": K, "hidden": H,
                  "params": sum(p.numel() for p in model.parameters()), "loss_fit_test": loss},
        "tokens": {"fit": fit.num_tokens, "test": test.num_tokens},
        "sketch": {"seed": SEED, "dims": list(SKETCH_DIMS), "headline_dim": NARROW,
                   "note": f"the recorder's sketch of the router input (fp16); {H} dims = the hidden size, exact"},
        "targets_held_out": {str(d): v for d, v in TARGETS.items()},
        "recall": rows,
        "head": {"hidden_units": UNITS, "features": "standardized sketch + multi-hot of this layer's experts",
                 "outputs": "experts at 1..max_distance layer steps ahead (2, or every + 1), into the next token",
                 "every": "the head runs at every `every`-th layer and the token's last; every=L: once per token"},
        "cost": (f"cost_us_per_layer: median over {COST_TOKENS} held-out tokens of the token's thread CPU time "
                 "for observe + predict() at each layer, / L, one thread, on a shared 2-core machine; the "
                 "first setting's predictor"),
        "head_recall_vs_sketch_dim": by_dim,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": {"prophet": git_sha(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"loss fit/test {loss['fit']:.3f}/{loss['test']:.3f}; recall@{K} on held-out text "
          "(d=1 / d=2 / next token's layer 0 from the last layer), cost us per layer")
    for name, settings in rows.items():
        print(f"{name:<32}" + "  ".join(f"{s}: {v['1']:.3f}/{v['2']:.3f}/{v['next0_d1']:.3f}"
                                        for s, v in settings.items() if isinstance(v, dict))
              + f"  {settings['cost_us_per_layer']} us")
    print("head vs sketch dim: " + "  ".join(f"{d}: {v['1']:.3f}/{v['2']:.3f}/{v['next0_d1']:.3f}"
                                             for d, v in by_dim.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
