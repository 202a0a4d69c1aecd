"""Bad input to the API gives a `ProphetError` that says what to change, and leaves the model exactly as it was;
a fault in the middle of `wrap` puts the model back bit for bit (issue 13, items 2, 4 and 8)."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

import prophet
from prophet.cache import ExpertCache
from prophet.config import CacheConfig, ProphetConfig
from prophet.errors import (
    AlreadyWrappedError,
    CapacityError,
    ConfigError,
    DeviceError,
    DtypeError,
    PlanError,
    ProphetError,
    UnsupportedModelError,
)
from prophet.policies import LRU
from prophet.predict import EnsemblePredictor, FrequencyPredictor, PathMatchPredictor, ReusePredictor
from prophet.store import HostStore
from prophet.wrap import is_wrapped, reconfigure, runtime_of

L, E, K = 2, 4, 2  # the tiny model's MoE layers, experts, top-k


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


class Snapshot:
    """Everything `wrap` could change: parameters and buffers (values, dtypes, devices) and module objects."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = dict(model.named_modules())
        self.ids = torch.randint(0, 64, (2, 5))
        with torch.no_grad():
            self.logits = model(self.ids).logits

    def assert_unchanged(self, model: torch.nn.Module) -> None:
        assert not is_wrapped(model)
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        for k, v in self.state.items():
            assert state[k].dtype == v.dtype and state[k].device == v.device and torch.equal(state[k], v), k
        assert dict(model.named_modules()) == self.modules  # the same module objects, none swapped
        with torch.no_grad():
            assert torch.equal(model(self.ids).logits, self.logits)


class NotAPredictor:
    def observe(self, *args: object) -> None: ...


class Shaped:
    """Quacks like a predictor, with the shape attributes given."""

    def __init__(self, **shape: int) -> None:
        self.__dict__.update(shape)

    def observe(self, *args: object) -> None: ...

    def predict(self) -> list:
        return []


def _raises() -> LRU:
    raise RuntimeError("factory broke")


# name -> (wrap keyword arguments, the error expected); each is one bad input a user could type.
BAD_WRAP = {
    # devices
    "device tpu": ({"device": "tpu"}, DeviceError),
    "device cuda without CUDA": ({"device": "cuda"}, DeviceError),
    "device cuda:7 without CUDA": ({"device": "cuda:7"}, DeviceError),
    "device gibberish": ({"device": "gpu please"}, DeviceError),
    "device a float": ({"device": 3.5}, DeviceError),
    "device meta": ({"device": "meta"}, DeviceError),
    # cache sizes
    "cache_slots zero": ({"cache_slots": 0}, ConfigError),
    "cache_slots negative": ({"cache_slots": -1}, ConfigError),
    "cache_slots fraction": ({"cache_slots": 1.5}, ConfigError),
    "cache_slots text": ({"cache_slots": "3"}, ConfigError),
    "cache_slots bool": ({"cache_slots": True}, ConfigError),
    "cache_slots list": ({"cache_slots": [3]}, ConfigError),
    "slots_per_layer zero": ({"slots_per_layer": 0}, ConfigError),
    "slots_per_layer negative": ({"slots_per_layer": -2}, ConfigError),
    "slots_per_layer float": ({"slots_per_layer": 2.0}, ConfigError),
    "slots_per_layer text": ({"slots_per_layer": "2"}, ConfigError),
    "slots_per_layer False": ({"slots_per_layer": False}, ConfigError),
    "cache_bytes zero": ({"cache_bytes": 0}, ConfigError),
    "cache_bytes negative": ({"cache_bytes": -5}, ConfigError),
    "cache_bytes below one expert": ({"cache_bytes": 10}, CapacityError),
    "cache_bytes float": ({"cache_bytes": 1e9}, ConfigError),
    "cache_bytes text": ({"cache_bytes": "1GB"}, ConfigError),
    "two sizes: slots and per layer": ({"cache_slots": 2, "slots_per_layer": 1}, ConfigError),
    "two sizes: slots and bytes": ({"cache_slots": 2, "cache_bytes": 10**6}, ConfigError),
    "three sizes": ({"cache_slots": 2, "slots_per_layer": 1, "cache_bytes": 10**6}, ConfigError),
    # policies
    "policy unknown": ({"policy": "bogus"}, ConfigError),
    "policy prophet without a factory": ({"policy": "prophet"}, ConfigError),
    "policy belady (needs the future)": ({"policy": "belady"}, ConfigError),
    "policy upper case": ({"policy": "LRU"}, ConfigError),
    "policy a number": ({"policy": 3}, ConfigError),
    "policy None": ({"policy": None}, ConfigError),
    "policy an instance, not a factory": ({"policy": LRU()}, ConfigError),
    "policy factory returns a non-policy": ({"policy": lambda: 3}, ConfigError),
    "policy factory needs an argument": ({"policy": lambda size: LRU()}, ConfigError),
    "policy factory raises": ({"policy": _raises}, ConfigError),
    # predictors: wrong shape, fitted on another model, or not a predictor at all
    "predictor with more layers": ({"predictor": FrequencyPredictor(L + 30, E, K)}, ConfigError),
    "predictor with fewer layers": ({"predictor": FrequencyPredictor(1, E, K)}, ConfigError),
    "predictor with more experts": ({"predictor": PathMatchPredictor(L, 8, K)}, ConfigError),
    "predictor with fewer experts": ({"predictor": ReusePredictor(L, 3, K)}, ConfigError),
    "predictor with another top-k": ({"predictor": FrequencyPredictor(L, E, 1)}, ConfigError),
    "predictor of Mixtral-8x7B's shape": ({"predictor": FrequencyPredictor(32, 8, 2)}, ConfigError),
    "ensemble of another shape": ({"predictor": EnsemblePredictor([ReusePredictor(3, E, K)])}, ConfigError),
    "predictor class, not instance": ({"predictor": FrequencyPredictor}, ConfigError),
    "predictor name as text": ({"predictor": "pathmatch"}, ConfigError),
    "predictor a plain object": ({"predictor": object()}, ConfigError),
    "predictor a dict": ({"predictor": {"observe": 1}}, ConfigError),
    "predictor without predict": ({"predictor": NotAPredictor()}, ConfigError),
    "duck predictor of the wrong shape": ({"predictor": Shaped(num_layers=L, num_experts=16)}, ConfigError),
    "duck predictor with text shape": ({"predictor": Shaped(num_layers="2")}, ConfigError),
    # config objects
    "config with cache_slots": ({"config": ProphetConfig(), "cache_slots": 2}, ConfigError),
    "config with a policy": ({"config": ProphetConfig(), "policy": "lfu"}, ConfigError),
    "config as text": ({"config": "fast"}, ConfigError),
    "config as dict": ({"config": {"cache": {"cache_slots": 2}}}, ConfigError),
    "config with belady policy": ({"config": ProphetConfig(cache=CacheConfig(policy="belady"))}, ConfigError),
    # memory plan
    "max_context zero": ({"max_context": 0, "gpu": "h100-sxm"}, PlanError),
    "max_context negative": ({"max_context": -4, "gpu": "h100-sxm"}, PlanError),
    "max_context text": ({"max_context": "4k", "gpu": "h100-sxm"}, ConfigError),
    "max_context fraction": ({"max_context": 1.5, "gpu": "h100-sxm"}, ConfigError),
    "max_context with cache_slots": ({"max_context": 64, "gpu": "h100-sxm", "cache_slots": 2}, ConfigError),
    "max_context with config": ({"max_context": 64, "gpu": "h100-sxm", "config": ProphetConfig()}, ConfigError),
    "max_context on the CPU without gpu": ({"max_context": 64}, ConfigError),
    "gpu profile unknown": ({"max_context": 64, "gpu": "rtx-9090"}, PlanError),
    "gpu bytes negative": ({"max_context": 64, "gpu": -1}, PlanError),
    "gpu too small for the plan": ({"max_context": 64, "gpu": 1000}, PlanError),
    "batch zero": ({"max_context": 64, "gpu": "h100-sxm", "batch": 0}, PlanError),
    "batch text": ({"max_context": 64, "gpu": "h100-sxm", "batch": "2"}, ConfigError),
    "batch without max_context": ({"batch": 4}, ConfigError),
    "gpu without max_context": ({"gpu": "h100-sxm"}, ConfigError),
    # adapters
    "adapter as text": ({"adapter": "mixtral"}, ConfigError),
    "adapter a plain object": ({"adapter": object()}, ConfigError),
}


@pytest.mark.parametrize("case", list(BAD_WRAP), ids=list(BAD_WRAP))
def test_bad_wrap_argument_is_refused_and_the_model_is_unchanged(case):
    kwargs, error = BAD_WRAP[case]
    model = tiny_mixtral()
    before = Snapshot(model)
    with pytest.raises(error) as info:
        prophet.wrap(model, **{"device": "cpu", **kwargs})
    assert isinstance(info.value, ProphetError) and len(str(info.value)) > 20
    before.assert_unchanged(model)
    prophet.wrap(model, device="cpu", slots_per_layer=1)  # and it still wraps
    with torch.no_grad():
        assert ((model(before.ids).logits - before.logits).abs().max() / before.logits.abs().max()) <= 1e-5


def _mistral() -> torch.nn.Module:
    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    return MistralForCausalLM(cfg).eval()


def _wrapped() -> torch.nn.Module:
    return prophet.wrap(tiny_mixtral(), device="cpu", slots_per_layer=1)


def _mixed_dtypes() -> torch.nn.Module:
    model = tiny_mixtral()
    model.model.layers[1].mlp.experts.to(torch.float16)
    return model


# name -> (model builder, the error expected): models wrap cannot take.
BAD_MODELS = {
    "a dense model": (_mistral, UnsupportedModelError),
    "already wrapped": (_wrapped, AlreadyWrappedError),
    "float64 experts": (lambda: tiny_mixtral().to(torch.float64), DtypeError),
    "experts of two dtypes": (_mixed_dtypes, DtypeError),
    "not a module": (lambda: "mixtral", ConfigError),
    "a bare nn.Linear": (lambda: torch.nn.Linear(2, 2), UnsupportedModelError),
}


@pytest.mark.parametrize("case", list(BAD_MODELS), ids=list(BAD_MODELS))
def test_a_model_wrap_cannot_take_is_refused(case):
    build, error = BAD_MODELS[case]
    with pytest.raises(error):
        prophet.wrap(build(), device="cpu")


# name -> call on an unwrapped model that needs a wrapped one
NOT_WRAPPED = {
    "unwrap": prophet.unwrap,
    "stats": prophet.stats,
    "runtime_of": runtime_of,
    "reconfigure": lambda m: reconfigure(m, cache_slots=2),
}


@pytest.mark.parametrize("case", list(NOT_WRAPPED), ids=list(NOT_WRAPPED))
def test_calls_on_an_unwrapped_model_say_wrap_first(case):
    with pytest.raises(ProphetError, match="wrap"):
        NOT_WRAPPED[case](tiny_mixtral())


# name -> reconfigure keyword arguments; the wrapped model must keep working after each.
BAD_RECONFIGURE = {
    "no size": {},
    "both sizes": {"cache_slots": 2, "slots_per_layer": 1},
    "zero slots": {"cache_slots": 0},
    "negative per layer": {"slots_per_layer": -1},
    "fraction": {"cache_slots": 1.5},
    "text": {"slots_per_layer": "1"},
    "policy unknown": {"cache_slots": 2, "policy": "mru"},
    "policy belady": {"cache_slots": 2, "policy": "belady"},
    "policy instance": {"cache_slots": 2, "policy": LRU()},
    "predictor of another shape": {"cache_slots": 2, "predictor": FrequencyPredictor(5, E, K)},
    "predictor not one": {"cache_slots": 2, "predictor": object()},
    "prefetch as dict": {"cache_slots": 2, "prefetch": {"enabled": False}},
}


@pytest.mark.parametrize("case", list(BAD_RECONFIGURE), ids=list(BAD_RECONFIGURE))
def test_bad_reconfigure_is_refused_and_the_model_keeps_working(case):
    model = tiny_mixtral()
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        ref = model(ids).logits
        prophet.wrap(model, device="cpu", slots_per_layer=1)
        with pytest.raises(ProphetError):
            reconfigure(model, **BAD_RECONFIGURE[case])
        assert ((model(ids).logits - ref).abs().max() / ref.abs().max()) <= 1e-5


# ---- faults in the middle of wrap -------------------------------------------------------------------------------


def fault(original, exc: BaseException, after: int = 0):
    """``original``, raising ``exc`` from its ``after + 1``-th call on (a function, so it binds as a method)."""
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise exc
        return original(*args, **kwargs)

    return patched


# where -> (object, attribute, calls that succeed first, wrap arguments)
FAULT_SITES = {
    "store, first expert": (HostStore, "write", 0, {"slots_per_layer": 2}),
    "store, second layer (first layer already freed)": (HostStore, "write", E + 1, {"slots_per_layer": 2}),
    "store, last expert": (HostStore, "write", L * E - 1, {"cache_slots": 3}),
    "slot allocation": (ExpertCache, "__init__", 0, {"slots_per_layer": 2}),
    "preloading every expert": (ExpertCache, "preload", 0, {}),
    "moving the model to the device": ("model", "to", 0, {"slots_per_layer": 2}),
}
FAULTS = {
    "interrupt": (KeyboardInterrupt(), KeyboardInterrupt),
    "out of memory": (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), CapacityError),
    "kernel error": (RuntimeError("an illegal memory access was encountered"), RuntimeError),
}


@pytest.mark.parametrize("kind", list(FAULTS), ids=list(FAULTS))
@pytest.mark.parametrize("site", list(FAULT_SITES), ids=list(FAULT_SITES))
def test_a_fault_inside_wrap_leaves_the_model_bit_identical(monkeypatch, site, kind):
    owner, attr, after, kwargs = FAULT_SITES[site]
    exc, expected = FAULTS[kind]
    model = tiny_mixtral()
    before = Snapshot(model)
    target = model if owner == "model" else owner
    monkeypatch.setattr(target, attr, fault(getattr(target, attr), exc, after))
    with pytest.raises(expected):
        prophet.wrap(model, device="cpu", **kwargs)
    monkeypatch.undo()
    before.assert_unchanged(model)
    prophet.wrap(model, device="cpu", slots_per_layer=1)
    with torch.no_grad():
        assert ((model(before.ids).logits - before.logits).abs().max() / before.logits.abs().max()) <= 1e-5
    prophet.unwrap(model)
    before.assert_unchanged(model)


@pytest.mark.gpu
def test_a_fault_after_the_model_moved_to_the_gpu_moves_it_back(monkeypatch):
    model = tiny_mixtral()
    before = Snapshot(model)
    monkeypatch.setattr(ExpertCache, "preload", fault(ExpertCache.preload, torch.OutOfMemoryError("oom")))
    with pytest.raises(CapacityError):
        prophet.wrap(model, device="cuda")
    monkeypatch.undo()
    before.assert_unchanged(model)


def test_out_of_memory_says_what_to_change(monkeypatch):
    monkeypatch.setattr(ExpertCache, "__init__", fault(ExpertCache.__init__, torch.OutOfMemoryError("out of memory")))
    with pytest.raises(CapacityError, match="the model is unchanged: give fewer cache_slots/slots_per_layer"):
        prophet.wrap(tiny_mixtral(), device="cpu", slots_per_layer=2)


@pytest.mark.parametrize("site", ["store, second layer (first layer already freed)", "slot allocation",
                                  "moving the model to the device"])
def test_a_fault_while_quantizing_leaves_the_original_weights(monkeypatch, site):
    # a quantized store cannot give the originals back, so they are freed only once wrap succeeded
    owner, attr, after, kwargs = FAULT_SITES[site]
    model = tiny_mixtral()
    before = Snapshot(model)
    target = model if owner == "model" else owner
    monkeypatch.setattr(target, attr, fault(getattr(target, attr), KeyboardInterrupt(), after))
    with pytest.raises(KeyboardInterrupt):
        prophet.wrap(model, device="cpu", expert_dtype="int8", **kwargs)
    monkeypatch.undo()
    before.assert_unchanged(model)
    prophet.wrap(model, device="cpu", expert_dtype="int8", slots_per_layer=1)
    assert all(p.numel() == 0 for layer in runtime_of(model).layers for p in layer.expert_parameters())
