"""The recorder: outputs unchanged, padding and finished rows skipped, phases and sequences right, and the
recorded experts are exactly what each router picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from trace_helpers import tiny_mixtral

import prophet.trace as pt
from prophet.errors import TraceError
from prophet.models import list_specs, moe_layers
from prophet.trace import Phase

PROMPT_LENGTHS = (3, 7, 5)  # left-padded to 7


def padded_batch(lengths=PROMPT_LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``/``attention_mask [B, max(lengths)]`` with left padding (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 128, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def generate(model, ids, mask, new_tokens: int = 6, **kwargs):
    kwargs.setdefault("min_new_tokens", new_tokens)  # keep EOS out unless a test wants it
    kwargs.setdefault("do_sample", False)
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, **kwargs
    )


def test_recording_leaves_logits_unchanged(tmp_path):
    model = tiny_mixtral()
    ids, mask = padded_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with pt.record(model, tmp_path / "t", hidden_sketch=4):
            recorded = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits  # hooks are gone afterwards
    assert torch.equal(plain, recorded) and torch.equal(plain, again)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_recording_leaves_sampled_generation_unchanged(tmp_path):
    # sampling consumes the global RNG: the recorder (and its sketch projection) must not touch it
    model = tiny_mixtral()
    ids, mask = padded_batch()
    torch.manual_seed(5)
    plain = generate(model, ids, mask, do_sample=True)
    torch.manual_seed(5)
    with pt.record(model, tmp_path / "t", hidden_sketch=4):
        recorded = generate(model, ids, mask, do_sample=True)
    assert torch.equal(plain, recorded)


@pytest.mark.parametrize("flush_every", [64, 2], ids=["one-flush", "flush-every-2-forwards"])
def test_padding_is_skipped_and_rows_become_sequences_in_time_order(tmp_path, monkeypatch, flush_every):
    monkeypatch.setattr("prophet.trace.recorder.FLUSH_EVERY", flush_every)
    model = tiny_mixtral()
    ids, mask = padded_batch()
    new = 6
    with pt.record(model, tmp_path / "t") as rec:
        out = generate(model, ids, mask, new)
    trace = pt.load(tmp_path / "t")
    assert rec.num_tokens == len(trace) == sum(PROMPT_LENGTHS) + len(PROMPT_LENGTHS) * (new - 1)
    assert trace.sequence_lengths.tolist() == [n + new - 1 for n in PROMPT_LENGTHS]
    width = ids.shape[1]
    for row, n in enumerate(PROMPT_LENGTHS):
        seq = trace.sequences(row)
        fed = out[row, width - n : width + new - 1]  # real prompt, then every generated token but the last
        assert seq.token_ids.tolist() == fed.tolist()
        assert seq.phase.tolist() == [Phase.PREFILL] * n + [Phase.DECODE] * (new - 1)
    assert trace.exact.all() and (trace.experts >= 0).all()
    assert trace.model.num_layers == 2 and trace.model.model_type == "mixtral"


def test_recorded_experts_are_what_the_router_picks(tmp_path):
    model = tiny_mixtral(layers=3)
    layers = moe_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {ly.moe_index: [] for ly in layers}
    handles = [
        ly.router.register_forward_pre_hook(
            lambda m, args, i=ly.moe_index: inputs[i].append(args[0].detach().clone())
        )
        for ly in layers
    ]
    ids, mask = padded_batch()
    with pt.record(model, tmp_path / "t", hidden_sketch=6, sketch_seed=3):
        out = generate(model, ids, mask, new_tokens=4)
    for h in handles:
        h.remove()
    trace = pt.load(tmp_path / "t")
    b, width = ids.shape
    full_mask = torch.cat(
        [mask, torch.ones(b, out.shape[1] - width, dtype=mask.dtype)], 1
    )  # [B, width + new]
    proj = torch.randn(32, 6, generator=torch.Generator().manual_seed(3)) / math.sqrt(6)
    for ly in layers:
        rows_per_row: list[list[torch.Tensor]] = [
            [] for _ in range(b)
        ]  # router outputs of real tokens per batch row
        weights_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
        hidden_per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
        start = 0
        for hidden in inputs[ly.moe_index]:  # one entry per forward: [B*S, H]
            s = hidden.shape[0] // b
            with torch.no_grad():
                _, w, idx = ly.router(hidden)  # run the router ourselves
            keep = full_mask[:, start : start + s].reshape(-1).bool()
            for r in range(b):
                sel = keep.view(b, s)[r]
                rows_per_row[r].append(idx.view(b, s, -1)[r][sel])
                weights_per_row[r].append(w.view(b, s, -1)[r][sel])
                hidden_per_row[r].append(hidden.view(b, s, -1)[r][sel])
            start += s
        for r in range(b):
            seq = trace.sequences(r)
            np.testing.assert_array_equal(seq.experts[:, ly.moe_index], torch.cat(rows_per_row[r]).numpy())
            np.testing.assert_allclose(
                seq.weights[:, ly.moe_index], torch.cat(weights_per_row[r]).numpy(), rtol=1e-6
            )
            sketch = (torch.cat(hidden_per_row[r]) @ proj).half().numpy()
            np.testing.assert_allclose(
                seq.sketch[:, ly.moe_index].astype(np.float32),
                sketch.astype(np.float32),
                rtol=1e-3,
                atol=1e-4,
            )


@pytest.mark.parametrize("flush_every", [64, 2], ids=["one-flush", "flush-every-2-forwards"])
def test_rows_that_finished_are_not_recorded(tmp_path, monkeypatch, flush_every):
    monkeypatch.setattr("prophet.trace.recorder.FLUSH_EVERY", flush_every)
    model = tiny_mixtral()
    ids, mask = padded_batch()
    width = ids.shape[1]
    free = generate(model, ids, mask, new_tokens=6)
    eos = int(free[0, width + 2])  # row 0's third generated token ends it
    model.generation_config.eos_token_id = eos
    with pt.record(model, tmp_path / "t"):
        out = generate(model, ids, mask, new_tokens=6, min_new_tokens=0)
    trace = pt.load(tmp_path / "t")
    for row, n in enumerate(PROMPT_LENGTHS):
        gen = out[row, width:].tolist()
        fed_before_eos = (
            gen.index(eos) if eos in gen else len(gen)
        )  # the forward that feeds EOS is not recorded
        decode = min(len(gen) - 1, fed_before_eos)
        assert trace.sequence_lengths[row] == n + decode
        assert (trace.sequences(row).phase == Phase.DECODE).sum() == decode
    assert trace.sequence_lengths[0] == PROMPT_LENGTHS[0] + 2


def test_each_forward_without_cache_starts_new_sequences(tmp_path):
    model = tiny_mixtral()
    ids, mask = padded_batch()
    with torch.no_grad(), pt.record(model, tmp_path / "t"):
        model(input_ids=ids)  # no mask: every position is a token
        generate(model, ids[:1], mask[:1], new_tokens=3)
    trace = pt.load(tmp_path / "t")
    assert trace.sequence_lengths.tolist() == [7, 7, 7, 3 + 2]
    assert (trace.sequences(slice(0, 3)).phase == Phase.PREFILL).all()


def test_a_one_token_prompt_is_prefill(tmp_path):
    # prefill and decode both feed one token here; only the empty cache tells them apart
    model = tiny_mixtral()
    ids, mask = padded_batch((1, 1))
    with pt.record(model, tmp_path / "t"):
        generate(model, ids, mask, new_tokens=3)
    trace = pt.load(tmp_path / "t")
    assert trace.sequences(0).phase.tolist() == [Phase.PREFILL, Phase.DECODE, Phase.DECODE]


def test_recording_nothing_is_an_error(tmp_path):
    with pytest.raises(TraceError, match="nothing was recorded"):
        with pt.record(tiny_mixtral(), tmp_path / "t"):
            pass
    assert not (tmp_path / "t" / "header.json").exists()


def test_interrupted_recording_keeps_completed_forwards(tmp_path):
    model = tiny_mixtral()
    ids, mask = padded_batch()
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), pt.record(model, tmp_path / "t"):
        model(input_ids=ids, attention_mask=mask)
        raise KeyboardInterrupt
    assert len(pt.load(tmp_path / "t")) == sum(PROMPT_LENGTHS)


def test_encoder_decoder_models_are_refused(tmp_path):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=4,
        expert_capacity=8,
    )
    with pytest.raises(TraceError, match="encoder-decoder"):
        pt.record(SwitchTransformersForConditionalGeneration(config), tmp_path / "t")


def _decoder_families():
    seen, out = set(), []
    for spec in list_specs():
        if spec.model_type not in seen and not spec.is_encoder_decoder:
            seen.add(spec.model_type)
            out.append(pytest.param(spec, id=spec.model_type))
    return out


@pytest.mark.parametrize("spec", _decoder_families())
def test_records_every_supported_decoder_family(tmp_path, spec):
    model = spec.tiny_model(seed=0)
    ids, mask = padded_batch((2, 4), seed=2)
    ids = ids % 60 + (ids > 0) * 3  # stay inside every tiny vocabulary, away from special ids 0..2
    with pt.record(model, tmp_path / "t", hidden_sketch=2):
        generate(model, ids, mask, new_tokens=3)
    trace = pt.load(tmp_path / "t", model=model)
    assert trace.sequence_lengths.tolist() == [2 + 2, 4 + 2]
    assert (trace.experts >= 0).all() and trace.exact.all()
    assert trace.model.num_layers == len(moe_layers(model))


@pytest.mark.gpu
def test_recording_on_cuda_leaves_generation_unchanged_and_copies_once_per_flush(tmp_path):
    model = tiny_mixtral(layers=3).cuda()
    ids, mask = (t.cuda() for t in padded_batch())
    plain = generate(model, ids, mask, new_tokens=8)
    with pt.record(model, tmp_path / "t", hidden_sketch=4):
        recorded = generate(model, ids, mask, new_tokens=8)
    assert torch.equal(plain, recorded)
    trace = pt.load(tmp_path / "t", model=model)
    assert trace.sequence_lengths.tolist() == [n + 7 for n in PROMPT_LENGTHS]
    assert (trace.experts >= 0).all() and np.isfinite(trace.sketch.astype(np.float32)).all()
