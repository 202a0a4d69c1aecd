"""The trace the project records itself: small, loadable, and exactly what its script regenerates."""

from __future__ import annotations

import platform
import runpy
import sys

import numpy as np
import pytest
import torch
import transformers
from trace_helpers import REPO

import prophet.trace as pt
from prophet.trace import Phase


def test_tiny_trace_is_small_and_complete(tiny_trace_path):
    trace = pt.load(tiny_trace_path)
    assert sum(p.stat().st_size for p in tiny_trace_path.iterdir()) < 200_000
    assert 200 <= len(trace) <= 1000 and trace.num_sequences == 6
    assert trace.model.model_type == "mixtral"
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (4, 8, 2)
    assert set(np.unique(trace.phase).tolist()) == {Phase.PREFILL, Phase.DECODE}
    assert trace.sketch is not None and trace.sketch.shape == (len(trace), 4, 8)
    assert (trace.experts >= 0).all() and trace.exact.all()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> pt.Trace:
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    argv = sys.argv
    sys.argv = ["record_tiny_trace.py", "--out", str(out)]
    try:
        runpy.run_path(str(REPO / "experiments" / "record_tiny_trace.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return pt.load(out)


def test_script_regenerates_the_committed_trace_structure(regenerated, tiny_trace_path):
    committed = pt.load(tiny_trace_path)
    np.testing.assert_array_equal(regenerated.seq_offsets, committed.seq_offsets)
    np.testing.assert_array_equal(regenerated.phase, committed.phase)
    prefill = committed.phase == Phase.PREFILL  # seeded prompts; generated tokens depend on numerics
    np.testing.assert_array_equal(regenerated.token_ids[prefill], committed.token_ids[prefill])


def test_script_regenerates_the_committed_trace_exactly(regenerated, tiny_trace_path):
    committed = pt.load(tiny_trace_path)
    env = {k: committed.meta.get(k) for k in ("torch", "transformers", "machine")}
    here = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
    }
    if env != here:
        pytest.skip(f"bit-exact only with the recording environment {env}; this is {here}")
    for name, arr in committed.arrays().items():
        np.testing.assert_array_equal(regenerated.arrays()[name], arr, err_msg=name)
