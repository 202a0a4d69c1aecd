"""The synthetic generator: its statistics match its source within `synth.TOLERANCES`, the tolerances are
tight enough to reject a generator without the fitted structure, and other shapes keep the source's traits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import prophet.trace as pt
from prophet.errors import TraceError
from prophet.trace import Phase, stats, synth

# (sequences, tokens per sequence) generated per parameter set: about 2x the source's tokens, or more where
# cheap, so generation noise stays below the source's own
SIZES = {"mixtral-8x7b": (8, 169), "flame-moe-290m": (64, 64), "tiny-mixtral": (48, 53)}
SOURCES = {
    "mixtral-8x7b": "mixtral-8x7b_humaneval_decode.npz",
    "flame-moe-290m": "flame-moe-290m_prefill.npz",
}


def source_trace(name: str, request: pytest.FixtureRequest) -> pt.Trace:
    """The trace a parameter set was fitted on (the shared real traces are only asked for when needed)."""
    if name == "tiny-mixtral":
        return pt.load(request.getfixturevalue("tiny_trace_path"))
    return pt.load(request.getfixturevalue("shared_traces") / SOURCES[name])


@pytest.mark.parametrize("name", sorted(synth.BUILTIN))
def test_builtin_parameters_are_small_data(name):
    params = synth.builtin(name)
    assert params.popularity.shape == (params.num_layers, params.num_experts)
    np.testing.assert_allclose(params.popularity.sum(1), 1.0, rtol=1e-5)
    assert params.transition.shape == (params.num_layers - 1, params.num_experts, params.num_experts)
    assert set(params.source_stats) >= {"popularity", "reuse_rate", "next_layer_recall", "entropy_normalized"}


@pytest.mark.parametrize("name", sorted(synth.BUILTIN))
def test_generated_statistics_match_the_stored_source_statistics(name):
    # runs without the shared traces: the parameter file carries its source's statistics
    params = synth.builtin(name)
    gen = synth.generate(params, *SIZES[name], seed=0, progress=False)
    src = params.source_stats
    assert (
        np.abs(stats.popularity(gen) - np.array(src["popularity"])).sum(1).mean()
        <= synth.TOLERANCES["popularity_l1"]
    )
    assert (
        np.nanmean(np.abs(stats.reuse_rate(gen) - np.array(src["reuse_rate"])))
        <= synth.TOLERANCES["reuse_rate"]
    )
    recall = np.nanmean(stats.next_layer_recall(gen)) - np.nanmean(np.array(src["next_layer_recall"], float))
    assert abs(recall) <= synth.TOLERANCES["next_layer_recall"]
    assert (
        abs((stats.entropy(gen, True) - np.array(src["entropy_normalized"])).mean())
        <= synth.TOLERANCES["entropy"]
    )


@pytest.mark.parametrize("name", sorted(synth.BUILTIN))
def test_generated_statistics_match_the_source_trace(name, request):
    source = source_trace(name, request)
    metrics = synth.compare(source, synth.generate(synth.builtin(name), *SIZES[name], seed=1, progress=False))
    assert all(synth.within_tolerance(metrics).values()), metrics


def test_tolerances_reject_a_generator_without_temporal_and_cross_layer_structure(tiny_trace_path):
    params = synth.builtin("tiny-mixtral")
    flat = replace(params, coef=np.zeros_like(params.coef))  # popularity only
    metrics = synth.compare(
        pt.load(tiny_trace_path), synth.generate(flat, *SIZES["tiny-mixtral"], seed=1, progress=False)
    )
    verdict = synth.within_tolerance(metrics)
    assert not verdict["reuse_rate"] and not verdict["next_layer_recall"], metrics


@pytest.mark.parametrize("name", ["mixtral-8x7b", "tiny-mixtral"])
def test_shipped_parameters_are_what_fitting_the_source_gives(name, request):
    # the regeneration commands in prophet/trace/params/README.md reproduce the shipped files
    fitted = synth.fit(source_trace(name, request), name)
    shipped = synth.builtin(name)
    for field in ("popularity", "logit", "coef", "weight_conc", "weight_total"):
        np.testing.assert_allclose(
            getattr(fitted, field), getattr(shipped, field), rtol=1e-4, atol=1e-5, err_msg=field
        )
    np.testing.assert_allclose(
        fitted.transition, shipped.transition, rtol=2e-3, atol=1e-4
    )  # stored as float16


def test_generation_is_seeded():
    params = synth.builtin("tiny-mixtral")
    a, b, c = (synth.generate(params, 3, 20, seed=s, progress=False) for s in (4, 4, 5))
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.experts, c.experts)


def test_generated_trace_is_a_valid_trace(tmp_path):
    trace = synth.generate(synth.builtin("flame-moe-290m"), 3, [5, 9, 2], seed=0, progress=False)
    assert trace.sequence_lengths.tolist() == [5, 9, 2]
    assert (trace.phase == Phase.DECODE).all() and (trace.token_ids == -1).all()
    w = trace.weights
    assert (np.diff(w, axis=-1) <= 0).all() and (w > 0).all()  # sorted router weights, largest first
    again = pt.load(trace.save(tmp_path / "s"))
    np.testing.assert_array_equal(again.experts, trace.experts)


def test_mixtral_shaped_trace_for_the_benchmark_needs_no_recording():
    trace = synth.synthetic_trace(32, 8, 2, num_sequences=2, tokens_per_sequence=64, seed=0)
    assert trace.experts.shape == (128, 32, 2) and trace.num_experts == 8
    assert synth.for_shape(32, 8, 2).name == "mixtral-8x7b"  # the exact shape uses the Mixtral fit as is
    np.testing.assert_allclose(
        np.asarray(trace.weights).sum(-1), 1.0, atol=1e-5
    )  # Mixtral renormalizes top-2


@pytest.mark.parametrize(
    "base, shape",
    [("mixtral-8x7b", (16, 64, 8)), ("flame-moe-290m", (24, 8, 2)), ("flame-moe-290m", (8, 64, 4))],
    ids=["mixtral->olmoe-shape", "flame->8-experts", "flame->top-4"],
)
def test_adapted_shapes_keep_balance_and_structure(base, shape):
    params = synth.builtin(base)
    layers, experts, k = shape
    trace = synth.generate(params.adapt(layers, experts, k, seed=0), 32, 48, seed=0, progress=False)
    assert trace.experts.shape == (32 * 48, layers, k) and trace.num_experts == experts
    source_entropy = np.mean(params.source_stats["entropy_normalized"])
    assert abs(stats.entropy(trace, True).mean() - source_entropy) < 0.03  # popularity rank profile kept
    chance = k / experts
    assert np.nanmean(stats.reuse_rate(trace)) > chance  # temporal reuse kept
    pop = stats.popularity(trace)
    by_frequency = np.mean(
        [np.isin(trace.experts[:, layer], np.argsort(-pop[layer])[:k]).mean() for layer in range(1, layers)]
    )
    assert np.nanmean(stats.next_layer_recall(trace)) > by_frequency + 0.03  # cross-layer structure kept


def test_adapting_to_an_impossible_shape_is_an_error():
    with pytest.raises(TraceError, match="need 1 <= K <= E"):
        synth.builtin("tiny-mixtral").adapt(4, 4, 5)


def test_parameter_files_round_trip_and_bad_ones_are_named(tmp_path):
    params = synth.builtin("tiny-mixtral")
    again = synth.SynthParams.load(params.save(tmp_path / "p.npz"))
    np.testing.assert_allclose(again.logit, params.logit, rtol=1e-6)
    assert again.source_stats == params.source_stats
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TraceError, match=r"bad\.npz: not a readable synthetic-trace parameter file"):
        synth.SynthParams.load(tmp_path / "bad.npz")
    with pytest.raises(TraceError, match="no built-in synthetic parameters 'nope'"):
        synth.builtin("nope")
