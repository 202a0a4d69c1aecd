"""Quantized expert kernels on a GPU: correctness against their references and speed against HBM bandwidth.

For Mixtral-8x7B expert shapes (H=4096, I=14336, 8 experts, top-2) at 1, 4 and 16 tokens, each format
(int4, int8, fp8 128x128 blocks, fp8 per channel, mxfp4, and bf16 as the baseline) is quantized into a slot
pool as the expert cache holds it, then `prophet.kernels.moe.moe_experts_triton` is checked against
`moe_experts_reference` (which dequantizes with `prophet.formats.dequantize`) and timed (median of
`triton.testing.do_bench`). Bandwidth counts the slot bytes of the distinct experts touched plus activations;
it is reported as a share of the HBM copy rate measured first in the same run, and beside dequantizing the used
experts to bf16 first and running the bf16 kernel (the path without in-kernel dequantization). transformers' own quantized
experts (FP8Experts with 128x128 blocks, Mxfp4GptOssExperts) are run on the same weights where their kernels
load on this machine (they may need the ``kernels`` hub package); otherwise the record says why not.

Target (issue 18): int4 and fp8 reach >= 80% of the measured HBM copy rate at 1-16 tokens; the script exits
1 when a kernel is wrong or the target is missed, after writing ``quant_check_<device>.json`` to --out (default
experiments/results/). Part of experiments/gpu/run_all.sh.

    python experiments/gpu/quant_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench_grouped_gemm import hbm_copy_gbps, median_ms, relative_error  # this script's folder

from prophet.formats import ExpertFormat, dequantize, quantize, quantize_expert, slab_layout, weight_format
from prophet.kernels.moe import Quant, moe_experts_reference, moe_experts_triton
from prophet.kernels.tuning import device_name
from prophet.provenance import git_sha, versions

REPO = Path(__file__).resolve().parents[2]
HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2
TOKENS = (1, 4, 16)
FORMATS = ("bf16", "int4", "int8", "fp8", "mxfp4")
TARGET = 0.80  # share of the HBM copy rate, int4 and fp8
TOLERANCE = 2e-2  # relative L2 error, bf16 activations


def slot_pool(name: str, dense: dict[str, torch.Tensor], device: torch.device) -> tuple[dict, Quant | None, int]:
    """``(views, quant, slab bytes)`` of a pool holding the experts ``dense`` (``w1 [E,N1,H]``, ``w2 [E,H,I]``)."""
    fmt = ExpertFormat(HIDDEN, INTER)
    layout = slab_layout(fmt, weight_format(name), torch.bfloat16 if name != "bf16" else None)
    pool = torch.empty(EXPERTS, layout.numel, dtype=layout.storage_dtype, device=device)  # [S, slab]
    views = layout.views(pool)
    for e in range(EXPERTS):
        for key, value in quantize_expert(layout, {k: v[e] for k, v in dense.items()}).items():
            views[key][e].copy_(value)
    quant = Quant(layout.weights, views["w1_scale"], views["w2_scale"]) if layout.weights.quantized else None
    return views, quant, layout.nbytes


def dequantize_then_bf16(hidden, index, weights, w1, w2, fmt, b1, b2, quant: Quant) -> torch.Tensor:
    """The used experts dequantized to bf16 (`prophet.formats.dequantize`), then the bf16 kernel over them."""
    used = index.unique()  # [U] slots touched
    deq = {name: torch.stack([dequantize(quant.weights, values[s], scales[s], shape).to(hidden.dtype)
                              for s in used.tolist()])
           for name, values, scales, shape in (("w1", w1, quant.w1_scale, (fmt.w1_rows, fmt.hidden_size)),
                                               ("w2", w2, quant.w2_scale, (fmt.hidden_size, fmt.intermediate_size)))}
    remap = torch.searchsorted(used, index)  # [T, k] slot -> position among the used ones
    return moe_experts_triton(hidden, remap, weights, deq["w1"], deq["w2"], fmt)


def transformers_fp8(dense: dict[str, torch.Tensor], hidden, index, weights) -> tuple[float, torch.Tensor] | str:
    """Time transformers' FP8Experts (128x128 blocks) on the same experts, or say why it cannot run here."""
    try:
        from transformers import MixtralConfig
        from transformers.integrations.finegrained_fp8 import FP8Experts

        config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS)
        module = FP8Experts(config, block_size=(128, 128)).to(hidden.device)
        wf = weight_format("fp8")
        with torch.no_grad():
            for e in range(EXPERTS):
                for name, w in (("gate_up_proj", dense["w1"][e]), ("down_proj", dense["w2"][e])):
                    values, scales = quantize(wf, w)  # the same bytes and scale_inv as Prophet's fp8 slots
                    getattr(module, name)[e].copy_(values)
                    target = getattr(module, f"{name}_scale_inv")[e]
                    target[: scales.shape[0], : scales.shape[1]].copy_(scales)
            out = module(hidden, index, weights)
        return median_ms(lambda: module(hidden, index, weights)), out
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party backend is reported, not fatal
        return f"unavailable: {type(exc).__name__}: {exc}"[:300]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results", help="folder for the JSON")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)
    hbm = hbm_copy_gbps(device)
    print(f"{torch.cuda.get_device_name(device)}: measured HBM copy rate {hbm:.0f} GB/s (read + write)")
    dense = {
        "w1": torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=device, generator=gen).mul_(HIDDEN**-0.5),
        "w2": torch.randn(EXPERTS, HIDDEN, INTER, device=device, generator=gen).mul_(INTER**-0.5),
    }
    rows, failures = [], []
    for name in FORMATS:
        views, quant, slab = slot_pool(name, dense, device)
        for tokens in TOKENS:
            hidden = torch.randn(tokens, HIDDEN, device=device, generator=gen).bfloat16()
            index = torch.rand(tokens, EXPERTS, device=device, generator=gen).topk(TOP_K, dim=1).indices
            weights = torch.softmax(torch.randn(tokens, TOP_K, device=device, generator=gen), dim=1)
            args = (hidden, index, weights, views["w1"], views["w2"], ExpertFormat(HIDDEN, INTER), None, None, quant)
            err = relative_error(moe_experts_triton(*args), moe_experts_reference(*args))
            ms = median_ms(lambda args=args: moe_experts_triton(*args))
            distinct = int(index.unique().numel())
            moved = distinct * slab + 2 * hidden.numel() * hidden.element_size()
            share = moved / (ms * 1e-3) / 1e9 / hbm
            row = {"format": name, "tokens": tokens, "ms": ms, "expert_bytes": slab, "rel_error": err,
                   "GBps": moved / (ms * 1e-3) / 1e9, "share_of_hbm_copy": share}
            if quant is not None:  # the alternative to in-kernel dequantization: bf16 copies of the used experts
                row["dequantize_then_bf16_ms"] = median_ms(lambda args=args: dequantize_then_bf16(*args))
            if name == "fp8" and tokens in (1, 16):
                hf = transformers_fp8(dense, hidden, index, weights)
                row["transformers_fp8_experts"] = hf if isinstance(hf, str) else {
                    "ms": hf[0], "rel_error_vs_reference": relative_error(hf[1], moe_experts_reference(*args))}
            rows.append(row)
            print(f"{name:<12} T={tokens:<3} {ms:8.3f} ms  {row['GBps']:7.0f} GB/s  {share:6.1%} of copy  err {err:.1e}")
            if err > TOLERANCE:
                failures.append(f"{name} T={tokens}: error {err:.2e} > {TOLERANCE}")
            if name in ("int4", "fp8") and share < TARGET:
                failures.append(f"{name} T={tokens}: {share:.0%} of the HBM copy rate < {TARGET:.0%}")
    bf16 = {r["tokens"]: r["ms"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        r["speedup_vs_bf16"] = bf16[r["tokens"]] / r["ms"]
    record = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(device), "hbm_copy_GBps": hbm,
              "shape": {"hidden": HIDDEN, "inter": INTER, "experts": EXPERTS, "top_k": TOP_K}, "target": TARGET,
              "failures": failures, "rows": rows, "versions": versions(), "git_sha": git_sha()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quant_check_{device_name(device)}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("device", "hbm_copy_GBps", "failures")}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
