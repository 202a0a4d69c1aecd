"""What Prophet relies on in transformers, checked against the installed release: the KV-cache keyword of a model's
forward, and reading a forward's cache by type whatever its keyword is called. A rename in a future release fails
here, loudly, instead of corrupting traces or decode runs."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from transformers import DynamicCache

import prophet.trace as pt
from prophet.compat import CACHE_KEYWORDS, cache_keyword, cached_tokens, decode_kwargs
from prophet.errors import TraceError, UnsupportedModelError
from prophet.models import get_spec


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return get_spec("mixtral").tiny_model(seed=0).eval()


def test_the_installed_release_names_one_known_cache_keyword(model):
    assert cache_keyword(model) in inspect.signature(model.forward).parameters


def test_a_model_without_a_known_cache_keyword_is_refused_with_the_fix():
    class Renamed(nn.Module):
        def forward(self, input_ids, kv_state=None):
            return input_ids

    with pytest.raises(UnsupportedModelError, match="CACHE_KEYWORDS"):
        cache_keyword(Renamed())


def test_decode_kwargs_continue_a_cache_exactly_like_one_full_forward(model):
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        kv = DynamicCache(config=model.config)
        model(ids[:, :5], **decode_kwargs(model, kv, 0, 5))
        step = model(ids[:, 5:], **decode_kwargs(model, kv, 5, 1)).logits[:, -1]
    assert kv.get_seq_length() == 6
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({}, 0, id="no-cache-starts-a-sequence"),
        pytest.param({"cache": None, "past_key_values": None, "use_cache": True}, 0, id="cache-keywords-set-to-none"),
        pytest.param({"kv_renamed": "filled"}, 3, id="a-Cache-under-any-keyword-is-read"),
        pytest.param({"cache": "filled", "past_key_values": "empty"}, None, id="two-caches-are-ambiguous"),
        pytest.param({"past_key_values": ("legacy", "tuple")}, None, id="a-cache-keyword-that-is-not-a-Cache"),
        pytest.param({"cache": object()}, None, id="an-unreadable-cache"),
    ],
)
def test_cached_tokens_reads_the_cache_by_type(model, kwargs, expected):
    filled = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 3)), **{cache_keyword(model): filled}, use_cache=True)
    caches = {"filled": filled, "empty": DynamicCache(config=model.config)}
    given = {k: caches.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    assert cached_tokens((), given) == expected


def test_recorder_refuses_a_forward_whose_cache_it_cannot_read(model, tmp_path):
    with pytest.raises(TraceError, match="cannot tell whether this forward starts a sequence"):
        with pt.record(model, tmp_path / "t"):
            model(torch.randint(3, 128, (1, 4)), **{CACHE_KEYWORDS[-1]: ("legacy", "tuple")})


def test_recorder_follows_a_manual_decode_loop_under_the_installed_keyword(model, tmp_path):
    """Prefill then decode steps fed through the installed keyword: one sequence, not one per step."""
    ids = torch.randint(3, 128, (1, 4))
    with pt.record(model, tmp_path / "t"), torch.no_grad():
        kv = DynamicCache(config=model.config)
        token = model(ids, **decode_kwargs(model, kv, 0, 4)).logits[:, -1:].argmax(-1)
        for pos in range(4, 9):
            token = model(token, **decode_kwargs(model, kv, pos, 1)).logits[:, -1:].argmax(-1)
    trace = pt.load(tmp_path / "t")
    assert trace.sequence_lengths.tolist() == [9]
