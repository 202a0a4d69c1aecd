"""Hidden-state predictors: router look-ahead on the live model and on sketches, and the learned head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import prophet.trace
from prophet.errors import ConfigError
from prophet.models import moe_layers
from prophet.predict import HiddenStateHead, RouterLookahead, RouterTrace, as_router_trace, sketch_routers
from prophet.predict.base import RoutingPredictor
from prophet.predict.heads import ReferenceHead
from prophet.trace import SketchInfo
from prophet.trace.sketch import sketch_projection

LAYERS, EXPERTS, K, H = 3, 8, 2, 32


def tiny(frozen_residual: bool = False) -> MixtralForCausalLM:
    """A fresh random tiny Mixtral; ``frozen_residual`` zeroes attention and expert outputs, so every layer's
    router sees the same (unit-norm-weight RMS-normed) residual stream."""
    config = MixtralConfig(
        vocab_size=64, hidden_size=H, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=K, max_position_embeddings=64,
    )
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.2)
            if frozen_residual and ("o_proj" in name or "down_proj" in name):
                p.zero_()
    return model


def captured(model: MixtralForCausalLM, tokens: int = 16) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each MoE layer's router input ``[T, H]`` and top-k ``[T, K]`` for one random sequence."""
    hidden, index = [], []

    def keep(module: torch.nn.Module, args: tuple, out: tuple) -> None:
        hidden.append(args[0].reshape(-1, H))
        index.append(out[2])

    hooks = [layer.router.register_forward_hook(keep) for layer in moe_layers(model)]
    with torch.no_grad():
        model(torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    return hidden, index


def test_live_lookahead_gives_the_next_routers_top_k_when_the_residual_is_unchanged():
    model = tiny(frozen_residual=True)
    hidden, index = captured(model)
    torch.testing.assert_close(hidden[0], hidden[2])  # the constructed case: router inputs equal across layers
    p = RouterLookahead([layer.router for layer in moe_layers(model)], EXPERTS, K)
    for t in range(hidden[0].shape[0]):
        p.observe(0, index[0][t : t + 1], torch.full((1, K), 0.5), hidden[0][t : t + 1])
        scores = p.scores([1, 2])  # [2, E]
        for d in (1, 2):
            assert set(np.argsort(-scores[d - 1])[:K].tolist()) == set(index[d][t].tolist())


def test_recorded_sketch_is_the_router_input_projected(tmp_path):
    model = tiny()
    hidden, _ = captured(model)
    info = SketchInfo(dim=H, seed=3)
    with torch.no_grad(), prophet.trace.record(model, tmp_path / "t", hidden_sketch=info.dim, sketch_seed=info.seed):
        model(torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1)))
    trace = prophet.trace.load(tmp_path / "t")
    proj = sketch_projection(H, info)
    for layer in range(LAYERS):
        want = (hidden[layer] @ proj).half().float().numpy()
        np.testing.assert_allclose(np.asarray(trace.sketch[:, layer], np.float32), want, rtol=1e-3, atol=1e-3)


def test_lookahead_on_a_full_width_sketch_matches_the_live_one():
    model = tiny()
    hidden, index = captured(model)
    info = SketchInfo(dim=H, seed=3)
    routers = [layer.router for layer in moe_layers(model)]
    sk = (hidden[0] @ sketch_projection(H, info))  # [T, D]
    live, replay = RouterLookahead(routers, EXPERTS, K), RouterLookahead(sketch_routers(routers, H, info), EXPERTS, K)
    live.observe(0, index[0], torch.full_like(index[0], 0.5, dtype=torch.float), hidden[0])
    replay.observe(0, index[0], torch.full_like(index[0], 0.5, dtype=torch.float), sk)
    np.testing.assert_allclose(replay.scores([1, 2]), live.scores([1, 2]), atol=1e-4)


def separable(maps: np.ndarray, seed: int, tokens: int, seqs: int = 4) -> RouterTrace:
    """Layer l+1's experts are a fixed function of layer l's sketch: top-K of the linear ``maps [L, D, E]``."""
    x = np.random.default_rng(seed).normal(size=(tokens, LAYERS, maps.shape[1])).astype(np.float32)
    ex = np.zeros((tokens, LAYERS, K), np.int64)
    ex[:, 0] = np.argsort(-x[:, 0] @ maps[0], axis=1)[:, :K]
    for layer in range(1, LAYERS):
        ex[:, layer] = np.argsort(-(x[:, layer - 1] @ maps[layer]), axis=1)[:, :K]
    return RouterTrace(experts=ex, weights=np.full(ex.shape, 0.5, np.float32),
                       seq_offsets=np.linspace(0, tokens, seqs + 1).astype(np.int64),
                       exact=np.ones((tokens, LAYERS), bool), num_experts=EXPERTS, hidden=x)


def random_maps(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(LAYERS, dim, EXPERTS))


@pytest.mark.parametrize("shape", [{}, {"rank": 6}, {"hidden_units": 32}], ids=["linear", "factored", "mlp"])
def test_head_learns_a_separable_mapping_out_of_sample(shape):
    maps = random_maps(0, 6)
    fit, held = separable(maps, seed=1, tokens=2000), separable(maps, seed=2, tokens=100)
    head = HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=6, max_distance=1, history=False, **shape).fit([fit])
    hits = 0
    for t in range(held.num_tokens):
        head.reset()
        head.observe(0, held.experts[t, 0][None], held.weights[t, 0][None], held.hidden[t, 0][None])
        top = np.argsort(-head.scores([1])[0])[:K]
        hits += len(set(top.tolist()) & set(held.experts[t, 1].tolist()))
    assert hits / (K * held.num_tokens) > 0.9


def test_head_on_live_hidden_through_the_projection_matches_the_sketch():
    rng = np.random.default_rng(1)
    info = SketchInfo(dim=8, seed=5)
    proj = sketch_projection(H, info)
    h = torch.from_numpy(rng.normal(size=(400, LAYERS, H)).astype(np.float32))
    tr = separable(random_maps(1, 8), seed=1, tokens=400)
    tr = RouterTrace(**{**tr.__dict__, "hidden": (h @ proj).numpy()})
    head = HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=8, steps=20).fit([tr])
    live = HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=8, projection=proj)
    for name in ("mean", "scale", "layers", "freq"):
        setattr(live, name, getattr(head, name))
    head.observe(1, tr.experts[0, 1][None], tr.weights[0, 1][None], tr.hidden[0, 1][None])
    live.observe(1, tr.experts[0, 1][None], tr.weights[0, 1][None], h[0, 1][None])
    np.testing.assert_allclose(live.scores([1, 2, 3]), head.scores([1, 2, 3]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError):
        head.observe(2, tr.experts[0, 2][None], tr.weights[0, 2][None], h[0, 2][None])  # full width, no projection


def test_reset_clears_per_sequence_state():
    tr = separable(random_maps(2, 6), seed=2, tokens=200)
    head = HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=6, steps=10).fit([tr])
    fresh = head.scores([1]).copy()
    head.observe(0, tr.experts[0, 0][None], tr.weights[0, 0][None], tr.hidden[0, 0][None])
    assert not np.allclose(head.scores([1]), fresh)
    head.reset()
    assert head.probs is None and head.layer == -1
    np.testing.assert_allclose(head.scores([1]), fresh)
    model = tiny()
    hidden, index = captured(model)
    p = RouterLookahead([layer.router for layer in moe_layers(model)], EXPERTS, K)
    p.observe(0, index[0], torch.full_like(index[0], 0.5, dtype=torch.float), hidden[0])
    p.reset()
    assert p.hidden is None and p.layer == -1


def test_head_refuses_traces_without_a_sketch_and_two_shapes_at_once():
    with pytest.raises(ConfigError):
        HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=6, rank=2, hidden_units=8)
    tr = separable(random_maps(3, 6), seed=3, tokens=50)
    with pytest.raises(ConfigError):
        HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=6).fit([as_router_trace(RouterTrace(**{**tr.__dict__, "hidden": None}))])


def random_head(cls: type, projection: torch.Tensor | None, seed: int, max_distance: int = 2, **shape) -> HiddenStateHead:
    """A head of class ``cls`` with random standardization and maps (seeded, so two classes get the same)."""
    rng = np.random.default_rng(seed)
    head = cls(LAYERS, EXPERTS, K, sketch_dim=6, max_distance=max_distance, projection=projection, **shape)
    units, out = shape.get("hidden_units"), max_distance * EXPERTS
    sizes = [head.num_features, out] if units is None else [head.num_features, units, out]
    head.mean = rng.normal(size=head.mean.shape).astype(np.float32)
    head.scale = rng.uniform(0.5, 2.0, size=head.scale.shape).astype(np.float32)
    head.layers = [[(rng.normal(size=(a, b)).astype(np.float32), rng.normal(size=b).astype(np.float32))
                    for a, b in zip(sizes[:-1], sizes[1:], strict=True)] for _ in range(LAYERS)]
    head.freq = rng.uniform(size=head.freq.shape)
    return head


def assert_same_top(got: list, want: list, head: HiddenStateHead) -> None:
    """Two `predict` answers agree: per layer the same top scores, and each pick scores what ``head`` says (ties,
    as saturated unions of a batch make, may pick different experts)."""
    assert sorted(p.layer for p in got) == sorted(p.layer for p in want)
    key = lambda p: (p.layer, p.score)  # noqa: E731
    np.testing.assert_allclose([p.score for p in sorted(got, key=key)], [p.score for p in sorted(want, key=key)],
                               rtol=1e-5, atol=1e-6)
    for p in got:
        np.testing.assert_allclose(head.scores([p.layer - head.layer])[0, p.expert], p.score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [{}, {"hidden_units": 16}, {"hidden_units": 16, "history": False},
                                   {"hidden_units": 16, "every": 2, "max_distance": 3},
                                   {"every": LAYERS, "max_distance": LAYERS + 1}],
                         ids=["linear", "mlp", "mlp-no-history", "mlp-every-2", "linear-once-per-token"])
@pytest.mark.parametrize("live", [None, 1024, H], ids=["sketch", "projected", "projected-folded"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_head_matches_the_reference_on_fresh_inputs(shape, live, batch):
    proj = sketch_projection(live, SketchInfo(dim=6, seed=2)) if live else None
    fused, ref = (random_head(cls, proj, seed=4, **shape) for cls in (HiddenStateHead, ReferenceHead))
    rng = np.random.default_rng(5)
    for step in range(12):
        layer = step % LAYERS
        ids = torch.from_numpy(np.stack([rng.choice(EXPERTS, K, replace=False) for _ in range(batch)]))
        hidden = torch.from_numpy(rng.normal(size=(batch, live or 6)).astype(np.float32))
        for head in (fused, ref):
            head.observe(layer, ids, torch.full((batch, K), 0.5), hidden)
        if layer in fused.anchors:
            assert (fused._project is None) == (live != 1024)  # a wide projection stays a product of its own
        np.testing.assert_allclose(fused.scores([1, 2, 3, 9]), ref.scores([1, 2, 3, 9]), rtol=1e-5, atol=1e-6)
        assert_same_top(fused.predict(horizon=2), ref.predict(horizon=2), ref)  # fused: from its run's top-n
    fused.layers, ref.layers = (random_head(HiddenStateHead, proj, seed=6, **shape).layers for _ in range(2))
    for head in (fused, ref):  # replacing a parameter refolds the fused maps
        head.observe(0, ids, torch.full((batch, K), 0.5), hidden)
    np.testing.assert_allclose(fused.scores([1, 2]), ref.scores([1, 2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [2, LAYERS])
def test_a_head_run_every_few_layers_serves_the_layers_between_from_its_last_run(every):
    head = random_head(HiddenStateHead, None, seed=7, hidden_units=8, every=every, max_distance=every + 1)
    assert head.anchors == {2: [1, 2], LAYERS: [LAYERS - 1]}[every]  # every 2nd layer and the token's last
    np.testing.assert_allclose(head.scores([1, 2]), head.freq[[0, 1]])  # before any run: the fitted frequency
    run, lag = None, 0
    for step in range(4 * LAYERS):
        layer = step % LAYERS
        head.observe(layer, torch.tensor([[0, 1]]), torch.full((1, K), 0.5), torch.randn(1, 6))
        if layer in head.anchors:
            run, lag = head.probs.copy(), 0
        else:
            lag += 1
        if run is None:
            continue
        np.testing.assert_array_equal(head.scores([1]), run[lag : lag + 1])
        far = head.scores([head.max_distance - lag + 1])  # past the run: the frequency of the layer it lands on
        np.testing.assert_array_equal(far[0], head.freq[(layer + head.max_distance - lag + 1) % LAYERS])


def test_served_predict_equals_the_base_predict_on_fresh_inputs():
    rng = np.random.default_rng(9)
    for every in (1, 2, LAYERS):
        head = random_head(HiddenStateHead, None, seed=int(rng.integers(1 << 30)), every=every, max_distance=every + 1)
        for step in range(3 * LAYERS):
            head.observe(step % LAYERS, torch.from_numpy(rng.choice(EXPERTS, (1, K), replace=False)),
                         torch.full((1, K), 0.5), torch.from_numpy(rng.normal(size=(1, 6)).astype(np.float32)))
            for h in (1, 2, LAYERS):
                top = int(rng.integers(1, EXPERTS + 1))
                assert_same_top(head.predict(horizon=h, top=top), RoutingPredictor.predict(head, h, top), head)


def test_head_refuses_runs_that_cannot_reach_the_next_one():
    with pytest.raises(ConfigError, match="max_distance"):
        HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=6, every=2, max_distance=1)
    with pytest.raises(ConfigError, match="every"):
        HiddenStateHead(LAYERS, EXPERTS, K, sketch_dim=6, every=LAYERS + 1, max_distance=LAYERS + 1)


def test_head_reads_hidden_tensors_of_any_dtype_and_grad_alike():
    head = random_head(HiddenStateHead, None, seed=10, hidden_units=8)
    x = torch.from_numpy(np.random.default_rng(11).normal(size=(1, 6)).astype(np.float32))
    got = []
    for hidden in (x, x.clone().requires_grad_(), x.double(), x.numpy()):
        head.observe(0, torch.tensor([[0, 1]]), torch.full((1, K), 0.5), hidden)
        got.append(head.scores([1, 2]))
    for scores in got[1:]:
        np.testing.assert_allclose(scores, got[0], rtol=1e-6, atol=1e-7)
