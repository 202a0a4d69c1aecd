"""Host memory stays flat over a long decode with a small cache and a learning predictor (issue 13, item 8).

The CI version decodes a few hundred steps; ``experiments/soak/decode_soak.py`` runs the full 10,000 and
commits ``experiments/results/soak_decode.json``.
"""

import torch

import prophet
from prophet.models.registry import get_spec
from prophet.predict import PathMatchPredictor
from prophet.soak import soak


def test_host_memory_stays_flat_over_a_decode_soak():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = get_spec("mixtral").tiny_model(seed=0)
        cfg = model.config
        predictor = PathMatchPredictor(cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok,
                                       max_online=32)
        prophet.wrap(model, device="cpu", slots_per_layer=2, predictor=predictor)
        result = soak(model, 200, seq_len=25, warmup=0.25, samples=10, predictor=predictor)
    finally:
        torch.set_num_threads(threads)
    assert result.sequences == 8 and len(result.samples) >= 10
    assert result.growth <= 0.02, result.samples
    assert predictor.size <= 32  # the window held
    total = prophet.stats(model).total
    assert total.misses > 0 and total.prefetches > 0  # the cache evicted and the predictor prefetched throughout
