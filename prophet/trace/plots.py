"""PNG figures of trace statistics (needs the ``figures`` extra: ``pip install prophet-moe[figures]``).

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so plotting neither picks a
global backend nor leaves figures open in the caller's process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prophet.trace import stats
from prophet.trace.format import Trace


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'prophet-moe[figures]'") from exc
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_popularity(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Heatmap of each layer's expert popularity, with the layer's normalized entropy on the right."""
    pop = stats.popularity(trace)
    fig = _figure(6.0, 1.5 + 0.12 * trace.num_layers)
    ax = fig.add_subplot()
    im = ax.imshow(pop, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"popularity ({trace.model.name[:40]})")
    fig.colorbar(im, ax=ax, label="share of selections")
    h = stats.entropy(pop, normalized=True)
    sec = ax.secondary_yaxis("right")
    sec.set_yticks(range(len(h)), [f"{v:.2f}" for v in h], fontsize=6)
    return _save(fig, path)


def plot_reuse(trace: Trace, path: str | os.PathLike[str], max_distance: int = 64) -> Path:
    """Cumulative share of re-used selections by reuse distance, one curve per layer (the LRU hit curve shape)."""
    fig = _figure()
    ax = fig.add_subplot()
    xs = np.arange(1, max_distance + 1)
    for layer, d in enumerate(stats.reuse_distances(trace)):
        if d.size:
            ax.plot(xs, (d[:, None] <= xs[None, :]).mean(0), lw=0.8, color=_shade(layer, trace.num_layers))
    ax.set_xscale("log")
    ax.set_xlabel("reuse distance (tokens)")
    ax.set_ylabel("share of re-uses within distance")
    ax.set_title("temporal reuse per layer (dark = early layers)")
    return _save(fig, path)


def plot_cooccurrence(trace: Trace, path: str | os.PathLike[str], layer: int = 0, gap: int = 1) -> Path:
    """Row-normalized co-occurrence of layer ``layer``'s experts with layer ``layer + gap``'s."""
    c = stats.cooccurrence(trace, gap)[layer].astype(np.float64)
    rows = c.sum(1, keepdims=True)
    fig = _figure(5.0, 4.5)
    ax = fig.add_subplot()
    im = ax.imshow(
        np.divide(c, rows, out=np.zeros_like(c), where=rows > 0), cmap="magma", interpolation="nearest"
    )
    ax.set_xlabel(f"expert at layer {layer + gap}")
    ax.set_ylabel(f"expert at layer {layer}")
    ax.set_title(f"P(expert at layer {layer + gap} | expert at layer {layer})")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_dedup(curves: Sequence[tuple[str, stats.DedupCurve]], path: str | os.PathLike[str]) -> Path:
    """Distinct experts per layer per step against batch size, each curve beside its uniform-routing line."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, curve) in enumerate(curves):
        color = f"C{i}"
        ax.plot(curve.batch_sizes, curve.mean, "o-", color=color, label=f"{label} ({curve.mode})")
        ax.plot(curve.batch_sizes, curve.uniform, ":", color=color, label=f"{label}: uniform routing")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (tokens per step)")
    ax.set_ylabel("distinct experts per layer per step")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(trace: Trace, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Every figure of one trace into ``out_dir``."""
    d = Path(out_dir)
    out = [
        plot_popularity(trace, d / "popularity.png"),
        plot_reuse(trace, d / "reuse.png"),
        plot_dedup([(trace.model.name[:30], stats.dedup_curve(trace))], d / "dedup.png"),
    ]
    if trace.num_layers > 1:
        out.append(plot_cooccurrence(trace, d / "cooccurrence.png"))
    return out


def _shade(i: int, n: int) -> tuple[float, float, float]:
    v = 0.15 + 0.7 * i / max(n - 1, 1)
    return (v * 0.3, v * 0.5, v)
