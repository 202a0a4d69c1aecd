"""Readers of the routing serving engines return, each on a fixture written the way the engine documents it:

* vLLM: a completion response whose choices carry ``routed_experts`` [generated, MoE layers, top_k] and whose
  top level carries ``prompt_routed_experts`` [prompt, MoE layers, top_k] (docs: training/routed_experts_replay);
* SGLang: ``meta_info.routed_experts``, base64 of int32 ids reshaped to [-1, layers, top_k] (docs: R3 usage);
* MoE-Infinity: its tracer's ``np.save`` of per-sequence activation counts [capacity, MoE layers, experts].
Malformed input raises `TraceError` naming the file and what is wrong."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

import prophet.trace as pt
from prophet.errors import TraceError
from prophet.models.registry import get_spec
from prophet.trace import Phase, TraceModel
from prophet.trace.engines import read_moe_infinity, read_sglang, read_vllm

MIXTRAL = TraceModel(name="Mixtral-8x7B", model_type="mixtral", num_layers=32, num_experts=8, top_k=2)


def _ids(rng, tokens: int, layers: int, experts: int, k: int) -> np.ndarray:
    """[tokens, layers, k] distinct ids per (token, layer), as a router's top-k gives."""
    return np.argsort(rng.random((tokens, layers, experts)), axis=-1)[..., :k]


def vllm_response(rng, prompt: int, generated: list[int]) -> dict:
    return {
        "id": "cmpl-1", "object": "text_completion", "model": "mixtral",
        "prompt_routed_experts": _ids(rng, prompt, 32, 8, 2).tolist(),
        "choices": [{"index": i, "text": "...", "finish_reason": "length",
                     "routed_experts": _ids(rng, n, 32, 8, 2).tolist()} for i, n in enumerate(generated)],
    }


def sglang_response(ids: np.ndarray) -> dict:
    payload = base64.b64encode(ids.astype("<i4").tobytes()).decode()
    return {"text": "...", "meta_info": {"id": "r1", "prompt_tokens": 5, "completion_tokens": len(ids) - 5,
                                         "routed_experts": payload}}


def test_vllm_choices_become_sequences_with_their_prompt_first(tmp_path):
    rng = np.random.default_rng(0)
    responses = [vllm_response(rng, 6, [4, 3]), vllm_response(rng, 2, [5])]
    path = tmp_path / "vllm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in responses))
    trace = read_vllm(path, model=MIXTRAL)
    assert trace.experts.shape == (6 + 4 + 6 + 3 + 2 + 5, 32, 2)
    assert list(trace.sequence_lengths) == [10, 9, 7]
    first = np.array(responses[0]["prompt_routed_experts"] + responses[0]["choices"][0]["routed_experts"])
    assert np.array_equal(trace.experts[:10], first)
    assert list(trace.phase[:10]) == [Phase.PREFILL] * 6 + [Phase.DECODE] * 4
    assert np.isnan(trace.weights).all() and trace.meta["engine"] == "vllm"


def test_vllm_without_prompt_routing_and_as_one_json_object(tmp_path):
    rng = np.random.default_rng(1)
    response = vllm_response(rng, 3, [4])
    del response["prompt_routed_experts"]
    (tmp_path / "one.json").write_text(json.dumps(response))
    trace = pt.load(tmp_path / "one.json", fmt="vllm")  # through the one entry point
    assert trace.experts.shape == (4, 32, 2) and trace.num_experts == 8  # largest id + 1 without a model


def test_sglang_payload_is_decoded_with_the_models_shape(tmp_path):
    rng = np.random.default_rng(2)
    ids = [_ids(rng, n, 32, 8, 2) for n in (7, 9)]
    (tmp_path / "sglang.json").write_text(json.dumps([sglang_response(x) for x in ids]))
    trace = pt.load(tmp_path / "sglang.json", fmt="sglang", model=MIXTRAL)
    assert np.array_equal(trace.experts, np.concatenate(ids)) and list(trace.sequence_lengths) == [7, 9]


def test_moe_infinity_counts_become_tokens_with_the_same_counts(tmp_path):
    switch = get_spec("switch-base-8")
    model = TraceModel(name=switch.name, model_type=switch.model_type, num_layers=switch.num_moe_layers,
                       num_experts=switch.num_experts, top_k=switch.top_k)
    rng = np.random.default_rng(3)
    counts = np.zeros((4, 12, 8), np.float32)  # the tracer's capacity: 4 rows, the last one unused
    for s, tokens in enumerate((5, 11, 3)):
        for layer in range(12):
            counts[s, layer] = np.bincount(rng.integers(0, 8, tokens), minlength=8)
    np.save(tmp_path / "trace.npy", counts)
    trace = pt.load(tmp_path / "trace.npy", model=model)
    assert list(trace.sequence_lengths) == [5, 11, 3] and trace.top_k == 1 and not trace.exact.any()
    for s in range(3):
        rows = trace.experts[trace.seq_offsets[s]:trace.seq_offsets[s + 1]]  # [T, L, 1]
        for layer in range(12):
            assert np.array_equal(np.bincount(rows[:, layer, 0], minlength=8), counts[s, layer])
    assert "token order" in trace.meta["caveat"]


def test_moe_infinity_top2_never_gives_a_token_one_expert_twice(tmp_path):
    counts = np.array([[[3, 3, 0, 0], [2, 2, 2, 0]]], np.int64)  # 3 tokens x top-2 at each of 2 layers
    np.save(tmp_path / "t.npy", counts)
    trace = read_moe_infinity(tmp_path / "t.npy", model=TraceModel("m", "x", 2, 4, 2))
    assert (trace.experts[..., 0] != trace.experts[..., 1]).all()


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


GOOD_IDS = [[[0, 1]] * 32]  # one token, 32 layers, top-2


@pytest.mark.parametrize(
    ("reader", "name", "content", "fix"),
    [
        # what each case covers is named by the file
        (read_vllm, "truncated.jsonl", '{"choices": [{"routed_experts": [[[0, 1]', "not valid JSON"),
        (read_vllm, "no_choices.json", {"id": "x"}, "non-empty 'choices' list"),
        (read_vllm, "flag_off.json", {"choices": [{"text": "hi"}]}, "--enable-return-routed-experts"),
        (read_vllm, "ragged.json", {"choices": [{"routed_experts": [[[0, 1]], [[0]]]}]}, "rectangular"),
        (read_vllm, "floats.json", {"choices": [{"routed_experts": [[[0.5, 1.0]] * 32]}]}, "integer ids"),
        (read_vllm, "two_dims.json", {"choices": [{"routed_experts": [[0, 1]]}]}, "integer ids"),
        (read_vllm, "id_range.json", {"choices": [{"routed_experts": [[[0, 9]] * 32]}]}, "expert id 9 is out of range"),
        (read_vllm, "negative.json", {"choices": [{"routed_experts": [[[0, -1]] * 32]}]}, "expert id -1"),
        (read_vllm, "other_model.json", {"choices": [{"routed_experts": [[[0, 1]] * 4]}]}, "4 MoE layers x top-2"),
        (read_vllm, "empty.json", {"choices": [{"routed_experts": []}]}, "integer ids"),
        (read_vllm, "mixed.json", [{"choices": [{"routed_experts": GOOD_IDS}]},
                                   {"choices": [{"routed_experts": [[[0, 1, 2]] * 32]}]}], "disagree"),
        (read_vllm, "prompt_shape.json", {"prompt_routed_experts": [[[0]] * 32],
                                          "choices": [{"routed_experts": GOOD_IDS}]}, "disagree on [layers, top_k]"),
        (read_vllm, "binary.json", b"\xff\xfe\x00", "cannot read it"),
        (read_sglang, "no_meta.json", {"text": "hi"}, "no meta_info.routed_experts"),
        (read_sglang, "not_base64.json", {"meta_info": {"routed_experts": "%%%"}}, "not valid base64"),
        (read_sglang, "partial.json", {"meta_info": {"routed_experts": base64.b64encode(b"\0" * 12).decode()}},
         "not a whole number of tokens"),
        (read_sglang, "id_range.json", sglang_response(np.full((1, 32, 2), 8)), "expert id 8 is out of range"),
        (read_moe_infinity, "two_dims.npy", np.zeros((4, 8)), "[sequences, layers, experts]"),
        (read_moe_infinity, "negative.npy", -np.ones((1, 32, 8)), "finite whole numbers"),
        (read_moe_infinity, "fraction.npy", np.full((1, 32, 8), 0.5), "finite whole numbers"),
        (read_moe_infinity, "nan.npy", np.full((1, 32, 8), np.nan), "finite whole numbers"),
        (read_moe_infinity, "uneven.npy", np.eye(8)[None, :1].repeat(32, 1) * np.arange(1, 33)[None, :, None],
         "each layer must count"),
        (read_moe_infinity, "all_zero.npy", np.zeros((2, 32, 8)), "no routed tokens"),
        (read_moe_infinity, "wrong_experts.npy", np.ones((1, 32, 4)), "32 MoE layers x 4 experts"),
        (read_moe_infinity, "over.npy", np.pad(np.full((1, 32, 1), 4), ((0, 0), (0, 0), (0, 7))), "more activations"),
        (read_moe_infinity, "corrupt.npy", "not numpy", "not a readable .npy"),
    ],
)
def test_malformed_input_is_a_trace_error_naming_the_file(tmp_path, reader, name, content, fix):
    path = _write(tmp_path, name, content)
    with pytest.raises(TraceError) as info:
        reader(path, model=MIXTRAL)
    assert name in str(info.value) and fix in str(info.value)


def test_sglang_without_a_model_says_to_give_one(tmp_path):
    path = _write(tmp_path, "s.json", sglang_response(np.zeros((1, 32, 2), int)))
    with pytest.raises(TraceError, match="give the model"):
        read_sglang(path)
