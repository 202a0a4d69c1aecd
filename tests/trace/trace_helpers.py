"""Helpers for the trace tests: tiny models and hand-made traces (imported as a module, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from prophet.trace import Phase, Trace, TraceModel

REPO = Path(__file__).resolve().parents[2]
TINY_TRACE = REPO / "traces" / "tiny-mixtral"


def tiny_mixtral(seed: int = 0, layers: int = 2, experts: int = 8, top_k: int = 2) -> MixtralForCausalLM:
    """A random Mixtral small enough for CPU tests, weights N(0, 0.05) so routing varies between tokens."""
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=256,
    )
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if "norm" in name else 0.0))
    return model


def make_trace(
    experts: np.ndarray | list, seq_offsets: list[int] | None = None, num_experts: int = 8, **kwargs
) -> Trace:
    """A trace from an ``experts [N, L, K]`` array (weights uniform 1/K), one sequence unless told."""
    ex = np.asarray(experts, dtype=np.int16)
    n, layers, k = ex.shape
    model = TraceModel(
        name="hand-made", model_type="test", num_layers=layers, num_experts=num_experts, top_k=k
    )
    w = np.where(ex >= 0, 1.0 / k, np.nan).astype(np.float32)
    offsets = np.asarray(seq_offsets if seq_offsets is not None else [0, n], dtype=np.int64)
    kwargs.setdefault("phase", np.full(n, Phase.DECODE, np.uint8))
    return Trace(model, ex, w, offsets, **kwargs)


def random_trace(
    rng: np.random.Generator, n: int = 50, layers: int = 3, experts: int = 8, k: int = 2, seqs: int = 3
) -> Trace:
    """Uniform random routing (distinct experts per row), random sequence cuts and token ids."""
    ex = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :k].astype(np.int16)
    cuts = np.sort(rng.choice(np.arange(1, n), size=seqs - 1, replace=False)) if seqs > 1 else []
    return make_trace(
        ex,
        [0, *cuts, n],
        num_experts=experts,
        token_ids=rng.integers(0, 1000, n).astype(np.int64),
        phase=rng.integers(0, 3, n).astype(np.uint8),
    )
