"""Every figure of the paper from the JSON in experiments/results/, as PNG and PDF in experiments/figures/out/.

    python experiments/figures/make_all.py

Reads results only (experiments/replay/sweeps.py and the predictor harness write them); a figure whose
results are missing is skipped with a message naming the command that makes them. Each figure carries its
caption; the captions are also written to out/captions.md.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
OUT = Path(__file__).resolve().parent / "out"
SWEEPS = "python experiments/replay/sweeps.py"
CAPTIONS: dict[str, str] = {}


def _read(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _save(fig: Any, name: str, caption: str) -> None:
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(caption, 150)), fontsize=7, va="bottom", ha="left")
    OUT.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(OUT / f"{name}.{ext}", dpi=150)
    plt.close(fig)
    CAPTIONS[name] = caption
    print(f"wrote out/{name}.png, .pdf")


def _figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.6), squeeze=False)
    fig.subplots_adjust(bottom=0.27, wspace=0.28)
    return fig, list(axes[0])


def fig_a_hit_rate() -> None:
    data = _read("sim_capacity")
    if data is None:
        print(f"(a) skipped: no sim_capacity.json; run `{SWEEPS} capacity`")
        return
    traces = sorted({r["trace"] for r in data["runs"]})
    fig, axes = _figure(len(traces))
    for ax, trace in zip(axes, traces, strict=True):
        runs = [r for r in data["runs"] if r["trace"] == trace]
        for pol in dict.fromkeys(r["policy"] for r in runs):
            pts = sorted((r["slots_per_layer"], r["hit_rate"]) for r in runs if r["policy"] == pol)
            style = {"color": "k", "linestyle": "--"} if pol == "belady" else {}
            ax.plot(*zip(*pts, strict=True), marker="o", label=pol, **style)
        ax.set(title=trace, xlabel=f"cache slots per layer (of {runs[0]['num_experts']} experts)",
               ylabel="hit rate (fraction of expert requests)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, "a_hit_rate_vs_capacity",
          "(a) Hit rate vs per-layer cache capacity, batch 1, replayed through Prophet's ExpertCache on the shared "
          "real traces. belady (dashed) is the offline-optimal eviction without prefetch; 'prophet' is "
          "prediction-aware eviction by path matching plus prefetch within the link budget (fitted on the same "
          "trace, so optimistic); prefetched experts count as hits.")


def _recall_reports() -> list[dict[str, Any]]:
    """recall_report dicts (``predictor`` + ``distances``) from any results JSON that holds them, and the
    out-of-sample means of experiments/predictors/evaluate_predictors.py (``traces.<trace>.recall.<predictor>``)."""
    found = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        items = data if isinstance(data, list) else data.get("reports", data.get("recall", [data]))
        found += [r for r in items if isinstance(r, dict) and "predictor" in r and "distances" in r]
        if isinstance(data, dict) and isinstance(data.get("traces"), dict):
            for trace, entry in data["traces"].items():
                for name, rec in (entry.get("recall") or {}).items():
                    first = next(iter(rec["mean"].values()))
                    k = min(int(key.split("@")[1]) for key in first if key.startswith("recall@"))
                    found.append({"trace": trace, "predictor": name, "ks": [k], "distances": rec["mean"]})
    return found


def fig_b_recall() -> None:
    reports = _recall_reports()
    if not reports:
        print("(b) skipped: no recall results (dicts with 'predictor' and 'distances', as "
              "prophet.predict.evaluate.recall_report returns) in experiments/results/")
        return
    traces = sorted({r.get("trace", "trace") for r in reports})
    fig, axes = _figure(len(traces))
    for ax, trace in zip(axes, traces, strict=True):
        for r in (r for r in reports if r.get("trace", "trace") == trace):
            k = r["ks"][0]
            dist = sorted(r["distances"].items(), key=lambda kv: int(kv[0]))
            xs = range(len(dist))  # categorical: "next token" sits L layer steps away, not at its distance
            ax.plot(xs, [e[f"recall@{k}"] for _, e in dist], marker="o", label=r["predictor"])
            ax.set_xticks(xs, [e["label"] for _, e in dist], rotation=30, fontsize=7)
        ax.set(title=trace, xlabel="look-ahead distance (MoE layer steps)", ylabel=f"recall@{k} (fraction)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, "b_recall_vs_lookahead",
          "(b) Recall of each predictor vs look-ahead distance: share of the true experts found among the top-k "
          "predicted, batch 1, on the shared real traces, fitted on some sequences and tested on the others (mean "
          "over splits; prophet.predict.evaluate.recall_report).")


def fig_c_dedup() -> None:
    data = _read("sim_dedup")
    if data is None:
        print(f"(c) skipped: no sim_dedup.json; run `{SWEEPS} dedup`")
        return
    fig, axes = _figure(2)
    for source in dict.fromkeys(c["source"] for c in data["curves"]):
        pts = [c for c in data["curves"] if c["source"] == source]
        b = [c["batch"] for c in pts]
        style = "-" if source.startswith("trace") else ":"
        label = f"{source} (E={pts[0]['num_experts']}, k={pts[0]['top_k']})"
        axes[0].plot(b, [c["distinct"] for c in pts], style, marker="o", label=label)
        axes[1].plot(b, [c["memory_saved"] for c in pts], style, marker="o", label=label)
    spec = _read("sim_specmoe_dedup")
    if spec:
        axes[1].scatter([r["batch"] for r in spec["rows"]], [r["specmoe_claim"] for r in spec["rows"]], marker="x",
                        s=60, color="k", zorder=5, label="SpecMoE claim")
    axes[0].set(xscale="log", yscale="log", xlabel="batch size (sequences)", ylabel="distinct experts per layer step")
    axes[1].set(xscale="log", xlabel="batch size (sequences)", ylabel="memory saved = 1 - distinct / (B x k)", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, "c_dedup_vs_batch",
          "(c) Batch dedup: distinct experts a decode step loads per MoE layer vs batch size. Solid: the shared "
          "real traces, B lanes interleaved from different positions; dotted: uniform independent routing, "
          "E(1-(1-k/E)^B). Right: memory saved by dedup, with SpecMoE's published claims (x) for comparison.")


def _budget_panel(ax: Any, panel: dict[str, Any]) -> None:
    points = panel["points"]
    x = [p["vram_gb"] for p in points]
    for pol in [r["policy"] for r in points[0]["results"]]:
        ax.plot(x, [next(r for r in p["results"] if r["policy"] == pol)["tokens_per_s"] for p in points], marker="o", label=pol)
    for key, style in (("all_resident", "k--"), ("oracle", "k-."), ("all_miss", "k:")):
        ax.plot(x, [p["bounds"][key]["tokens_per_s"] for p in points], style, label=f"bound: {key.replace('_', '-')}")
    ax.set(title=f"{panel['model']} on {panel['gpu']}", xlabel="GPU memory budget (GB)", ylabel="decode tokens/s (batch 1)",
           yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def fig_d_vram() -> None:
    data = _read("sim_vram")
    if data is None or not all(p["points"] for p in data["panels"]):
        print(f"(d) skipped: no complete sim_vram.json; run `{SWEEPS} vram`")
        return
    fig, axes = _figure(len(data["panels"]))
    for ax, panel in zip(axes, data["panels"], strict=True):
        _budget_panel(ax, panel)
    _save(fig, "d_tokens_vs_vram",
          "(d) Modelled decode speed vs GPU memory budget per policy, with the bounds: all experts resident (even "
          "where they would not fit), oracle (Belady + perfect prefetch at the same link bandwidth and capacity) and "
          "every expert copied without overlap. 'prophet': path-matching eviction and prefetch within the link "
          "budget, fitted on the replayed trace (in sample; figure (g) is out of sample). "
          "Slots from prophet.plan (one shared pool); Mixtral on the shared "
          "real trace, DeepSeek-V2-Lite on a synthetic trace of its shape. Datasheet GPU, measured/practical PCIe.")


def fig_e_context() -> None:
    data = _read("sim_context")
    if data is None:
        print(f"(e) skipped: no sim_context.json; run `{SWEEPS} context`")
        return
    points = [p for p in data["points"] if p.get("results")]
    fig, axes = _figure(2)
    x = [p["context"] / 1024 for p in points]
    for pol in [r["policy"] for r in points[0]["results"]]:
        axes[0].plot(x, [next(r for r in p["results"] if r["policy"] == pol)["tokens_per_s"] for p in points], marker="o", label=pol)
    for key, style in (("oracle", "k-."), ("all_miss", "k:")):
        axes[0].plot(x, [p["bounds"][key]["tokens_per_s"] for p in points], style, label=f"bound: {key.replace('_', '-')}")
    axes[0].set(xscale="log", xlabel="context length (K tokens)", ylabel="decode tokens/s (batch 1)")
    axes[1].plot(x, [p["kv_gb"] for p in points], marker="o", label="KV cache (GB)")
    axes[1].plot(x, [p["slots_gb"] for p in points], marker="s", label="expert slots (GB)")
    axes[1].set(xscale="log", xlabel="context length (K tokens)", ylabel="GPU memory (GB)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    failed = [p["context"] // 1024 for p in data["points"] if not p.get("results")]
    note = f" Contexts that leave no room for one token's experts: {failed}K." if failed else ""
    _save(fig, "e_context_vs_tokens",
          "(e) Mixtral-8x7B on an H100 80 GB: longer contexts take KV memory from the expert slots (prophet.plan), "
          "so tokens/s falls with context. Mixtral was trained for 32K; beyond it needs RoPE scaling." + note)


def fig_f_breakdown() -> None:
    data = _read("sim_vram")
    if data is None or not all(p["points"] for p in data["panels"]):
        print(f"(f) skipped: no complete sim_vram.json; run `{SWEEPS} vram`")
        return
    fig, axes = _figure(len(data["panels"]))
    for ax, panel in zip(axes, data["panels"], strict=True):
        point = panel["points"][len(panel["points"]) // 2]
        results = point["results"]
        names = [r["policy"] for r in results]
        bottom = [0.0] * len(results)
        for part, color in (("compute_s", "tab:blue"), ("stall_s", "tab:red"), ("cpu_s", "tab:gray")):
            vals = [r[part] * 1e3 for r in results]
            ax.bar(names, vals, bottom=bottom, color=color, label=part.removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.scatter(names, [r["copy_busy_s"] * 1e3 for r in results], marker="_", s=400, color="k", label="link busy", zorder=5)
        ax.set(title=f"{panel['model']} on {panel['gpu']}, {point['vram_gb']} GB", ylabel="time per token (ms)",
               xlabel="policy")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    _save(fig, "f_time_breakdown",
          "(f) Time per decode token broken down: GPU compute (roofline per layer), stall waiting for host-to-device "
          "copies, and CPU time of missed experts beyond the GPU's (zero without CPU fallback); the black bar is the "
          "time the link was busy, which overlaps compute. Middle budget of (d).")


def fig_g_link_budget() -> None:
    data = _read("sim_prefetch_budget")
    if data is None:
        print(f"(g) skipped: no sim_prefetch_budget.json; run `{SWEEPS} prefetch`")
        return
    batches = sorted({p["batch"] for p in data["points"]})
    fig, axes = _figure(len(batches))
    styles = {"belady": {"color": "k", "linestyle": "--"}, "prophet, link budget": {"linewidth": 2.5}}
    for ax, batch in zip(axes, batches, strict=True):
        points = sorted((p for p in data["points"] if p["batch"] == batch), key=lambda p: p["cache_slots"])
        x = [p["cache_slots"] for p in points]
        for pol in [r["policy"] for r in points[0]["results"]]:
            y = [next(r for r in p["results"] if r["policy"] == pol)["tokens_per_s"] for p in points]
            ax.plot(x, y, marker="o", label=pol, **styles.get(pol, {}))
        ax.set(title=f"Mixtral-8x7B on h100-sxm, batch {batch}", xlabel="expert slots (shared pool, of 256)",
               ylabel="decode tokens/s", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, "g_link_budget",
          "(g) Prefetch within the link budget. Prediction-aware eviction with path matching (fitted on one sequence "
          "of the shared Mixtral trace, replayed on the other) with no prefetch, with every prediction copied, and "
          "with copies only where the compute they can hide outweighs the link time they waste "
          "(score >= copy / (copy + d x layer)); LRU, LFU and Belady (dashed, no prefetch) for reference. At batch 1 "
          "over PCIe the link is the bottleneck, so copying every prediction loses speed despite a higher hit rate; "
          "at batch 8 a layer computes longer, the budget lets every prediction through and the three coincide. "
          "LRU thrashes at batch 8: each step's experts over all layers cycle through more slots than the pool has.")


def fig_h_quant() -> None:
    sim, quality = _read("sim_quant"), _read("quant_quality")
    if sim is None or quality is None:
        print(f"(h) skipped: needs sim_quant.json (`{SWEEPS} quant`) and quant_quality.json "
              "(`python experiments/quant_quality.py`)")
        return
    fig, (speed, error) = _figure(2)
    bits = [p["bits_per_param"] for p in sim["points"]]
    for i, pol in enumerate(("lru", "prophet")):
        speed.plot(bits, [p["results"][i]["tokens_per_s"] for p in sim["points"]], marker="o", label=pol)
    for p in sim["points"]:
        speed.annotate(p["expert_dtype"], (p["bits_per_param"], p["results"][0]["tokens_per_s"]), fontsize=7,
                       textcoords="offset points", xytext=(3, -9))
    speed.set(title="Mixtral-8x7B on rtx-4090, 32K context", xlabel="bits per expert parameter (scales included)",
              ylabel="decode tokens/s (simulated)", yscale="log")
    rows = quality["formats"]
    error.scatter([r["bits_per_param"] for r in rows], [100 * r["perplexity_change"] for r in rows], marker="o")
    for r in rows:
        error.annotate(r["format"], (r["bits_per_param"], 100 * r["perplexity_change"]), fontsize=7,
                       textcoords="offset points", xytext=(3, 3))
    error.set(title="tiny trained MoE, held-out text", xlabel="bits per expert parameter (H=128, I=256)",
              ylabel="perplexity change vs bf16 (%)")
    for ax in (speed, error):
        ax.grid(alpha=0.3, which="both")
    speed.legend(fontsize=7)
    _save(fig, "h_quant",
          "(h) Quantized experts. Left: simulated decode of Mixtral-8x7B on the RTX 4090 profile at 32K context "
          "(shared trace, batch 1) with expert slots planned at each format's bytes; LRU is copy-only, prophet "
          "prefetches within the link budget; int3/int2 are modelled bytes only. Right: perplexity change on "
          "held-out plays of the trained tiny MoE when its experts are quantized at wrap, against the bf16 model "
          "(the bf16 point is the wrapped model computing its experts in fp32).")


FIGURES: list[Callable[[], None]] = [fig_a_hit_rate, fig_b_recall, fig_c_dedup, fig_d_vram, fig_e_context, fig_f_breakdown,
                                     fig_g_link_budget, fig_h_quant]


def main() -> None:
    for make in FIGURES:
        make()
    if CAPTIONS:
        (OUT / "captions.md").write_text("".join(f"- `{k}`: {v}\n" for k, v in CAPTIONS.items()))


if __name__ == "__main__":
    main()
