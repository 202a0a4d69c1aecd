"""`prophet.wrap` keeps a model's outputs exact, at any cache size, and `unwrap` restores it bit for bit."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

import prophet
from prophet.errors import (
    AlreadyWrappedError,
    CapacityError,
    ConfigError,
    DeviceError,
    DtypeError,
    ProphetError,
)
from prophet.wrap import runtime_of


def tiny_mixtral(seed: int = 0, experts: int = 4, layers: int = 2) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cache", [{}, {"slots_per_layer": 2}, {"slots_per_layer": 1}, {"cache_slots": 3}])
def test_wrapped_logits_equal_unwrapped(cache):
    model = tiny_mixtral()
    ids = torch.randint(0, 96, (3, 9))
    with torch.no_grad():
        ref = model(ids).logits
        prophet.wrap(model, device="cpu", **cache)
        out = model(ids).logits
    assert rel_diff(out, ref) <= 1e-5


def test_waves_are_counted_when_a_step_needs_more_experts_than_slots():
    model = prophet.wrap(tiny_mixtral(), device="cpu", slots_per_layer=1)
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 8)))
    assert prophet.stats(model).total.waves > 0


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_generation_is_identical(batch):
    model = tiny_mixtral(seed=1)
    ids = torch.randint(0, 96, (batch, 5))
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    prophet.wrap(model, device="cpu", slots_per_layer=1)
    assert torch.equal(model.generate(ids, **kwargs), ref)


def test_unwrap_restores_parameters_bit_for_bit():
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    prophet.wrap(model, device="cpu", cache_slots=2)
    assert not any("experts" in k for k in model.state_dict())  # experts left the model
    prophet.unwrap(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_stats_count_every_lookup():
    model = prophet.wrap(tiny_mixtral(), device="cpu", slots_per_layer=3)  # 3 of 4: the step-by-step cache
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 1)))
        model(torch.randint(0, 96, (1, 1)))
    st = prophet.stats(model)
    lookups = st.total.hits + st.total.misses
    assert 2 * 2 * 1 <= lookups <= 2 * 2 * 2  # 2 steps x 2 layers x (1 or 2 distinct experts)
    assert "hit rate" in st.table()
    assert st.to_dict()["total"]["bytes_h2d"] == st.total.misses * st.slot_bytes


def test_a_cache_that_holds_every_expert_runs_without_the_host_and_counts_the_same_hits():
    ids = [torch.randint(0, 96, (3, 5)) for _ in range(3)]
    runs = {}
    for slots in (7, 8):  # 8 = 2 layers x 4 experts: everything resident, remapped on the device
        model = tiny_mixtral(seed=4)
        with torch.no_grad():
            ref = [model(x).logits for x in ids]
            prophet.wrap(model, device="cpu", cache_slots=slots)
            outs = [model(x).logits for x in ids]
        assert all(rel_diff(o, r) <= 1e-5 for o, r in zip(outs, ref, strict=True))
        runs[slots] = (runtime_of(model), prophet.stats(model))
    (partial, st7), (resident, st8) = runs[7], runs[8]
    assert partial._resident is None and resident._resident is not None
    assert st8.total.misses == 0 and st8.total.bytes_h2d == 8 * st8.slot_bytes  # each expert copied once, up front
    assert st8.total.hits == st7.total.hits + st7.total.misses  # one count per distinct expert per step, as before
    assert [s.hits for s in st8.layers] == [a.hits + a.misses for a in st7.layers]


def test_resident_layers_treat_no_expert_ids_like_the_step_by_step_cache():
    resident = runtime_of(prophet.wrap(tiny_mixtral(seed=5), device="cpu"))
    stepwise = runtime_of(prophet.wrap(tiny_mixtral(seed=5), device="cpu", slots_per_layer=3))
    assert resident._resident is not None and stepwise._resident is None
    hidden = torch.randn(3, 32)
    index = torch.tensor([[0, 1], [2, 4], [-1, 3]])  # 4 and -1 mean "no expert" (4 = E)
    weights = torch.rand(3, 2)
    out = resident.run_layer(0, hidden, index, weights)
    assert torch.allclose(out, stepwise.run_layer(0, hidden, index, weights), atol=1e-6)
    assert resident.stats().layers[0].hits == 4  # experts 0-3, each once


# ---- bad input ---------------------------------------------------------------------------------------------


def test_dense_model_is_refused():
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(prophet.UnsupportedModelError, match="mixtral"):
        prophet.wrap(MistralForCausalLM(cfg), device="cpu")


def test_wrapping_twice_is_refused():
    model = prophet.wrap(tiny_mixtral(), device="cpu")
    with pytest.raises(AlreadyWrappedError, match="unwrap"):
        prophet.wrap(model, device="cpu")


def test_unwrapping_an_unwrapped_model_is_refused():
    with pytest.raises(ProphetError, match="not wrapped"):
        prophet.unwrap(tiny_mixtral())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"cache_slots": 0}, ConfigError, "cache_slots=0"),
        ({"cache_slots": 2, "slots_per_layer": 2}, ConfigError, "only one of"),
        ({"cache_bytes": 10}, CapacityError, "smaller than one expert"),
        ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:99"}, DeviceError, "device="),
        ({"device": "tpu"}, DeviceError, "device="),
    ],
)
def test_bad_options_say_what_to_change(kwargs, error, words):
    model = tiny_mixtral()
    with pytest.raises(error, match=words):
        prophet.wrap(model, **({"device": "cpu"} | kwargs))
    assert not hasattr(model, "_prophet_runtime")  # a refused wrap leaves the model as it was


def test_unsupported_dtype_is_refused():
    with pytest.raises(DtypeError, match="bfloat16"):
        prophet.wrap(tiny_mixtral().double(), device="cpu")


# ---- CUDA: the same contract with side-stream copies and pinned host memory --------------------------------


class _NextLayerOracle:
    """Predicts exactly the experts a recorded run used next (to check prefetch plumbing on the GPU)."""

    def __init__(self, future: list[list[int]], layers: int) -> None:
        self.future, self.layers, self.step = future, layers, 0

    def observe(self, layer, expert_ids, weights, hidden=None):
        self.step += 1

    def predict(self):
        from prophet.predict.base import Prediction

        if self.step >= len(self.future):
            return []
        layer = self.step % self.layers
        target = layer if layer > (self.step - 1) % self.layers else layer + self.layers
        return [Prediction(target, e, 1.0) for e in self.future[self.step]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_wrapped_logits_match(dtype, tol):
    model = tiny_mixtral().to(dtype)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref = model.to("cuda")(ids.cuda()).logits.float()
        model.to("cpu")
        prophet.wrap(model, device="cuda", slots_per_layer=1)
        out = model(ids.cuda()).logits.float()
    assert rel_diff(out, ref) <= tol
    assert runtime_of(model).store.pinned


@pytest.mark.gpu
def test_cuda_prefetch_turns_misses_into_hits():
    model = tiny_mixtral(experts=8, layers=2)
    ids = torch.randint(0, 96, (1, 1))
    routes: list[list[int]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: routes.append(sorted(set(args[1].flatten().tolist()))))
        for m in (model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts)
    ]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for h in hooks:
        h.remove()
    plain = prophet.wrap(tiny_mixtral(experts=8, layers=2), device="cuda", slots_per_layer=3)
    oracle = prophet.wrap(model, device="cuda", slots_per_layer=3, predictor=_NextLayerOracle(routes, 2))
    with torch.no_grad():
        out = oracle.generate(ids.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
        plain.generate(ids.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out.cpu(), ref)
    assert prophet.stats(oracle).total.prefetch_hits > 0
    assert prophet.stats(oracle).total.misses < prophet.stats(plain).total.misses


def test_recorded_trace_fits_a_predictor_that_prefetches_for_the_wrapped_model(tmp_path):
    # The whole loop on one model: record its routing, fit a predictor, run it wrapped with that predictor
    # driving prefetch and eviction. Outputs stay exact; predicted experts arrive before they are needed.
    from prophet.predict import CoOccurrencePredictor
    from prophet.predict.data import as_router_trace
    from prophet.trace import load, record

    model = tiny_mixtral(seed=3, experts=8, layers=4)
    prompts = torch.randint(0, 96, (4, 6))
    gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with record(model, tmp_path / "trace"):
        ref = model.generate(prompts, **gen)
    predictor = CoOccurrencePredictor(4, 8, 2).fit([as_router_trace(load(tmp_path / "trace"))])
    prophet.wrap(model, device="cpu", slots_per_layer=3, predictor=predictor, policy=predictor.policy_factory())
    outs = []
    for row in prompts:  # batch 1, as the predictor was fitted per sequence
        predictor.reset()
        outs.append(model.generate(row[None], **gen)[0])
    assert all(torch.equal(o, r) for o, r in zip(outs, ref, strict=True))
    st = prophet.stats(model).total
    assert st.prefetches > 0 and st.prefetch_hits > 0


def test_the_runtime_measures_layer_and_copy_times_for_the_link_budget():
    from prophet.predict import CoOccurrencePredictor

    model = tiny_mixtral(experts=8, layers=3)
    predictor = CoOccurrencePredictor(3, 8, 2)
    prophet.wrap(model, device="cpu", slots_per_layer=4, predictor=predictor)
    with torch.no_grad():
        model.generate(torch.randint(0, 96, (1, 4)), max_new_tokens=12, do_sample=False, pad_token_id=0)
    runtime = runtime_of(model)
    assert runtime.prefetcher.config.auto_budget
    assert runtime.prefetcher.layer_ms > 0 and runtime.cache.engine.mean_copy_ms() > 0
    assert 0 < runtime.prefetcher.threshold(1) < 1 and prophet.stats(model).total.prefetches > 0


@pytest.mark.gpu
def test_cuda_copy_engine_times_its_copies():
    from prophet.transfer import CudaCopyEngine

    engine = CudaCopyEngine(torch.device("cuda"))
    src = torch.empty(32 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    assert engine.mean_copy_ms() is None
    engine.finish(engine.copy(dst, src, 0))
    ms = engine.mean_copy_ms()
    assert ms is not None and 0.1 < ms < 100  # 32 MiB over PCIe: about 0.6 ms at 52 GB/s


def test_layer_times_for_the_link_budget_leave_out_steps_that_waited_for_copies():
    import time

    from prophet.predict import CoOccurrencePredictor
    from prophet.transfer import SyncCopyEngine

    class SlowLink(SyncCopyEngine):
        def copy(self, dst, src, slot):
            time.sleep(0.1)  # every copy stalls the step that waits for it by 100 ms
            return super().copy(dst, src, slot)

    model = prophet.wrap(tiny_mixtral(experts=8, layers=4), device="cpu", slots_per_layer=6,
                         predictor=CoOccurrencePredictor(4, 8, 2))
    runtime = runtime_of(model)
    runtime.cache.engine = SlowLink()
    samples = []
    observe = runtime.prefetcher.observe_layer
    runtime.prefetcher.observe_layer = lambda seconds, tokens=1: (samples.append(seconds), observe(seconds, tokens))
    with torch.no_grad():
        model.generate(torch.randint(0, 96, (1, 3)), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert prophet.stats(model).total.misses > 0 and len(samples) >= 3
    assert max(samples) < 0.08  # no sample holds a 100 ms copy (a layer step takes about 10 ms here)
