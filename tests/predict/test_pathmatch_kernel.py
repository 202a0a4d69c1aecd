"""The compiled path-matching kernel's loading and state: no compiler means the numpy paths, a copy of a
predictor mid-token continues as the original, and `prophet.native` builds a library once per source."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from predict_helpers import random_trace

from prophet import native
from prophet.errors import ConfigError
from prophet.predict import PathMatchPredictor, pathmatch_kernel
from prophet.predict.pathmatch import PathMatchReference


def _steps(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int) -> list[np.ndarray]:
    return [rng.permutation(experts)[:k][None] for _ in range(tokens * layers)]


def _run(p: PathMatchReference, steps: list[np.ndarray], layers: int) -> list[np.ndarray]:
    out = []
    for i, ids in enumerate(steps):
        p.observe(i % layers, ids, None)
        out.append(p.scores([1, 2, layers + 1]))
    return out


def test_no_compiler_means_the_numpy_paths(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PROPHET_NATIVE", "1")
    monkeypatch.setenv("PROPHET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._load.cache_clear()
    try:
        assert native.library("pathmatch") is None
        assert "pathmatch off" in caplog.text
        rng = np.random.default_rng(0)
        fit = random_trace(rng, 30, 3, 6, 2, seqs=2)
        fast, ref = PathMatchPredictor(3, 6, 2).fit([fit]), PathMatchReference(3, 6, 2).fit([fit])
        assert fast._kernel is None
        steps = _steps(rng, 8, 3, 6, 2)
        for got, want in zip(_run(fast, steps, 3), _run(ref, steps, 3), strict=True):
            np.testing.assert_array_equal(got, want)  # the numpy fast path: bit for bit
    finally:
        native._load.cache_clear()


def test_a_copy_mid_token_continues_as_the_original():
    if pathmatch_kernel.library() is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    rng = np.random.default_rng(1)
    fit = random_trace(rng, 40, 4, 8, 2, seqs=2)
    p = PathMatchPredictor(4, 8, 2, max_online=6).fit([fit])
    _run(p, _steps(rng, 5, 4, 8, 2)[:-2], 4)  # stop inside a token
    assert PathMatchPredictor(4, 8, 2, native=False)._kernel is None  # asked for the numpy paths
    twins = [copy.deepcopy(p), pickle.loads(pickle.dumps(p))]
    assert all(t._kernel is not None for t in twins)
    rest = _steps(rng, 9, 4, 8, 2)[2:]
    want = _run(p, rest, 4)
    for twin in twins:
        for got, w in zip(_run(twin, rest, 4), want, strict=True):
            np.testing.assert_array_equal(got, w)
        np.testing.assert_array_equal(twin.mem, p.mem)


def test_the_library_is_built_once_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("PROPHET_NATIVE", "1")
    monkeypatch.setenv("PROPHET_CACHE_DIR", str(tmp_path))
    native._load.cache_clear()
    try:
        if native.library("pathmatch") is None:
            pytest.skip("no C compiler here")
        built = list(tmp_path.glob("pathmatch-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # the temporary folder is gone
        native._load.cache_clear()
        assert native.library("pathmatch") is not None
        assert list(tmp_path.glob("pathmatch-*.so")) == built  # found, not rebuilt
    finally:
        native._load.cache_clear()


def test_an_id_past_the_experts_raises_and_changes_nothing():
    if pathmatch_kernel.library() is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    fit = random_trace(np.random.default_rng(2), 10, 2, 4, 2)
    for bad in ([[1, 4]], [[0, 1, 9]]):
        p = PathMatchPredictor(2, 4, 2).fit([fit])
        p.observe(0, np.array([[1, 2]]), None)
        before = p.sim.copy()
        with pytest.raises(ConfigError, match="4 experts"):
            p.observe(1, np.array(bad), None)
        np.testing.assert_array_equal(p.sim, before)


def _ids_from_mem(p: PathMatchPredictor) -> np.ndarray:
    """``row_ids`` as the dense memory says: each (layer, row)'s nonzero entries, ascending, -1 padded."""
    layers, _, cap = p.mem.shape
    want = np.full((layers, cap, p.top_k + 1), -1, np.int16)
    for layer, r in np.ndindex(layers, cap):
        nz = np.flatnonzero(p.mem[layer, :, r])
        want[layer, r, : len(nz)] = nz
    return want


@pytest.mark.parametrize("native_on", [True, False])
def test_the_sparse_row_ids_follow_the_dense_memory(native_on):
    rng = np.random.default_rng(3)
    p = PathMatchPredictor(4, 8, 2, max_online=5, native=native_on).fit([random_trace(rng, 40, 4, 8, 2, seqs=3)])
    np.testing.assert_array_equal(p.row_ids, _ids_from_mem(p))
    steps = _steps(rng, 14, 4, 8, 2)
    for i, ids in enumerate(steps):
        p.observe(i % 4, ids, None)
        if i % 9 == 6:
            p.reset()  # a token cut short: its unseen layers are rows that neither match nor vote
        if i % 4 == 3:
            np.testing.assert_array_equal(p.row_ids, _ids_from_mem(p))  # after stores and forgetting
    assert p.size - p.fitted <= 5 < 14  # the online window slid


def test_the_sparse_votes_are_the_dense_votes_bit_for_bit():
    if pathmatch_kernel.library() is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    rng = np.random.default_rng(4)
    sparse = PathMatchPredictor(4, 16, 3, max_online=6).fit([random_trace(rng, 60, 4, 16, 3, seqs=2)])
    dense = copy.deepcopy(sparse)
    dense.row_ids, dense._kernel.bound = None, None  # the kernel's dense loop over mem
    steps = _steps(rng, 10, 4, 16, 3)
    for got, want in zip(_run(sparse, steps, 4), _run(dense, steps, 4), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sparse._kernel.params[pathmatch_kernel._ROWIDS] and not dense._kernel.params[pathmatch_kernel._ROWIDS]


@pytest.mark.parametrize("native_on", [True, False])
def test_a_row_wider_than_top_k_turns_the_sparse_ids_off(native_on):
    rng = np.random.default_rng(5)
    fit = random_trace(rng, 30, 3, 8, 2)
    p, ref = PathMatchPredictor(3, 8, 2, native=native_on).fit([fit]), PathMatchReference(3, 8, 2).fit([fit])
    steps = _steps(rng, 1, 3, 8, 3) + _steps(rng, 3, 3, 8, 2)  # one token routed to 3 experts, not top_k=2
    for got, want in zip(_run(p, steps, 3), _run(ref, steps, 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)  # the kernel sums in its own order
    assert p.row_ids is None
