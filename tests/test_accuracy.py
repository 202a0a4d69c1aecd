"""bf16 honesty (issue 13, item 7): in bf16 a wrapped model is no further from the fp32 model than the
unwrapped model is, for every family's tiny model; in fp32 the two agree to 1e-5.

Two measures (`prophet.accuracy`): each MoE layer's experts output on identical inputs, where only the
experts' own rounding differs (Prophet accumulates in fp32 and rounds once, so it is closer, within a 10%
tolerance); and the logits, where a router near a tie can pick another expert in either model, so one input
can favour either side: there the mean over the families is held to the unwrapped mean (5% tolerance).
Full numbers: ``experiments/accuracy/bf16_error.py`` -> ``experiments/results/bf16_error.json``.
"""

import pytest
import torch

from prophet.accuracy import PrecisionReport, precision_report
from prophet.models.registry import list_specs

FAMILIES = {}
for _spec in list_specs():
    FAMILIES.setdefault(_spec.model_type, _spec)


def _report(name: str, dtype: torch.dtype, **cache: int) -> PrecisionReport:
    model = FAMILIES[name].tiny_model(seed=0)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :4]
    return precision_report(model, dtype, inputs, device="cpu", **(cache or {"slots_per_layer": 1}))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()  # tiny models gain nothing from threads; a busy host loses from them
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bf16() -> dict[str, PrecisionReport]:
    return {name: _report(name, torch.bfloat16) for name in sorted(FAMILIES)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_experts_are_no_further_from_fp32_than_the_models_own(bf16, name):
    r = bf16[name]
    assert r.experts_wrapped_rms <= 1.1 * r.experts_unwrapped_rms, r


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_experts_in_one_pass_are_closer_to_fp32_than_the_models_own(name):
    # every expert resident: one pass per layer, partial sums meet in fp32 (with one slot per layer a step runs
    # in waves whose outputs are summed in the model's dtype, which is why the test above needs its tolerance)
    r = _report(name, torch.bfloat16, slots_per_layer=64)
    assert r.experts_wrapped_rms < r.experts_unwrapped_rms, r


def test_bf16_logits_are_no_further_from_fp32_than_unwrapped_on_average(bf16):
    wrapped = sum(r.wrapped_rms for r in bf16.values()) / len(bf16)
    unwrapped = sum(r.unwrapped_rms for r in bf16.values()) / len(bf16)
    assert wrapped <= 1.05 * unwrapped, bf16


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_fp32_wrapped_equals_unwrapped(name):
    r = _report(name, torch.float32)
    assert r.between_max <= 1e-5 and r.wrapped_max <= 1e-5 and r.argmax_agreement == 1.0
