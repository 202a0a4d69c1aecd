"""Regenerate ``traces/tiny-mixtral``: the router trace Prophet records itself, used by the tests.

A 4-layer, 8-expert, top-2 Mixtral with random weights (a private seeded generator, N(0, 0.05) like the
model registry's tiny models) generates 40 tokens greedily from each of six seeded random prompts, in two
left-padded batches of three, with an 8-dim hidden-state sketch. Everything is seeded and greedy, so a rerun
with the torch and transformers versions and the CPU kind stored in the trace's ``meta`` writes the same
arrays. Usage: ``python experiments/record_tiny_trace.py [--out traces/tiny-mixtral]``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM

import prophet.trace

REPO = Path(__file__).resolve().parents[1]
SEED = 0
PROMPT_LENGTHS = ((5, 12, 20), (8, 16, 24))  # two batches of three rows, left-padded to the longest
NEW_TOKENS = 40
SKETCH = 8
# bit-exact reruns need the same library versions and CPU kind: a near tie in a router can flip otherwise
ENVIRONMENT = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "machine": platform.machine(),
}


def tiny_mixtral(seed: int = SEED) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        name_or_path="prophet/tiny-mixtral",
    )
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(noise + 1 if "norm" in name else noise)
    return model


def record(out: Path) -> prophet.trace.Trace:
    model = tiny_mixtral()
    gen = torch.Generator().manual_seed(SEED + 1)
    with (
        torch.no_grad(),
        prophet.trace.record(
            model,
            out,
            hidden_sketch=SKETCH,
            overwrite=True,
            meta={"script": "experiments/record_tiny_trace.py", **ENVIRONMENT},
        ),
    ):
        for lengths in PROMPT_LENGTHS:
            width = max(lengths)
            ids = torch.zeros(len(lengths), width, dtype=torch.long)
            mask = torch.zeros(len(lengths), width, dtype=torch.long)
            for row, n in enumerate(lengths):
                ids[row, width - n :] = torch.randint(3, 128, (n,), generator=gen)
                mask[row, width - n :] = 1
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # the random model often says EOS at once; keep every row decoding
                do_sample=False,
                pad_token_id=0,
            )
    return prophet.trace.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "traces" / "tiny-mixtral")
    args = parser.parse_args()
    trace = record(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{trace} -> {args.out} ({size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
