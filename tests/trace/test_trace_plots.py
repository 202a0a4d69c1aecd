"""Figures are written as PNG files (the ``figures`` extra)."""

from __future__ import annotations

import pytest

import prophet.trace as pt
from prophet.trace import stats

pytest.importorskip("matplotlib")


def test_plot_all_writes_every_figure_as_png(tmp_path, tiny_trace_path):
    from prophet.trace.plots import plot_all

    paths = plot_all(pt.load(tiny_trace_path), tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["cooccurrence.png", "dedup.png", "popularity.png", "reuse.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_dedup_plot_compares_traces(tmp_path, tiny_trace_path):
    from prophet.trace import synth
    from prophet.trace.plots import plot_dedup

    real = pt.load(tiny_trace_path)
    fake = synth.generate(synth.builtin("tiny-mixtral"), 8, 40, seed=0, progress=False)
    out = plot_dedup(
        [("recorded", stats.dedup_curve(real)), ("synthetic", stats.dedup_curve(fake))], tmp_path / "d.png"
    )
    assert out.read_bytes().startswith(b"\x89PNG")
