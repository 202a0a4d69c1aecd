"""How far a wrapped model in bf16 (and fp16) is from the fp32 model, beside the unwrapped model in the same
dtype: every family's tiny model, and one Mixtral-8x7B-shaped layer (hidden 4096, intermediate 14336, random
N(0, 0.02) weights as in ``experiments/gpu/decode_check.py``), on the CPU.

Writes ``experiments/results/bf16_error.json``; `prophet.accuracy` defines the measures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from prophet.accuracy import precision_report
from prophet.models.registry import get_spec, list_specs
from prophet.provenance import git_sha, versions

DTYPES = (torch.bfloat16, torch.float16)


def mixtral_layer(experts: int) -> torch.nn.Module:
    """One decoder layer at Mixtral-8x7B's widths (fewer experts: rounding depends on widths, not on E)."""
    from transformers import AutoModelForCausalLM

    cfg = get_spec("mixtral").hf_config()
    cfg.num_hidden_layers, cfg.num_local_experts, cfg.vocab_size = 1, experts, 4096
    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02)
    return model


def inputs_for(model: torch.nn.Module, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3, help="input draws per tiny model")
    ap.add_argument("--mixtral-experts", type=int, default=4, help="experts of the Mixtral-shaped layer (0 skips)")
    ap.add_argument("--out", default="experiments/results/bf16_error.json")
    args = ap.parse_args()
    families = {}
    for spec in list_specs():
        families.setdefault(spec.model_type, spec)
    rows = []
    for name, spec in tqdm(sorted(families.items()), desc="families"):
        model = spec.tiny_model(seed=0)
        for seed in range(args.seeds):
            for dtype in DTYPES:
                report = precision_report(model, dtype, inputs_for(model, 4, 32, seed), device="cpu", slots_per_layer=1)
                rows.append({"model": f"{name} (tiny)", "seed": seed, **report.to_dict()})
    if args.mixtral_experts:
        model = mixtral_layer(args.mixtral_experts)
        for dtype in DTYPES:
            report = precision_report(model, dtype, inputs_for(model, 1, 8, 0), device="cpu", slots_per_layer=2)
            rows.append({"model": f"mixtral-8x7b widths, 1 layer, {args.mixtral_experts} experts", "seed": 0,
                         **report.to_dict()})
    worst = {}
    for dtype in ("bfloat16", "float16"):
        sel = [r for r in rows if r["dtype"] == dtype]
        worst[dtype] = {
            "logits_rms_ratio_max": max(r["wrapped_rms"] / r["unwrapped_rms"] for r in sel),
            "experts_rms_ratio_max": max(r["experts_wrapped_rms"] / r["experts_unwrapped_rms"] for r in sel),
            "experts_rms_ratio_median": sorted(r["experts_wrapped_rms"] / r["experts_unwrapped_rms"] for r in sel)[len(sel) // 2],
            "between_max_range": [min(r["between_max"] for r in sel), max(r["between_max"] for r in sel)],
            "unwrapped_max_range": [min(r["unwrapped_max"] for r in sel), max(r["unwrapped_max"] for r in sel)],
        }
    record = {"what": __doc__.splitlines()[0], "git_sha": git_sha(), "versions": versions(), "summary": worst, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({"summary": worst}))


if __name__ == "__main__":
    main()
