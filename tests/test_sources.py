"""Already-quantized experts: transformers' FP8Experts modules and gpt-oss MXFP4 checkpoints go into the store
as they are (no dense copy), compute like their dequantized weights, and unwrap restores the modules."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from test_wrap import rel_diff, tiny_mixtral

import prophet
from prophet.errors import ConfigError, UnsupportedModelError
from prophet.formats import dequantize, quantize, weight_format
from prophet.models import moe_layers
from prophet.wrap import runtime_of


def fp8_experts_model(block=(128, 128)) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model with transformers' FP8Experts, the same model with their dequantized weights)``."""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    torch.manual_seed(0)
    model = tiny_mixtral()  # H=32, I=48: one 128x128 block per matrix (gate_up: 96 rows)
    wf = weight_format("fp8")
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for layer, ref in zip(moe_layers(model), moe_layers(dense), strict=True):
            fp8 = FP8Experts(model.config, block_size=block)
            fp8.gate_up_proj_scale_inv.zero_()  # padding rows past the blocks stay zero (unused)
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(layer.experts, name)  # [E, N, K]
                for e in range(w.shape[0]):
                    values, scales = quantize(wf, w[e])
                    getattr(fp8, name)[e].copy_(values)
                    getattr(fp8, f"{name}_scale_inv")[e, : scales.shape[0], : scales.shape[1]].copy_(scales)
                    getattr(ref.experts, name)[e].copy_(dequantize(wf, values, scales, tuple(w[e].shape)))
            setattr(layer.parent, layer.attr, fp8)
    return model, dense


@pytest.mark.parametrize("cache", [{}, {"slots_per_layer": 1}], ids=["all", "one_per_layer"])
def test_fp8_experts_modules_are_stored_as_they_are_and_match_their_dequantized_weights(cache):
    model, dense = fp8_experts_model()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = dense(ids).logits
        prophet.wrap(model, device="cpu", **cache)
        out = model(ids).logits
    runtime = runtime_of(model)
    assert runtime.store.weights.name == "fp8" and runtime.store.dtype == torch.uint8
    assert rel_diff(out, expected) <= 1e-5


def test_unwrap_restores_the_fp8_modules_bit_for_bit():
    model, _ = fp8_experts_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prophet.unwrap(prophet.wrap(model, device="cpu"))
    for name, p in model.named_parameters():
        assert p.dtype == before[name].dtype and torch.equal(p.view(torch.uint8), before[name].view(torch.uint8)), name


def test_fp8_experts_refuse_a_second_quantization_and_per_tensor_scales():
    model, _ = fp8_experts_model()
    with pytest.raises(ConfigError, match="already quantized"):
        prophet.wrap(model, device="cpu", expert_dtype="int4")
    model, _ = fp8_experts_model(block=None)
    with pytest.raises(UnsupportedModelError, match="per-tensor"):
        prophet.wrap(model, device="cpu")


def tiny_gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"] * 2, tie_word_embeddings=False)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def saved_tensors(model, path) -> dict[str, torch.Tensor]:
    """``model.save_pretrained(path)``'s tensors, its shards removed (a quantized set replaces them)."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors |= load_file(f)
        f.unlink()
    return tensors


def write_checkpoint(path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    """One shard of ``tensors`` and the config's ``quantization_config``, as quantized checkpoints ship."""
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))


def save_mxfp4_checkpoint(model, path):
    """``model`` saved as gpt-oss ships: experts as MXFP4 ``*_blocks``/``*_scales`` (gate/up rows interleaved),
    everything else as is; returns the model with its experts replaced by the dequantized weights."""
    wf = weight_format("mxfp4")
    tensors = saved_tensors(model, path)
    with torch.no_grad():
        for layer in moe_layers(model):
            for name in ("gate_up_proj", "down_proj"):
                w = tensors.pop(f"{layer.name}.{name}").transpose(1, 2)  # [E, N, K], gpt-oss stores [E, K, N]
                blocks, scales = zip(*(quantize(wf, w[e]) for e in range(w.shape[0])), strict=True)
                blocks, scales = torch.stack(blocks), torch.stack(scales)  # [E, N, K/2], [E, N, K/32]
                tensors[f"{layer.name}.{name}_blocks"] = blocks.unflatten(-1, (-1, 16)).contiguous()
                tensors[f"{layer.name}.{name}_scales"] = scales.contiguous()
                deq = torch.stack([dequantize(wf, blocks[e], scales[e], tuple(w[e].shape)) for e in range(w.shape[0])])
                getattr(layer.experts, name).copy_(deq.transpose(1, 2))
    write_checkpoint(path, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return model


def test_mxfp4_blocks_dequantize_like_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    wf = weight_format("mxfp4")
    w = torch.randn(6, 64)
    blocks, scales = quantize(wf, w)
    theirs = convert_moe_packed_tensors(blocks.unflatten(-1, (-1, 16))[None], scales[None], dtype=torch.float32)[0]
    assert torch.equal(dequantize(wf, blocks, scales, (6, 64)), theirs.T)  # theirs comes transposed, [K, N]


def test_load_streams_a_gpt_oss_mxfp4_checkpoint_into_the_store(tmp_path):
    expected_model = save_mxfp4_checkpoint(tiny_gpt_oss(), tmp_path)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = expected_model(ids).logits
        model = prophet.load(tmp_path, dtype=torch.float32, device="cpu", slots_per_layer=2)
        out = model(ids).logits
    runtime = runtime_of(model)
    assert runtime.store.weights.name == "mxfp4"
    assert rel_diff(out, expected) <= 1e-5
    total = prophet.stats(model).total  # every copy moved one MXFP4 slab: values, e8m0 scales and biases
    assert total.misses > 0 and total.bytes_h2d == total.misses * runtime.store.slab_bytes
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), expected_model.generate(ids, **kwargs))


def test_unwrap_of_a_streamed_checkpoint_gives_the_dequantized_experts(tmp_path):
    expected_model = save_mxfp4_checkpoint(tiny_gpt_oss(), tmp_path)
    model = prophet.unwrap(prophet.load(tmp_path, dtype=torch.float32, device="cpu"))
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert rel_diff(model(ids).logits, expected_model(ids).logits) <= 1e-5


def save_fp8_checkpoint(path, layout: str):
    """A tiny Qwen3-MoE saved as block-wise FP8 checkpoints are (experts and attention projections fp8 with fp32
    ``weight_scale_inv`` per 128x128 block), experts one module per expert as Qwen3-FP8 and DeepSeek-V3 ship
    them (``per_expert``) or stacked under the experts module (``stacked``); returns the model holding the
    dequantized weights."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg).eval()
    wf = weight_format("fp8")
    tensors = saved_tensors(model, path)
    params = dict(model.named_parameters())

    def fp8(key: str) -> torch.Tensor:
        """Quantize checkpoint tensor ``key`` in place (adding its scale_inv); returns its dequantized weights."""
        values, scales = quantize(wf, tensors[key])
        tensors[key], tensors[f"{key}_scale_inv"] = values, scales
        return dequantize(wf, values, scales, tuple(values.shape))

    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(("q_proj.weight", "o_proj.weight"))]:
            params[key].copy_(fp8(key))
        for layer in moe_layers(model):
            for e in range(layer.num_experts):
                proj = {n: f"{layer.name}.{e}.{n}_proj.weight" for n in ("gate", "up", "down")}
                layer.experts.gate_up_proj[e].copy_(torch.cat((fp8(proj["gate"]), fp8(proj["up"]))))
                layer.experts.down_proj[e].copy_(fp8(proj["down"]))
            if layout == "stacked":
                def take(n: str, suffix: str, e: int, name: str = layer.name) -> torch.Tensor:
                    return tensors.pop(f"{name}.{e}.{n}_proj.{suffix}")

                for suffix, out in (("weight", ""), ("weight_scale_inv", "_scale_inv")):
                    experts = range(layer.num_experts)
                    tensors[f"{layer.name}.gate_up_proj{out}"] = torch.stack(
                        [torch.cat((take("gate", suffix, e), take("up", suffix, e))) for e in experts])
                    tensors[f"{layer.name}.down_proj{out}"] = torch.stack([take("down", suffix, e) for e in experts])
    write_checkpoint(path, tensors, {"quant_method": "fp8", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"})
    return model


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_load_streams_a_block_fp8_checkpoint_into_the_store(tmp_path, layout):
    expected_model = save_fp8_checkpoint(tmp_path, layout)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        expected = expected_model(ids).logits
        model = prophet.load(tmp_path, dtype=torch.float32, device="cpu", cache_slots=3)
        out = model(ids).logits
    runtime = runtime_of(model)
    assert runtime.store.weights.name == "fp8" and runtime.store.slab_bytes < runtime.store.fmt.nbytes(torch.bfloat16) / 1.9
    assert rel_diff(out, expected) <= 1e-5
    total = prophet.stats(model).total
    assert total.misses > 0 and total.bytes_h2d == total.misses * runtime.store.slab_bytes
