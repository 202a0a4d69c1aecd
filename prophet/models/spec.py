"""`ModelSpec`: the published shape of a real MoE model, its derived sizes, and the models built from it.

Sizes are computed from the spec alone (no transformers import, no allocation) so the memory planner can reason
about an 80 GB GPU on a laptop; tests hold every formula to the parameter count of the transformers model built
on the ``meta`` device. `ModelSpec.tiny` keeps a family's routing structure at toy sizes for CPU tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prophet.errors import ConfigError
from prophet.models.adapter import ExpertFormat, canonical_activation
from prophet.models.families import FAMILY_ADAPTERS

ATTENTION_KINDS = ("gqa", "mla", "t5")
NORM_KINDS = ("rms", "layernorm")  # "layernorm" has a bias; bias-free LayerNorm counts like RMSNorm
QK_NORM_KINDS = ("", "head", "full")

# Buffers that real checkpoints fill but transformers initialises to zeros; tiny models randomise them too.
_RANDOM_BUFFERS = ("e_score_correction_bias",)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ModelSpec:
    """Published configuration of one MoE model, as in its ``config.json`` on the Hugging Face hub.

    Layer counts are per stack; ``encoder_layers > 0`` marks an encoder-decoder model (Switch), whose encoder
    and decoder share the MoE pattern. A layer ``i`` is MoE when ``i >= first_dense_layers`` and
    ``i % moe_layer_period == moe_layer_offset``; it has attention when ``i % attn_layer_period ==
    attn_layer_offset`` (Jamba's other layers are Mamba); with ``sliding_window`` set, attention layer ``i`` is
    full only when ``i % full_attention_period == full_attention_period - 1`` (gpt-oss alternates).
    ``hf_extra`` holds further published config values passed verbatim to transformers (dotted keys reach
    sub-configs, e.g. ``ffn_config.moe_jitter_eps``).
    """

    name: str
    hf_repo: str
    model_type: str
    published_params: float  # total parameters as announced by the authors (0 when none, e.g. tiny specs)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int  # I of one routed expert
    num_experts: int
    top_k: int
    context_length: int  # context the model was trained / released for, without further RoPE scaling
    max_position_embeddings: int = 0  # config value when it differs from context_length
    intermediate_size: int = 0  # width of the dense FFN layers (0: there are none)
    num_shared_experts: int = 0
    shared_intermediate_size: int = (
        0  # width of the always-on shared expert MLP (all shared experts together)
    )
    shared_expert_gate: bool = False  # Qwen-MoE scales the shared expert by sigmoid(Linear(H, 1))
    first_dense_layers: int = 0
    moe_layer_period: int = 1
    moe_layer_offset: int = 0
    activation: str = "silu"  # transformers name, or "gpt_oss"
    glu: bool = True
    expert_bias: bool = False
    router_bias: bool = False
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    norm: str = "rms"
    attention: str = "gqa"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = ""  # "head": per-head RMSNorm (Qwen3); "full": over all heads (OLMoE)
    attention_sinks: bool = False
    q_lora_rank: int = 0  # MLA (DeepSeek); 0 = plain q projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int = 0
    full_attention_period: int = 1
    attn_layer_period: int = 1
    attn_layer_offset: int = 0
    mamba_d_state: int = 0
    mamba_d_conv: int = 0
    mamba_expand: int = 0
    mamba_dt_rank: int = 0
    encoder_layers: int = 0
    relative_attention_buckets: int = 0  # T5-style relative position bias (Switch)
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    hf_extra: tuple[tuple[str, Any], ...] = ()
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim")
        for f in sizes + ("moe_intermediate_size", "num_experts", "top_k", "context_length"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{self.name}: {f}={getattr(self, f)} must be positive")
        if not self.top_k < self.num_experts:
            raise ConfigError(f"{self.name}: top_k={self.top_k} must be below num_experts={self.num_experts}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"{self.name}: attention={self.attention!r}; choose one of {ATTENTION_KINDS}")
        if self.norm not in NORM_KINDS:
            raise ConfigError(f"{self.name}: norm={self.norm!r}; choose one of {NORM_KINDS}")
        if self.qk_norm not in QK_NORM_KINDS:
            raise ConfigError(f"{self.name}: qk_norm={self.qk_norm!r}; choose one of {QK_NORM_KINDS}")
        if self.attention == "mla" and not (self.kv_lora_rank and self.qk_rope_head_dim and self.v_head_dim):
            raise ConfigError(
                f"{self.name}: attention='mla' needs kv_lora_rank, qk_rope_head_dim and v_head_dim"
            )
        for period, offset in (
            ("moe_layer_period", "moe_layer_offset"),
            ("attn_layer_period", "attn_layer_offset"),
        ):
            if not 0 <= getattr(self, offset) < getattr(self, period):
                raise ConfigError(f"{self.name}: {offset} must lie in [0, {period})")
        if self.attn_layer_period > 1 and not self.mamba_d_state:
            raise ConfigError(f"{self.name}: layers without attention need the mamba_* sizes")
        if self.num_shared_experts and not self.shared_intermediate_size:
            raise ConfigError(f"{self.name}: num_shared_experts needs shared_intermediate_size")
        if self.num_moe_layers == 0:
            raise ConfigError(
                f"{self.name}: no layer is MoE; check first_dense_layers and moe_layer_period/offset"
            )

    # -- structure ----------------------------------------------------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """MoE layers of one stack (the decoder; the encoder has the same pattern)."""
        return tuple(i for i in range(self.num_layers) if self._is_moe(i))

    def _is_moe(self, i: int) -> bool:
        return i >= self.first_dense_layers and i % self.moe_layer_period == self.moe_layer_offset

    def _stack_moe_layers(self, layers: int) -> int:
        return sum(self._is_moe(i) for i in range(layers))

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the whole model (encoder and decoder together for encoder-decoder models)."""
        return self._stack_moe_layers(self.num_layers) + self._stack_moe_layers(self.encoder_layers)

    @property
    def num_dense_layers(self) -> int:
        """Layers whose FFN is a dense MLP."""
        return self.num_layers + self.encoder_layers - self.num_moe_layers

    @property
    def attention_layer_indices(self) -> tuple[int, ...]:
        return tuple(
            i for i in range(self.num_layers) if i % self.attn_layer_period == self.attn_layer_offset
        )

    @property
    def sliding_layer_indices(self) -> tuple[int, ...]:
        """Attention layers that see only the last ``sliding_window`` tokens."""
        if not self.sliding_window:
            return ()
        p = self.full_attention_period
        return tuple(i for i in self.attention_layer_indices if i % p != p - 1)

    @property
    def num_full_attention_layers(self) -> int:
        return len(self.attention_layer_indices) - len(self.sliding_layer_indices)

    @property
    def num_mamba_layers(self) -> int:
        return self.num_layers - len(self.attention_layer_indices)

    # -- parameters ---------------------------------------------------------------------------------------------
    @property
    def expert_format(self) -> ExpertFormat:
        """The canonical format of one routed expert, as the family's adapter reports it."""
        options: dict[str, Any] = {"activation": canonical_activation(self.activation)}
        if self.activation == "gpt_oss":
            extra = self.hf_extra_dict
            options.update(
                swiglu_alpha=extra.get("swiglu_alpha", 1.702), swiglu_limit=extra.get("swiglu_limit", 7.0)
            )
        storage = FAMILY_ADAPTERS[self.model_type].storage if self.model_type in FAMILY_ADAPTERS else "fused"
        return ExpertFormat(
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size,
            glu=self.glu,
            has_bias=self.expert_bias,
            storage=storage,
            **options,
        )

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self.expert_format.numel

    def expert_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one routed expert in ``dtype`` (the unit the cache moves)."""
        return self.expert_params * _dtype_size(dtype)

    @property
    def all_expert_params(self) -> int:
        """Parameters of every routed expert of every MoE layer (what offloading keeps off the GPU)."""
        return self.expert_params * self.num_experts * self.num_moe_layers

    def all_expert_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.all_expert_params * _dtype_size(dtype)

    @property
    def total_params(self) -> int:
        """Every parameter of the transformers model (tied embeddings once; buffers excluded)."""
        return sum(self.param_breakdown.values())

    @property
    def non_expert_params(self) -> int:
        """Everything but the routed experts: attention, embeddings, norms, routers, dense and shared MLPs."""
        return self.total_params - self.all_expert_params

    def non_expert_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes that stay resident on the GPU in ``dtype``."""
        return self.non_expert_params * _dtype_size(dtype)

    @property
    def active_params(self) -> int:
        """Parameters one token uses: non-expert ones plus ``top_k`` routed experts per MoE layer."""
        return self.non_expert_params + self.top_k * self.expert_params * self.num_moe_layers

    def _norm(self, size: int) -> int:
        return size * (2 if self.norm == "layernorm" else 1)

    def _linear(self, n_in: int, n_out: int, bias: bool = False) -> int:
        return n_in * n_out + (n_out if bias else 0)

    def _mlp(self, width: int) -> int:
        return (3 if self.glu else 2) * self.hidden_size * width

    def _attention(self) -> int:
        h, nh, nkv, hd = self.hidden_size, self.num_attention_heads, self.num_kv_heads, self.head_dim
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = (
                    self._linear(h, self.q_lora_rank)
                    + self.q_lora_rank
                    + self._linear(self.q_lora_rank, nh * qk)
                )
            else:
                q = self._linear(h, nh * qk)
            kv = self._linear(h, self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self._linear(self.kv_lora_rank, nh * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self._linear(nh * self.v_head_dim, h)
        out = self._linear(h, nh * hd, self.qkv_bias) + 2 * self._linear(h, nkv * hd, self.qkv_bias)
        out += self._linear(nh * hd, h, self.o_bias)
        out += {"": 0, "head": 2 * hd, "full": (nh + nkv) * hd}[self.qk_norm]
        return out + (nh if self.attention_sinks else 0)

    def _mamba(self) -> int:
        h, di, n, r = (
            self.hidden_size,
            self.mamba_expand * self.hidden_size,
            self.mamba_d_state,
            self.mamba_dt_rank,
        )
        conv = di * self.mamba_d_conv + di
        return h * 2 * di + conv + di * (r + 2 * n) + (r * di + di) + di * n + di + di * h + (r + 2 * n)

    def _moe_block_non_expert(self) -> int:
        h = self.hidden_size
        out = self._linear(h, self.num_experts, self.router_bias)
        if self.num_shared_experts:
            out += self._mlp(self.shared_intermediate_size)
        return out + (h if self.shared_expert_gate else 0)

    @property
    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts by component; their sum is `total_params`."""
        h, v = self.hidden_size, self.vocab_size
        stacks = [(self.num_layers, self.is_encoder_decoder)] + (
            [(self.encoder_layers, False)] if self.is_encoder_decoder else []
        )
        out = dict.fromkeys(
            ("embeddings", "attention", "mamba", "norms", "dense_mlp", "routers_shared", "experts"), 0
        )
        # transformers v5 ties an encoder-decoder's two input embeddings to ``shared`` only with tied embeddings
        inputs = 3 if self.is_encoder_decoder and not self.tie_word_embeddings else 1
        lm_head = 0 if self.tie_word_embeddings else v * h + (v if self.lm_head_bias else 0)
        out["embeddings"] = inputs * v * h + lm_head
        for layers, cross_attention in stacks:
            attention_layers = sum(
                i % self.attn_layer_period == self.attn_layer_offset for i in range(layers)
            )
            moe_layers = self._stack_moe_layers(layers)
            out["attention"] += attention_layers * self._attention() * (2 if cross_attention else 1)
            if self.relative_attention_buckets:
                out["attention"] += self.relative_attention_buckets * self.num_attention_heads
            out["mamba"] += (layers - attention_layers) * self._mamba()
            out["norms"] += self._norm(h) * (layers * (3 if cross_attention else 2) + 1)
            out["dense_mlp"] += (layers - moe_layers) * self._mlp(self.intermediate_size)
            out["routers_shared"] += moe_layers * self._moe_block_non_expert()
            out["experts"] += moe_layers * self.num_experts * self.expert_params
        return out

    # -- KV cache -----------------------------------------------------------------------------------------------
    def _kv_per_layer_token(self, dtype: torch.dtype) -> int:
        if (
            self.attention == "mla"
        ):  # the compressed latent and the shared RoPE key, as transformers caches them
            return (self.kv_lora_rank + self.qk_rope_head_dim) * _dtype_size(dtype)
        return 2 * self.num_kv_heads * self.head_dim * _dtype_size(dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes the KV cache grows per token (decoder self-attention layers with full attention).

        Sliding-window layers and Mamba state are bounded per sequence: `kv_bytes` adds them.
        """
        return self.num_full_attention_layers * self._kv_per_layer_token(dtype)

    def kv_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16, batch: int = 1) -> int:
        """KV cache (and recurrent state) for ``batch`` sequences of ``context`` tokens."""
        windowed = (
            len(self.sliding_layer_indices)
            * min(context, self.sliding_window)
            * self._kv_per_layer_token(dtype)
        )
        di = self.mamba_expand * self.hidden_size
        mamba = self.num_mamba_layers * di * (self.mamba_d_conv + self.mamba_d_state) * _dtype_size(dtype)
        return batch * (context * self.kv_bytes_per_token(dtype) + windowed + mamba)

    # -- transformers -------------------------------------------------------------------------------------------
    @property
    def hf_extra_dict(self) -> dict[str, Any]:
        return dict(self.hf_extra)

    @property
    def rope_parameters(self) -> dict[str, Any]:
        scaling = dict(self.rope_scaling)
        return {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": self.rope_theta, **scaling}

    def hf_config(self) -> Any:
        """The transformers config of this model (the published values; weights are never downloaded)."""
        from transformers import CONFIG_MAPPING

        try:
            builder = _HF_KWARGS[self.model_type]
        except KeyError:
            raise ConfigError(
                f"{self.name}: no config builder for model_type={self.model_type!r}; known: {', '.join(_HF_KWARGS)}"
            ) from None
        kwargs = builder(self)
        for key, value in self.hf_extra:
            *parents, leaf = key.split(".")
            target = kwargs
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = value
        return CONFIG_MAPPING[self.model_type](**kwargs)

    def _auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM

    def meta_model(self, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        """The full-size transformers model on the ``meta`` device: real shapes and module tree, no memory."""
        config = self.hf_config()
        with torch.device("meta"):
            return self._auto_class().from_config(config, dtype=dtype)

    def tiny(self) -> ModelSpec:
        """The same family and routing structure at toy sizes (hidden 64, vocab 128, a handful of layers).

        Kept: top-k, shared experts and their width ratio, dense first layers, the MoE / attention / sliding
        layer patterns, MLA, biases, activation. Reduced: experts to ``min(E, max(8, 4k))`` (a multiple of the
        router's groups), so top-k stays below E and routing still varies across tokens.
        """
        extra = self.hf_extra_dict
        groups = int(extra.get("n_group") or 1)
        experts = min(self.num_experts, max(8, 4 * self.top_k))
        experts = math.ceil(experts / groups) * groups
        heads = 4
        kv_heads = max(1, heads * self.num_kv_heads // self.num_attention_heads)
        attn_period = min(self.attn_layer_period, 4)
        attn_offset = self.attn_layer_offset * attn_period // self.attn_layer_period
        layers = attn_offset + 1
        while sum(self._is_moe(i) for i in range(layers)) < 2:
            layers += 1
        moe_i = 32
        if "expert_capacity" in extra:
            extra["expert_capacity"] = (
                4  # small enough that some tokens overflow and are dropped, as in training
            )
        extra.update(pad_token_id=0, eos_token_id=1)  # inside the tiny vocabulary
        return dataclasses.replace(
            self,
            name=f"{self.name}-tiny",
            hf_repo="",
            published_params=0.0,
            vocab_size=128,
            hidden_size=64,
            num_layers=layers,
            encoder_layers=layers if self.is_encoder_decoder else 0,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=16,
            moe_intermediate_size=moe_i,
            intermediate_size=moe_i
            if self.intermediate_size == self.moe_intermediate_size
            else 96 * bool(self.intermediate_size),
            num_experts=experts,
            shared_intermediate_size=self.shared_intermediate_size * moe_i // self.moe_intermediate_size,
            q_lora_rank=24 if self.q_lora_rank else 0,
            kv_lora_rank=16 if self.kv_lora_rank else 0,
            qk_nope_head_dim=8 if self.qk_nope_head_dim else 0,
            qk_rope_head_dim=8 if self.qk_rope_head_dim else 0,
            v_head_dim=8 if self.v_head_dim else 0,
            sliding_window=min(self.sliding_window, 4),
            attn_layer_period=attn_period,
            attn_layer_offset=attn_offset,
            mamba_d_state=min(self.mamba_d_state, 4),
            mamba_dt_rank=min(self.mamba_dt_rank, 8),
            hf_extra=tuple(extra.items()),
            aliases=(),
        )

    def tiny_model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A randomly initialised model of `tiny` in eval mode, identical for identical ``seed``.

        Every parameter is redrawn from N(0, 0.05) (norm weights from 1 + N(0, 0.05)) with a private generator:
        transformers leaves some routers and biases at zero, which would send every token to the same experts.
        The global RNG is left as it was.
        """
        config = self.tiny().hf_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._auto_class().from_config(config)
        _randomize(model, seed)
        return model.to(dtype).eval()


def _randomize(model: nn.Module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            is_norm = "norm" in type(module).__name__.lower()
            for pname, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen) * std
                p.copy_(noise + 1 if is_norm and pname == "weight" else noise)
            for bname, b in module.named_buffers(recurse=False):
                if bname in _RANDOM_BUFFERS:
                    b.copy_(torch.randn(b.shape, generator=gen) * std)


# -- spec -> transformers config kwargs, per family ------------------------------------------------------------


def _require(spec: ModelSpec, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{spec.name}: transformers' {spec.model_type} cannot express {what}")


def _decoder_kwargs(spec: ModelSpec) -> dict[str, Any]:
    _require(spec, not spec.is_encoder_decoder, "an encoder")
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings or spec.context_length,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": spec.activation,
        "rope_parameters": spec.rope_parameters,
    }


def _every_layer_moe(spec: ModelSpec) -> None:
    _require(spec, spec.first_dense_layers == 0 and spec.moe_layer_period == 1, "dense layers")


def _mixtral(spec: ModelSpec) -> dict[str, Any]:
    _every_layer_moe(spec)
    return {
        **_decoder_kwargs(spec),
        "head_dim": spec.head_dim,
        "intermediate_size": spec.moe_intermediate_size,
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "sliding_window": spec.sliding_window or None,
    }


def _phimoe(spec: ModelSpec) -> dict[str, Any]:
    return {**_mixtral(spec), "attention_bias": spec.qkv_bias, "lm_head_bias": spec.lm_head_bias}


def _qwen_moe(spec: ModelSpec) -> dict[str, Any]:
    # transformers: layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers
    period = spec.moe_layer_period
    _require(spec, spec.moe_layer_offset == period - 1, "an MoE layer offset other than period - 1")
    kwargs = {
        **_decoder_kwargs(spec),
        "intermediate_size": spec.intermediate_size,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "decoder_sparse_step": period,
        "mlp_only_layers": list(range(spec.first_dense_layers)),
    }
    if spec.model_type == "qwen2_moe":
        _require(
            spec, spec.hidden_size == spec.num_attention_heads * spec.head_dim, "head_dim != hidden/heads"
        )
        kwargs.update(shared_expert_intermediate_size=spec.shared_intermediate_size, qkv_bias=spec.qkv_bias)
    else:
        kwargs.update(head_dim=spec.head_dim, attention_bias=spec.qkv_bias)
    return kwargs


def _olmoe(spec: ModelSpec) -> dict[str, Any]:
    _every_layer_moe(spec)
    _require(spec, spec.hidden_size == spec.num_attention_heads * spec.head_dim, "head_dim != hidden/heads")
    return {
        **_decoder_kwargs(spec),
        "intermediate_size": spec.moe_intermediate_size,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
    }


def _deepseek(spec: ModelSpec) -> dict[str, Any]:
    _require(spec, spec.moe_layer_period == 1, "an MoE layer period")
    _require(
        spec,
        spec.shared_intermediate_size == spec.num_shared_experts * spec.moe_intermediate_size,
        "shared width",
    )
    return {
        **_decoder_kwargs(spec),
        "intermediate_size": spec.intermediate_size,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "n_routed_experts": spec.num_experts,
        "n_shared_experts": spec.num_shared_experts,
        "num_experts_per_tok": spec.top_k,
        "first_k_dense_replace": spec.first_dense_layers,
        "q_lora_rank": spec.q_lora_rank or None,
        "kv_lora_rank": spec.kv_lora_rank,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
    }


def _gpt_oss(spec: ModelSpec) -> dict[str, Any]:
    _every_layer_moe(spec)
    kwargs = _decoder_kwargs(spec)
    del kwargs["hidden_act"]  # the experts' clamped SwiGLU is fixed; hidden_act is unused
    sliding = spec.sliding_layer_indices
    return {
        **kwargs,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.moe_intermediate_size,
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "sliding_window": spec.sliding_window or None,
        "layer_types": [
            "sliding_attention" if i in sliding else "full_attention" for i in range(spec.num_layers)
        ],
        "attention_bias": spec.qkv_bias,
    }


def _dbrx(spec: ModelSpec) -> dict[str, Any]:
    _every_layer_moe(spec)
    _require(spec, spec.hidden_size == spec.num_attention_heads * spec.head_dim, "head_dim != hidden/heads")
    return {
        "vocab_size": spec.vocab_size,
        "d_model": spec.hidden_size,
        "n_heads": spec.num_attention_heads,
        "n_layers": spec.num_layers,
        "max_seq_len": spec.max_position_embeddings or spec.context_length,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "rope_parameters": spec.rope_parameters,
        "attn_config": {"kv_n_heads": spec.num_kv_heads, "rope_theta": spec.rope_theta},
        "ffn_config": {
            "ffn_hidden_size": spec.moe_intermediate_size,
            "moe_num_experts": spec.num_experts,
            "moe_top_k": spec.top_k,
            "ffn_act_fn": {"name": spec.activation},
        },
    }


def _jamba(spec: ModelSpec) -> dict[str, Any]:
    _require(spec, spec.first_dense_layers == 0, "dense first layers")
    _require(
        spec, spec.intermediate_size == spec.moe_intermediate_size, "dense and expert MLPs of different width"
    )
    _require(spec, spec.hidden_size == spec.num_attention_heads * spec.head_dim, "head_dim != hidden/heads")
    kwargs = _decoder_kwargs(spec)
    del kwargs["rope_parameters"]  # Jamba has no positional encoding
    return {
        **kwargs,
        "intermediate_size": spec.moe_intermediate_size,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "expert_layer_period": spec.moe_layer_period,
        "expert_layer_offset": spec.moe_layer_offset,
        "attn_layer_period": spec.attn_layer_period,
        "attn_layer_offset": spec.attn_layer_offset,
        "mamba_d_state": spec.mamba_d_state,
        "mamba_d_conv": spec.mamba_d_conv,
        "mamba_expand": spec.mamba_expand,
        "mamba_dt_rank": spec.mamba_dt_rank,
    }


def _switch(spec: ModelSpec) -> dict[str, Any]:
    # transformers: block i of a stack is sparse when i % step == 1 (or step == 1), step = layers // sparse layers
    period = spec.moe_layer_period
    _require(spec, spec.is_encoder_decoder and spec.encoder_layers == spec.num_layers, "unequal stacks")
    _require(
        spec, spec.intermediate_size == spec.moe_intermediate_size, "dense and expert MLPs of different width"
    )
    _require(
        spec, spec.first_dense_layers == 0 and spec.moe_layer_offset == min(1, period - 1), "this MoE pattern"
    )
    _require(spec, spec.num_layers % period == 0, "a layer count that is not a multiple of the MoE period")
    return {
        "vocab_size": spec.vocab_size,
        "d_model": spec.hidden_size,
        "d_kv": spec.head_dim,
        "d_ff": spec.moe_intermediate_size,
        "num_heads": spec.num_attention_heads,
        "num_layers": spec.encoder_layers,
        "num_decoder_layers": spec.num_layers,
        "num_sparse_encoder_layers": spec.num_layers // period,
        "num_sparse_decoder_layers": spec.num_layers // period,
        "num_experts": spec.num_experts,
        "dense_act_fn": spec.activation,
        "relative_attention_num_buckets": spec.relative_attention_buckets,
        "tie_word_embeddings": spec.tie_word_embeddings,
    }


_HF_KWARGS: dict[str, Callable[[ModelSpec], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "phimoe": _phimoe,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "gpt_oss": _gpt_oss,
    "dbrx": _dbrx,
    "jamba": _jamba,
    "switch_transformers": _switch,
}
