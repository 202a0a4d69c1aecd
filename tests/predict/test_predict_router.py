"""Router look-ahead on a tiny transformers Mixtral: its next-layer recall must beat layer frequency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from prophet.errors import ConfigError
from prophet.models import moe_layers
from prophet.predict import FrequencyPredictor, RouterLookahead, RouterTrace
from prophet.predict.evaluate import recall_report

LAYERS, EXPERTS, K = 8, 8, 2  # 8 layers: in a random model the residual stream settles after the first few


@pytest.fixture(scope="module")
def tiny_mixtral() -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=K, max_position_embeddings=128,
    )
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.1)
    return model


def routed(model: MixtralForCausalLM, seed: int, tokens: int = 64) -> RouterTrace:
    """One sequence through ``model``, with every MoE layer's router input and choice captured."""
    layers = moe_layers(model)
    hidden, experts = [None] * LAYERS, [None] * LAYERS

    def hook(i):
        def capture(module, args, output):
            hidden[i] = args[0].reshape(-1, args[0].shape[-1])
            experts[i] = output[2]
        return capture

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    ex = torch.stack(experts, dim=1).numpy()  # [N, L, K]
    return RouterTrace(
        experts=ex.astype(np.int64), weights=np.full(ex.shape, 0.5, np.float32),
        seq_offsets=np.array([0, tokens]), exact=np.ones(ex.shape[:2], bool), num_experts=EXPERTS,
        hidden=torch.stack(hidden, dim=1).numpy(),  # [N, L, H]
    )


def test_router_lookahead_beats_layer_frequency_on_the_next_layer(tiny_mixtral):
    routers = [layer.router for layer in moe_layers(tiny_mixtral)]
    fit, test = routed(tiny_mixtral, seed=1), routed(tiny_mixtral, seed=2)
    ahead = recall_report(RouterLookahead(routers, EXPERTS, K), test, distances=[1])["distances"]["1"]["recall@2"]
    freq = recall_report(FrequencyPredictor(LAYERS, EXPERTS, K).fit([fit]), test, distances=[1])
    assert ahead > freq["distances"]["1"]["recall@2"] + 0.1


def test_router_lookahead_hands_next_token_steps_to_its_fallback(tiny_mixtral):
    routers = [layer.router for layer in moe_layers(tiny_mixtral)]
    freq = FrequencyPredictor(LAYERS, EXPERTS, K)
    p = RouterLookahead(routers, EXPERTS, K, fallback=freq)
    p.observe(LAYERS - 1, torch.tensor([[0, 1]]), torch.full((1, 2), 0.5), torch.randn(1, 64))
    np.testing.assert_allclose(p.scores([1]), freq.scores([1]))


def test_router_lookahead_needs_the_hidden_state(tiny_mixtral):
    p = RouterLookahead([layer.router for layer in moe_layers(tiny_mixtral)], EXPERTS, K)
    with pytest.raises(ConfigError, match="hidden"):
        p.observe(0, torch.tensor([[0, 1]]), torch.full((1, 2), 0.5))
