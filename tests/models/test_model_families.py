"""Every family's adapter, on its tiny model: it finds exactly the MoE layers, reads and writes experts
exactly, and its canonical layout plus `expert_forward` reproduces the family's own expert arithmetic."""

from __future__ import annotations

import pytest
import torch

from prophet.models import SPECS, MoELayer, expert_forward, get_spec, moe_layers

# One spec per family: Mixtral, Qwen and gpt-oss have several specs of the same structure.
_BY_TYPE: dict = {}
for _s in SPECS:
    _BY_TYPE.setdefault(_s.model_type, _s)
FAMILY_SPECS = list(_BY_TYPE.values())
FAMILY_IDS = list(_BY_TYPE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def forward(model, spec, ids):
    if spec.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids)
    return model(input_ids=ids)


def hidden_input(spec, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    # gpt-oss: large enough inputs that the clamp at swiglu_limit is exercised
    scale = 40.0 if spec.model_type == "gpt_oss" else scale
    return torch.randn(2, 11, spec.tiny().hidden_size, generator=gen) * scale


def canonical_experts(
    layer: MoELayer, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """What a runtime computes from the canonical tensors: sum_k weights[t, k] * expert_{index[t, k]}(x[t])."""
    out = torch.zeros_like(x)
    for e in index.unique().tolist():
        rows, slot = (index == e).nonzero(as_tuple=True)
        y = expert_forward(layer.fmt, layer.get_expert(e), x[rows])
        out.index_add_(0, rows, y * weights[rows, slot, None])
    return out


def captured_expert_call(layer: MoELayer, hidden: torch.Tensor):
    """Run the block and return the experts module's own call (args, kwargs, output)."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output)

    handle = layer.experts.register_forward_hook(hook, with_kwargs=True)
    try:
        layer.block(hidden)
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"], seen["output"]


def expected_layer_indices(spec) -> list[int]:
    tiny = spec.tiny()
    decoder = list(tiny.moe_layer_indices)
    if not tiny.is_encoder_decoder:
        return decoder
    return decoder + [tiny.encoder_layers + i for i in decoder]  # encoder blocks first, then decoder blocks


@pytest.fixture(scope="module", params=FAMILY_SPECS, ids=FAMILY_IDS)
def family(request):
    spec = request.param
    return spec, spec.tiny_model(seed=0)


def test_tiny_model_runs_and_routing_varies_across_tokens(family):
    spec, model = family
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    chosen: dict[int, set[int]] = {}
    layers = moe_layers(model)

    def record(layer):
        def hook(module, args, kwargs, output):
            _, index, _ = layer.unpack_call(*args, **kwargs) if layer.unpack_call else args[:3]
            assert index.dtype == torch.int64 and index.shape[-1] == layer.top_k
            chosen.setdefault(layer.moe_index, set()).update(index.flatten().tolist())

        return hook

    handles = [la.experts.register_forward_hook(record(la), with_kwargs=True) for la in layers]
    with torch.no_grad():
        logits = forward(model, spec, ids).logits
    for h in handles:
        h.remove()
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()
    assert set(chosen) == {la.moe_index for la in layers}, "every MoE layer ran"
    for moe_index, experts in chosen.items():
        assert len(experts) > spec.top_k, f"MoE layer {moe_index}: all tokens picked the same experts"


def test_adapter_finds_exactly_the_moe_layers(family):
    spec, model = family
    tiny = spec.tiny()
    layers = moe_layers(model)
    assert [la.layer_index for la in layers] == expected_layer_indices(spec)
    assert [la.moe_index for la in layers] == list(range(tiny.num_moe_layers))
    assert len({la.name for la in layers}) == len(layers)
    for la in layers:
        assert model.get_submodule(la.name) is la.experts is getattr(la.parent, la.attr)
        assert (la.num_experts, la.top_k, la.fmt) == (tiny.num_experts, tiny.top_k, tiny.expert_format)
        assert la.router is not None and la.router is not la.experts
        assert (la.shared_experts is not None) == bool(tiny.num_shared_experts)
        assert (la.shared_gate is not None) == tiny.shared_expert_gate
        assert la.expert_parameters() == list(la.experts.parameters())
        for e in (0, la.num_experts - 1):
            assert {k: tuple(v.shape) for k, v in la.get_expert(e).items()} == la.fmt.shapes


def test_switch_names_the_stack():
    layers = moe_layers(get_spec("switch").tiny_model())
    assert [la.name.split(".")[0] for la in layers] == ["encoder", "encoder", "decoder", "decoder"]
    assert [la.extra["stack_layer"] for la in layers] == [1, 3, 1, 3]


def test_get_set_round_trip_is_bit_exact_and_set_writes(family):
    spec, model = family
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in moe_layers(model):
        first, last = 0, layer.num_experts - 1
        a = {k: v.clone() for k, v in layer.get_expert(first).items()}
        b = {k: v.clone() for k, v in layer.get_expert(last).items()}
        layer.set_expert(first, b)
        layer.set_expert(last, a)
        swapped = layer.get_expert(first)
        assert all(torch.equal(swapped[k], b[k]) for k in b), "set_expert did not write"
        layer.set_expert(first, a)
        layer.set_expert(last, b)
        for e in range(layer.num_experts):
            layer.set_expert(e, {k: v.clone() for k, v in layer.get_expert(e).items()})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_canonical_layout_reproduces_the_experts_module(family):
    spec, model = family
    for layer in moe_layers(model):
        with torch.no_grad():
            args, kwargs, native = captured_expert_call(layer, hidden_input(spec))
            if layer.unpack_call is not None:
                hidden, index, weights = layer.unpack_call(*args, **kwargs)
            else:
                hidden, index, weights = args[:3]
            out = canonical_experts(layer, hidden, index, weights)
            if layer.pack_output is not None:
                out = layer.pack_output(out, args, kwargs)
        assert out.shape == native.shape
        assert rel_err(out, native) < 1e-5
        if layer.fmt.activation == "gpt_oss":
            gate = (
                torch.cat([layer.get_expert(e)["w1"][: layer.fmt.intermediate_size] for e in range(2)])
                @ hidden.T
            )
            assert gate.abs().max() > layer.fmt.swiglu_limit, "the test input must reach the clamp"


def test_route_and_shared_experts_rebuild_the_whole_block(family):
    # The block's output equals experts(route(h)) + the shared expert(s): router and shared modules are the
    # ones the family really uses.
    spec, model = family
    for layer in moe_layers(model):
        hidden = hidden_input(spec)
        with torch.no_grad():
            block_out = layer.block(hidden)
            block_out = block_out[0] if isinstance(block_out, tuple) else block_out
            index, weights = layer.route(hidden)
            flat = hidden.reshape(-1, hidden.shape[-1])
            rebuilt = canonical_experts(layer, flat, index, weights)
            if layer.shared_experts is not None:
                shared = layer.shared_experts(flat)
                if layer.shared_gate is not None:
                    shared = torch.sigmoid(layer.shared_gate(flat)) * shared
                rebuilt = rebuilt + shared
        assert index.shape == (flat.shape[0], layer.top_k)
        assert rel_err(rebuilt, block_out.reshape(flat.shape)) < 1e-5


def test_switch_tokens_over_capacity_get_weight_zero():
    spec = get_spec("switch")
    layer = moe_layers(spec.tiny_model())[0]
    hidden = torch.randn(1, 64, 64)  # 64 tokens onto 8 experts of capacity 4: most overflow
    with torch.no_grad():
        args, kwargs, native = captured_expert_call(layer, hidden)
    _, index, weights = layer.unpack_call(*args, **kwargs)
    dropped = weights[:, 0] == 0
    assert dropped.any() and (~dropped).any()
    assert ((index >= 0) & (index < layer.num_experts)).all()
    assert native[dropped].abs().max() == 0
