"""The one decode step: exception safety, concurrent callers, sequence starts, and the host syncs it costs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_wrap import rel_diff, tiny_mixtral

import prophet
from prophet.config import PrefetchConfig
from prophet.predict import FrequencyPredictor, PathMatchPredictor
from prophet.wrap import reconfigure, runtime_of

LAYERS, EXPERTS, TOP_K = 2, 4, 2


def predictor() -> PathMatchPredictor:
    return PathMatchPredictor(LAYERS, EXPERTS, TOP_K)


def wrapped(slots: int = 3, with_predictor: bool = True):
    model = tiny_mixtral(seed=3)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    return with_cache(model, slots, predictor() if with_predictor else None), ids, ref


def with_cache(model, slots: int, pred):
    """``model`` wrapped with a shared pool of ``slots`` and ``pred`` prefetching (min_score gate only)."""
    prophet.wrap(model, device="cpu", cache_slots=slots)
    reconfigure(model, cache_slots=slots, predictor=pred, prefetch=PrefetchConfig(max_inflight=2))
    return model


class Boom(Exception):
    pass


def _fail_kernel(runtime, exc):
    real = runtime._kernel
    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second MoE layer of the call: the first left state behind
            raise exc
        return real(*args, **kwargs)

    runtime._kernel = kernel
    return lambda: setattr(runtime, "_kernel", real)


def _fail_copy(runtime, exc):
    engine = runtime.cache.engine
    real = engine.copy
    calls = []

    def copy(*args):
        calls.append(1)
        if len(calls) == 3:  # inside acquire, after other slots of the step were pinned
            raise exc
        return real(*args)

    engine.copy = copy
    return lambda: setattr(engine, "copy", real)


def _fail_observe(runtime, exc):
    pred = runtime.predictor
    real = pred.observe

    def observe(*args, **kwargs):
        raise exc

    pred.observe = observe
    return lambda: setattr(pred, "observe", real)


def _fail_prefetch(runtime, exc):
    cache = runtime.cache
    real = cache.prefetch

    def prefetch(*args):
        raise exc

    cache.prefetch = prefetch
    return lambda: setattr(cache, "prefetch", real)


FAULTS = {
    "kernel raises": _fail_kernel,  # compute issued for one layer, the next layer's kernel fails
    "copy fails mid-acquire": _fail_copy,  # an out-of-memory while loading a miss
    "predictor observe raises": _fail_observe,  # after release: the predictor saw half a step
    "prefetch raises": _fail_prefetch,  # while the step's experts are pinned
}


@pytest.mark.parametrize("exc", [Boom("boom"), KeyboardInterrupt(), RuntimeError("CUDA out of memory")],
                         ids=["exception", "keyboard-interrupt", "out-of-memory"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_step_that_raises_releases_its_pins_and_the_next_call_is_right(fault, exc):
    model, ids, ref = wrapped()
    runtime = runtime_of(model)
    with torch.no_grad():
        model(ids)  # fill the cache and the predictor
        undo = FAULTS[fault](runtime, exc)
        with pytest.raises(type(exc)):
            model(ids)
        undo()
        assert runtime.cache.pinned() == 0
        _assert_consistent(runtime.cache)
        for _ in range(2):
            assert rel_diff(model(ids).logits, ref) <= 1e-5
    assert runtime.cache.pinned() == 0


def _assert_consistent(cache) -> None:
    for pool in cache.pools:
        for key, s in pool.slot_of.items():
            assert pool.slots[s].key == key
        held = {s for s in range(pool.num_slots) if pool.slots[s].key is not None}
        assert held == set(pool.slot_of.values())
        assert sorted(pool.free) == sorted(set(range(pool.num_slots)) - held)


def test_concurrent_callers_are_serialized_and_both_get_right_answers():
    model, ids, ref = wrapped(slots=2)
    other = torch.randint(0, 96, (1, 5))
    unwrapped = tiny_mixtral(seed=3)
    with torch.no_grad():
        ref_other = unwrapped(other).logits
    errors: list[BaseException] = []

    def call(x, want):
        try:
            with torch.no_grad():
                for _ in range(4):
                    assert rel_diff(model(x).logits, want) <= 1e-5
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=a) for a in ((ids, ref), (other, ref_other), (ids, ref))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert runtime_of(model).cache.pinned() == 0


class Counting(FrequencyPredictor):
    def __init__(self) -> None:
        super().__init__(LAYERS, EXPERTS, TOP_K)
        self.resets = 0

    def reset(self) -> None:
        super().reset()
        self.resets += 1


def test_predictors_reset_where_each_generation_starts_not_at_every_token():
    model = tiny_mixtral(seed=4)
    pred = Counting()
    prophet.wrap(model, device="cpu", cache_slots=3, predictor=pred)
    ids = torch.randint(0, 96, (1, 4))
    for n in (1, 2):
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert pred.resets == n
    with torch.no_grad():
        model(ids)  # no cache: a sequence of its own
    assert pred.resets == 3


# ---- host syncs -------------------------------------------------------------------------------------------
_SYNCING_METHODS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextmanager
def counting_syncs(device: str = "cpu") -> Iterator[list[str]]:
    """Record every call that makes the host wait for ``device``: host reads of its tensors, unique, and explicit
    synchronizations. On a CPU device the step's one read of its ids (`numpy`) stands for the sync it is on CUDA."""
    seen: list[str] = []
    patches = []

    def spy(owner, name):
        real = getattr(owner, name)
        tensor_method = owner is torch.Tensor

        def wrapper(*args, **kwargs):
            if not tensor_method or args[0].device.type == device:
                seen.append(name)
            return real(*args, **kwargs)

        patches.append((owner, name, real))
        setattr(owner, name, wrapper)

    for name in _SYNCING_METHODS:
        spy(torch.Tensor, name)
    spy(torch, "unique")
    spy(torch.cuda, "synchronize")
    spy(torch.cuda.Event, "synchronize")
    spy(torch.cuda.Stream, "synchronize")
    try:
        yield seen
    finally:
        for owner, name, real in reversed(patches):
            setattr(owner, name, real)


def dense_experts(hidden, slot_ids, weights, w1, w2, fmt, b1=None, b2=None, quant=None):
    """Sync-free expert math (a gather of each pair's weights): keeps the kernel's own syncs out of the count."""
    h = torch.einsum("th,tknh->tkn", hidden.float(), w1[slot_ids].float())  # [T, k, 2I]
    gate, up = h[..., : fmt.intermediate_size], h[..., fmt.intermediate_size :]
    y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2[slot_ids].float())  # [T, k, H]
    return (y * weights[..., None].float()).sum(1).to(hidden.dtype)


def syncs_per_layer(model, ids, device: str = "cpu") -> list[int]:
    """Syncs counted in each MoE layer step of three forwards; on CUDA torch's sync debug mode also raises on
    any implicit sync (item, nonzero, pageable copies...) and the real kernels run."""
    runtime = runtime_of(model)
    if device == "cpu":
        runtime._kernel = dense_experts
    real = runtime.run_layer
    counts = []

    def run_layer(*args):
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with counting_syncs(device) as seen:
                out = real(*args)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        counts.append(len(seen))
        return out

    runtime.run_layer = run_layer
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    return counts


@pytest.mark.parametrize("batch", [1, 8])
def test_a_cached_step_syncs_once_and_a_resident_one_never(batch):
    ids = torch.randint(0, 96, (batch, 1))
    model = with_cache(tiny_mixtral(seed=5), 3, predictor())
    cached = syncs_per_layer(model, ids)
    assert cached and max(cached) == 1  # the pinned copy of the ids, shared by dedup and the predictor
    reconfigure(model, cache_slots=LAYERS * EXPERTS, predictor=predictor())
    resident = syncs_per_layer(model, ids)
    assert resident and max(resident) == 0


def test_waves_add_no_sync():
    model = prophet.wrap(tiny_mixtral(seed=6), device="cpu", slots_per_layer=1)
    assert max(syncs_per_layer(model, torch.randint(0, 96, (4, 2)))) == 1
    assert prophet.stats(model).total.waves > 0


def test_the_dense_test_kernel_matches_the_reference():
    from prophet.kernels.moe import moe_experts_reference

    runtime = runtime_of(prophet.wrap(tiny_mixtral(seed=7), device="cpu"))
    views = runtime.cache.views(0)
    hidden = torch.randn(5, 32)
    slot_ids = torch.from_numpy(np.random.default_rng(0).integers(0, EXPERTS, (5, 2)))
    weights = torch.rand(5, 2)
    args = (hidden, slot_ids, weights, views["w1"], views["w2"], runtime.fmt)
    assert torch.allclose(dense_experts(*args), moe_experts_reference(*args), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [3, LAYERS * EXPERTS], ids=["cached", "resident"])
def test_on_cuda_the_step_syncs_at_most_once_and_never_when_resident(slots):
    model = prophet.wrap(tiny_mixtral(seed=8).to("cuda"), device="cuda", cache_slots=slots)
    counts = syncs_per_layer(model, torch.randint(0, 96, (2, 1), device="cuda"), device="cuda")
    assert counts and max(counts) == (0 if slots == LAYERS * EXPERTS else 1)  # the event wait on the id copy
