"""Every figure of the paper from the JSON in experiments/results/, as PNG and PDF in experiments/figures/out/.

    prophet-bench figures          (or: python experiments/figures/make_all.py)

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
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
OUT = Path(__file__).resolve().parent / "out"
SWEEPS = "python experiments/replay/sweeps.py"
CAPTIONS: dict[str, str] = {}
TITLES = {  # raw names in the results -> what a reader should see
    "mixtral-8x7b_humaneval_decode": "Mixtral-8x7B, HumanEval decode (shared trace)",
    "flame-moe-290m_prefill": "FLAME-MoE-290M, prefill (shared trace)",
    "tiny-mixtral": "the project's tiny-mixtral trace (fallback)",
    "h100-sxm": "H100 SXM", "h200": "H200", "a100-80gb": "A100 80GB", "rtx-4090": "RTX 4090", "l4": "L4",
}
BOUNDS = (  # key in a result's "bounds", line style, legend
    ("all_resident", "k--", "bound: all experts resident (compute only)"),
    ("oracle", "k-.", "bound: Belady's loads overlapped with compute"),
    ("all_miss", "k:", "reference: every expert copied on demand"),
)
MARKERS = "osD^vP*X"


def _title(name: str) -> str:
    return TITLES.get(name, name)


def _plain_log_axis(ax: Any, axis: str = "y") -> None:
    """Log scale with plain tick labels (1, 2, 5, 10, 20, ...), not 4x10^0."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


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
    print(f"wrote {OUT / name}.png, .pdf")


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
        for i, pol in enumerate(dict.fromkeys(r["policy"] for r in runs)):
            pts = sorted((r["slots_per_layer"], r["hit_rate"]) for r in runs if r["policy"] == pol)
            style = {"color": "k", "linestyle": "--"} if pol == "belady" else {}
            ax.plot(*zip(*pts, strict=True), marker=MARKERS[i % len(MARKERS)], label=pol, **style)
        ax.set(title=_title(trace), xlabel=f"cache slots per layer (of {runs[0]['num_experts']} experts)",
               ylabel="hit rate (fraction of expert requests)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, "a_hit_rate_vs_capacity",
          "(a) Hit rate vs per-layer cache capacity, batch 1, replayed through Prophet's ExpertCache on the shared "
          "real traces, every policy on the held-out half of each trace's sequences. belady (dashed) is the "
          "offline-optimal eviction without prefetch; 'prophet' is prediction-aware eviction by path matching plus "
          "prefetch within the link budget, fitted on the other half (out of sample); prefetched experts count as "
          "hits.")


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
    for i, pol in enumerate(r["policy"] for r in points[0]["results"]):
        ax.plot(x, [next(r for r in p["results"] if r["policy"] == pol)["tokens_per_s"] for p in points],
                marker=MARKERS[i % len(MARKERS)], label=pol)
    for key, style, label in BOUNDS:
        ax.plot(x, [p["bounds"][key]["tokens_per_s"] for p in points], style, label=label)
    ax.set(title=f"{panel['model']} on {_title(panel['gpu'])}", xlabel="GPU memory budget (GB)",
           ylabel="decode tokens/s (batch 1)", yscale="log")
    ax.set_ylim(top=ax.get_ylim()[1] * 8)  # room above the highest line for the legend
    _plain_log_axis(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, ncol=2, loc="upper left")


def fig_d_vram() -> None:
    data = _read("sim_vram")
    if data is None or not all(p["points"] for p in data["panels"]):
        print(f"(d) skipped: no complete sim_vram.json; run `{SWEEPS} vram`")
        return
    fig, axes = _figure(len(data["panels"]))
    for ax, panel in zip(axes, data["panels"], strict=True):
        _budget_panel(ax, panel)
    _save(fig, "d_tokens_vs_vram",
          "(d) Modelled decode speed vs GPU memory budget per policy, with two bounds computed under the same "
          "capacity, link and compute as the policies: all experts resident (compute only, even where they would "
          "not fit) and Belady's loads (the fewest any policy can make into these slots) fully overlapped with "
          "compute; dotted: every expert copied on demand, a reference, not a bound. 'prophet': path-matching "
          "eviction and prefetch within the link budget, fitted out of sample (Mixtral: on the trace's first "
          "sequence, every policy replayed on the second; DeepSeek-V2-Lite: on another sample of its synthetic "
          "trace). Slots from prophet.plan (one shared pool). Datasheet GPU, measured/practical PCIe.")


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
    for key, style, label in BOUNDS[1:]:
        axes[0].plot(x, [p["bounds"][key]["tokens_per_s"] for p in points], style, label=label)
    axes[0].set(xscale="log", xlabel="context length (K tokens)", ylabel="decode tokens/s (batch 1)")
    axes[1].plot(x, [p["kv_gb"] for p in points], marker="o", label="KV cache (GB)")
    axes[1].plot(x, [p["slots_gb"] for p in points], marker="s", label="expert slots (GB)")
    axes[1].set(xscale="log", xlabel="context length (K tokens)", ylabel="GPU memory (GB)")
    for ax in axes:
        ax.set_xticks(x, [f"{v:g}" for v in x])  # the measured contexts, plainly
        ax.xaxis.set_minor_formatter(NullFormatter())
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
        ax.set(title=f"{panel['model']} on {_title(panel['gpu'])}, {point['vram_gb']} GB", ylabel="time per token (ms)",
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
    styles = {  # the three prophet variants coincide at batch 8: widths and markers keep each one visible
        "belady": {"color": "k", "linestyle": "--", "marker": "s"},
        "prophet, no prefetch": {"linewidth": 5, "alpha": 0.45, "marker": "o", "markersize": 9},
        "prophet, every prediction copied": {"linewidth": 3, "linestyle": "--", "marker": "D", "markersize": 6},
        "prophet, link budget": {"linewidth": 1.2, "linestyle": ":", "marker": "x", "markersize": 7, "color": "k"},
    }
    for ax, batch in zip(axes, batches, strict=True):
        points = sorted((p for p in data["points"] if p["batch"] == batch), key=lambda p: p["cache_slots"])
        x = [p["cache_slots"] for p in points]
        for pol in [r["policy"] for r in points[0]["results"]]:
            y = [next(r for r in p["results"] if r["policy"] == pol)["tokens_per_s"] for p in points]
            ax.plot(x, y, label=pol, **({"marker": "^"} | styles.get(pol, {})))
        ax.set(title=f"Mixtral-8x7B on H100 SXM, batch {batch}", xlabel="expert slots (shared pool, of 256)",
               ylabel="decode tokens/s", yscale="log")
        _plain_log_axis(ax)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, "g_link_budget",
          "(g) Prefetch within the link budget. Prediction-aware eviction with path matching (fitted on one sequence "
          "of the shared Mixtral trace, replayed on the other) with no prefetch, with every prediction copied, and "
          "with copies only where the compute they can hide outweighs the link time they waste "
          "(score >= copy / (copy + d x layer)); LRU, LFU and Belady (dashed, no prefetch) for reference. At batch 1 "
          "over PCIe the link is the bottleneck, so copying every prediction loses speed despite a higher hit rate, "
          "and the budget lets almost no copy through (its line runs on the no-prefetch one); "
          "at batch 8 a layer computes longer, the budget lets every prediction through and the three prophet "
          "variants coincide (drawn wide to narrow so each stays visible). "
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
    speed.set(title="Mixtral-8x7B on RTX 4090, 32K context", xlabel="bits per expert parameter (scales included)",
              ylabel="decode tokens/s (simulated)", yscale="log")
    _plain_log_axis(speed)
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
          "(shared trace, batch 1, every policy on its second sequence) with expert slots planned at each format's "
          "bytes; LRU is copy-only, prophet prefetches within the link budget, fitted on the first sequence (out of "
          "sample); int3/int2 are modelled bytes only. Right: perplexity change on "
          "held-out plays of the trained tiny MoE when its experts are quantized at wrap, against the bf16 model "
          "(the bf16 point is the wrapped model computing its experts in fp32).")


def fig_i_soak() -> None:
    data = _read("soak_decode")
    if data is None:
        print("(i) skipped: no soak_decode.json; run `python experiments/soak/decode_soak.py`")
        return
    fig, (ax,) = _figure()
    fig.set_size_inches(9, 4.6)  # room for the caption
    steps, rss = zip(*data["samples"], strict=True)
    base = data["baseline_bytes"] / 2**20
    ax.plot(steps, [b / 2**20 for b in rss], marker=".", label="resident anonymous memory")
    ax.axhspan(base, base * (1 + data["limit"]), color="g", alpha=0.15, label=f"baseline + {data['limit']:.0%}")
    ax.set(xlabel="decode step", ylabel="MiB", ylim=(base * 0.95, base * 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, "i_soak",
          f"(i) Host memory over {data['steps']} decode steps ({data['sequences']} sequences, KV cache and predictor "
          f"reset at each) of a tiny Mixtral on the CPU with {data['slots_per_layer']} of "
          f"{data['experts_per_layer']} expert slots per layer and a {data['predictor']} predictor, sampled after a "
          f"{data['warmup_steps']}-step warm-up: largest rise {data['growth']:.3%} of the baseline.")


def fig_j_precision() -> None:
    data = _read("bf16_error")
    if data is None:
        print("(j) skipped: no bf16_error.json; run `python experiments/accuracy/bf16_error.py`")
        return
    fig, axes = _figure(2)
    fig.subplots_adjust(left=0.1, wspace=0.35)
    for ax, dtype in zip(axes, ("bfloat16", "float16"), strict=True):
        rows = [r for r in data["rows"] if r["dtype"] == dtype]
        models = list(dict.fromkeys(r["model"] for r in rows))
        for prefix, resident, label in (("experts_", False, "experts output, small cache"),
                                        ("experts_", True, "experts output, all resident"), ("", False, "logits, small cache")):
            ys, xs = [], []
            for y, m in enumerate(models):
                v = [r[f"{prefix}wrapped_rms"] / r[f"{prefix}unwrapped_rms"] for r in rows
                     if r["model"] == m and (r.get("cache") == "all slots") == resident]
                if v:
                    ys.append(y)
                    xs.append(sum(v) / len(v))
            ax.plot(xs, ys, "o", label=label)
        ax.axvline(1.0, color="k", linewidth=0.8)
        names = [m.replace(" (tiny)", "").replace("mixtral-8x7b widths, ", "Mixtral-8x7B ").replace(" layer(s), ", "L ")
                 .replace(" experts", "E") for m in models]
        ax.set_yticks(range(len(models)), names, fontsize=7)
        ax.set(title=dtype, xlabel="RMS error vs fp32, wrapped / unwrapped (mean over inputs)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")  # the one corner no point falls in
    _save(fig, "j_precision",
          "(j) How far the wrapped model is from the fp32 model, relative to the unwrapped model in the same dtype "
          "(left of 1: closer). Experts output: each MoE layer's experts fed identical inputs, so only their "
          "rounding differs (small cache: one slot per layer, steps in waves summed in the model's dtype; all "
          "resident: one pass); logits: the whole model, where router near-ties can flip an expert in either model.")


FIGURES: list[Callable[[], None]] = [fig_a_hit_rate, fig_b_recall, fig_c_dedup, fig_d_vram, fig_e_context, fig_f_breakdown,
                                     fig_g_link_budget, fig_h_quant, fig_i_soak, fig_j_precision]


def main(results: Path = RESULTS, out: Path = OUT) -> None:
    """Draw every figure whose results are in ``results`` into ``out``."""
    global RESULTS, OUT
    RESULTS, OUT = results, out
    for make in FIGURES:
        make()
    if CAPTIONS:
        (OUT / "captions.md").write_text("".join(f"- `{k}`: {v}\n" for k, v in CAPTIONS.items()))


if __name__ == "__main__":
    main()
