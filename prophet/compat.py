"""The one place that knows how transformers releases differ in what Prophet relies on.

transformers 5.24 renamed the KV-cache keyword of every model's ``forward`` from ``past_key_values`` to
``cache`` (the old name warns and goes away in 5.40) and dropped ``cache_position`` from the signatures. Code
that keys on one of those names breaks silently when it moves again, so Prophet asks here: by signature when it
calls a model, by type (any `transformers.Cache` among the arguments) when it watches one being called, and it
raises when it cannot tell rather than guess.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from prophet.errors import UnsupportedModelError

# KV-cache keywords of model.forward, newest first: 5.24+ and 5.0-5.23.
CACHE_KEYWORDS = ("cache", "past_key_values")


def _forward_params(model: nn.Module) -> frozenset[str]:
    return _params_of(type(model))


@functools.cache
def _params_of(cls: type) -> frozenset[str]:  # once per class: decode steps call this every token
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache under, for the installed transformers."""
    params = _forward_params(model)
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward takes none of the KV-cache keywords {list(CACHE_KEYWORDS)}: this "
        "transformers release renamed it again; add the new name to prophet.compat.CACHE_KEYWORDS"
    )


def decode_kwargs(model: nn.Module, cache: Any, start: int, length: int) -> dict[str, Any]:
    """Keyword arguments that feed ``length`` new tokens at positions ``start..start+length`` with ``cache``.

    ``cache_position`` is passed only to releases whose forward still names it; newer ones derive positions
    from the cache itself.
    """
    import torch

    kwargs: dict[str, Any] = {cache_keyword(model): cache, "use_cache": True}
    if "cache_position" in _forward_params(model):
        device = next(model.parameters()).device
        kwargs["cache_position"] = torch.arange(start, start + length, device=device)
    return kwargs


def _is_cache_keyword(name: str) -> bool:
    return name in CACHE_KEYWORDS or (("cache" in name or "past" in name) and name not in _NOT_A_CACHE)


# keywords whose names look like a cache but are not one
_NOT_A_CACHE = frozenset({"use_cache", "cache_position", "cache_implementation", "past_index"})


def cached_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Tokens already in the KV cache a model's forward was called with: 0 when it got no cache (the model
    starts an empty one), the cache's length when it got exactly one `transformers.Cache`, and None when it
    cannot tell (two caches, or a cache-like argument that is not a `Cache`). Looks at types, not names, so a
    renamed keyword still counts."""
    from transformers.cache_utils import Cache

    caches = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
    if len(caches) == 1:
        return int(caches[0].get_seq_length())
    if len(caches) > 1:
        return None
    if any(v is not None and _is_cache_keyword(k) for k, v in kwargs.items()):
        return None
    return 0
