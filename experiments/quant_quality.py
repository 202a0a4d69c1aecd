"""Quality of quantized experts on the project's trained tiny MoE: logit error and perplexity change vs bf16.

Why: a format's bytes are only worth saving if the model still predicts the same text. This loads the
character-level Mixtral that ``experiments/train_tiny_moe.py`` trains (``build/tiny-moe/model``), runs
held-out Shakespeare (plays never trained on) through the unwrapped bf16 model and through copies wrapped
with ``prophet.wrap(model, expert_dtype=...)`` (experts quantized at wrap, everything else bf16), and reports
per format: bytes per expert (scales included) and their ratio to bf16, the relative L2 and max-abs error of
the logits against bf16, top-1 agreement, and the held-out perplexity and its change.

Usage: ``python experiments/quant_quality.py [--model build/tiny-moe/model]`` (train the model first).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm
from train_tiny_moe import corpus  # this script's folder: the held-out plays exactly as training split them
from transformers import AutoModelForCausalLM

import prophet
from prophet.formats import weight_format
from prophet.provenance import git_sha, versions
from prophet.wrap import runtime_of

REPO = Path(__file__).resolve().parent.parent
# label -> expert_dtype of prophet.wrap (None: the bf16 experts as they are)
FORMATS = {"bf16": None, "fp8": "fp8", "fp8-channel": "fp8-channel", "fp8-tensor": "fp8-tensor", "int8": "int8",
           "mxfp4": "mxfp4", "int4": "int4", "int4-g64": weight_format("int4", 64), "int4-g32": weight_format("int4", 32)}
SEQ, WINDOWS = 128, 64


def windows(text: bytes) -> torch.Tensor:
    """``[WINDOWS, SEQ + 1]`` evenly spaced held-out character windows (inputs plus the next character)."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = torch.linspace(0, len(data) - SEQ - 2, WINDOWS).long().tolist()
    return torch.stack([data[s : s + SEQ + 1] for s in starts])


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=b[:, :-1]).logits.float() for b in batch.split(16)])  # [W, SEQ, V]


def perplexity(logits: torch.Tensor, batch: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    return math.exp(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "build" / "tiny-moe" / "model")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "quant_quality.json")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} has no checkpoint: run python experiments/train_tiny_moe.py first")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    batch = windows(corpus()[1])
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, local_files_only=True).eval()
    ref = logits_of(base, batch)
    ref_ppl = perplexity(ref, batch)
    rows = []
    for name, expert_dtype in tqdm(FORMATS.items(), desc="formats"):
        model = prophet.wrap(copy.deepcopy(base), device="cpu", expert_dtype=expert_dtype)
        runtime = runtime_of(model)
        out = logits_of(model, batch)
        ppl = perplexity(out, batch)
        bf16_bytes = runtime.store.fmt.nbytes(torch.bfloat16)
        rows.append({
            "format": name,
            "expert_bytes": runtime.store.slab_bytes,
            "bits_per_param": 8 * runtime.store.slab_bytes / runtime.store.fmt.numel,
            "experts_per_bf16_slot_bytes": bf16_bytes / runtime.store.slab_bytes,
            "logit_rel_l2": ((out - ref).norm() / ref.norm()).item(),
            "logit_max_abs": (out - ref).abs().max().item(),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "perplexity": ppl,
            "perplexity_change": ppl / ref_ppl - 1,
        })
    record = {
        "what": "tiny trained MoE (experiments/train_tiny_moe.py, 4 layers x 8 experts, H=128, I=256), held-out "
                f"plays, {WINDOWS} windows x {SEQ} characters; each format wraps the bf16 model with "
                "prophet.wrap(expert_dtype=...) and is compared with the unwrapped bf16 model",
        "bf16_perplexity": ref_ppl,
        "formats": rows,
        "versions": versions(),
        "git_sha": git_sha(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"bf16 perplexity {ref_ppl:.4f}")
    print(f"{'format':<12}{'B/expert':>10}{'bits/p':>8}{'x bf16':>8}{'logit L2':>10}{'top-1':>8}{'ppl':>9}{'dppl':>9}")
    for r in rows:
        print(f"{r['format']:<12}{r['expert_bytes']:>10}{r['bits_per_param']:>8.3f}{r['experts_per_bf16_slot_bytes']:>8.2f}"
              f"{r['logit_rel_l2']:>10.4f}{r['top1_agreement']:>8.4f}{r['perplexity']:>9.4f}{r['perplexity_change']:>+9.2%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
