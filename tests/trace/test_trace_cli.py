"""``prophet-bench trace`` (also ``python -m prophet.trace``): convert, stats, synth, and errors reported without a
traceback."""

from __future__ import annotations

import json

import numpy as np

import prophet.trace as pt
from prophet.cli import main as cli_main


def main(argv: list[str]) -> int:
    return cli_main(["trace", *argv])


def test_convert_then_stats(tmp_path, shared_traces, capsys):
    assert main(["convert", str(shared_traces / "flame-moe-290m_prefill.npz"), str(tmp_path / "f")]) == 0
    assert pt.load(tmp_path / "f").experts.shape == (2048, 8, 6)
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "f")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 2048 and len(summary["next_layer_recall"]) == 7


def test_synth_writes_a_trace_of_the_asked_shape(tmp_path):
    assert (
        main(["synth", str(tmp_path / "s"), "--shape", "6", "8", "2", "--sequences", "2", "--tokens", "10"])
        == 0
    )
    trace = pt.load(tmp_path / "s")
    assert trace.experts.shape == (20, 6, 2)
    assert np.array_equal(trace.sequence_lengths, [10, 10])


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prophet-bench: error: ") and "no such file" in err and len(err.strip().splitlines()) == 1
