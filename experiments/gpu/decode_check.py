"""End-to-end decode on the GPU: a Mixtral-8x7B-shaped model (a few layers, random bf16 weights) wrapped by
Prophet at several cache sizes, against the same model fully resident, in one run.

Reports tokens/s, hit rate, host->device GB/s, stall and peak VRAM for each setting, and checks that greedy
tokens are identical to the resident model's. Random weights route near-uniformly, so hit rates here are a
floor for real routing; the all-slots setting shows the runtime's own per-step overhead.
Writes ``decode_check_<gpu>.json`` to ``--out`` and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import prophet
from prophet.models.registry import get_spec


def build(layers: int, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = get_spec("mixtral").hf_config()
    cfg.num_hidden_layers = layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    return model.eval()


def decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, **gen)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slots", default="8,4,2", help="slots per layer to try (8 = every expert resident)")
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    model = build(args.layers, dev)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, 8), device=dev)
    with torch.no_grad():
        ref_logits = model(ids).logits.float()
    rows: list[dict] = []
    ref = None
    for impl in ("grouped_mm", "batched_mm", "eager"):  # transformers' own experts backends, all resident
        try:
            model.set_experts_implementation(impl)
        except (AttributeError, ValueError, KeyError) as exc:
            rows.append({"setting": f"resident, transformers {impl}", "error": repr(exc)})
            continue
        torch.cuda.reset_peak_memory_stats()
        out, resident_s = decode(model, ids, args.new_tokens)
        rows.append({"setting": f"resident, transformers {impl}", "tokens_per_s": args.batch * args.new_tokens / resident_s,
                     "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9})
        ref = out if ref is None else ref
        print(rows[-1], flush=True)
    model.to("cpu")
    torch.cuda.empty_cache()
    for slots in (int(s) for s in args.slots.split(",")):
        prophet.wrap(model, device=dev, slots_per_layer=slots)
        with torch.no_grad():
            logits = model(ids).logits.float()
        torch.cuda.reset_peak_memory_stats()
        out, seconds = decode(model, ids, args.new_tokens)
        st = prophet.stats(model)
        rows.append({
            "setting": f"prophet, {slots} slots/layer, lru", "slots": st.slots, "total_experts": st.total_experts,
            "tokens_per_s": args.batch * args.new_tokens / seconds, "hit_rate": st.hit_rate,
            "h2d_gb": st.total.bytes_h2d / 1e9, "h2d_gb_s_over_run": st.total.bytes_h2d / 1e9 / seconds,
            "stall_s": st.stall_seconds, "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9,
            "identical_tokens": ref is not None and bool(torch.equal(out, ref)),
            "prefill_logits_rel_diff": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
        })
        print(rows[-1], flush=True)
        prophet.unwrap(model)
        model.to("cpu")
        torch.cuda.empty_cache()
    result = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "layers": args.layers,
              "batch": args.batch, "new_tokens": args.new_tokens, "model": "Mixtral-8x7B shape, random bf16 weights",
              "note": "stats include the warm-up generate of 2 tokens and one prefill; tokens/s excludes them; "
              "identical_tokens compares with transformers grouped_mm greedy output (bf16: near-ties may flip)", "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = result["gpu"].replace(" ", "_")
    (Path(args.out) / f"decode_check_{tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
