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
# One slot per layer makes every step that needs more distinct experts than that run in waves (the hardest
# case for rounding: partial sums meet in the model's dtype); all slots runs each layer in one pass.
CACHES = {"1 slot per layer": {"slots_per_layer": 1}, "all slots": {}}


def mixtral_shaped(layers: int, experts: int) -> torch.nn.Module:
    """Decoder layers at Mixtral-8x7B's widths (fewer experts: rounding depends on widths, not on E)."""
    from transformers import AutoModelForCausalLM

    cfg = get_spec("mixtral").hf_config()
    cfg.num_hidden_layers, cfg.num_local_experts, cfg.vocab_size = layers, experts, 4096
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
    ap.add_argument("--mixtral", default="1x4,2x2", help="Mixtral-shaped models as LAYERSxEXPERTS, comma-separated "
                    "('' skips); each needs about 1.5 GB of host memory per layer and expert pair")
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
                for cache, options in CACHES.items():
                    if seed and cache != "1 slot per layer":
                        continue  # the resident comparison once per family
                    report = precision_report(model, dtype, inputs_for(model, 4, 32, seed), device="cpu", **options)
                    rows.append({"model": f"{name} (tiny)", "seed": seed, "cache": cache, **report.to_dict()})
    for shape in filter(None, args.mixtral.split(",")):
        layers, experts = map(int, shape.split("x"))
        model = mixtral_shaped(layers, experts)
        for dtype in DTYPES:
            report = precision_report(model, dtype, inputs_for(model, 1, 8, 0), device="cpu", slots_per_layer=2)
            rows.append({"model": f"mixtral-8x7b widths, {layers} layer(s), {experts} experts", "seed": 0,
                         "cache": "2 slots per layer", **report.to_dict()})
        del model
    summary = {}
    for dtype, cache in [(d, c) for d in ("bfloat16", "float16") for c in ("small cache", "all resident")]:
        sel = [r for r in rows if r["dtype"] == dtype and (r["cache"] == "all slots") == (cache == "all resident")]
        logits = sorted(r["wrapped_rms"] / r["unwrapped_rms"] for r in sel)
        experts = sorted(r["experts_wrapped_rms"] / r["experts_unwrapped_rms"] for r in sel)
        summary[f"{dtype}, {cache}"] = {
            "cases": len(sel),
            "experts_rms_ratio": {"min": experts[0], "median": experts[len(sel) // 2], "max": experts[-1]},
            "experts_wrapped_no_worse": sum(v <= 1.0 for v in experts),
            "logits_rms_ratio": {"min": logits[0], "median": logits[len(sel) // 2], "max": logits[-1]},
            "logits_rms_mean": {"unwrapped": sum(r["unwrapped_rms"] for r in sel) / len(sel),
                                "wrapped": sum(r["wrapped_rms"] for r in sel) / len(sel)},
        }
    record = {"what": __doc__.splitlines()[0], "git_sha": git_sha(), "versions": versions(), "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
