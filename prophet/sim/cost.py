"""The cost model: how long one MoE layer step computes, on the GPU or (missed experts) on the host CPU.

A decode step is a roofline per MoE layer: ``max(bytes read / HBM bandwidth, FLOPs / FLOP rate)``. Bytes read
are this layer's share of the non-expert weights (attention, norms, router, shared experts, dense layers, the
LM head; the embedding table is read one row per token, so it is left out), the distinct routed experts the
batch touches, and the batch's KV cache at ``context`` tokens. FLOPs are ``2 x active parameters`` per token
plus attention over the context. Every term comes from the model spec and the hardware profile; nothing is
fitted to a trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prophet.formats import expert_nbytes, weight_format
from prophet.hardware import HardwareProfile
from prophet.hybrid import MissCosts
from prophet.models.spec import ModelSpec


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CostModel:
    """Per-layer compute times of ``spec`` on ``profile`` at ``context`` tokens of KV per sequence.

    ``expert_dtype`` (a `prophet.formats.weight_format` name: "int4", "fp8", "mxfp4", "int3", ...) stores the
    routed experts in that format: each expert read or copied is its bytes, scales included."""

    spec: ModelSpec
    profile: HardwareProfile
    dtype: torch.dtype = torch.bfloat16
    context: int = 2048
    expert_dtype: str | None = None
    expert_bytes: int = field(init=False)
    layer_bytes: float = field(init=False)  # non-expert weight bytes read per MoE layer step
    kv_layer_bytes: float = field(init=False)  # KV bytes read per MoE layer step and sequence
    token_flops: float = field(init=False)  # FLOPs per MoE layer step and token

    def __post_init__(self) -> None:
        spec, size = self.spec, _dtype_size(self.dtype)
        L = spec.num_moe_layers
        embedding_table = spec.vocab_size * spec.hidden_size * size
        set_ = object.__setattr__  # frozen: derived values are fixed once here
        stored = spec.expert_bytes(self.dtype) if self.expert_dtype is None else expert_nbytes(
            spec.expert_format, weight_format(self.expert_dtype))
        set_(self, "expert_bytes", stored)
        set_(self, "layer_bytes", (spec.non_expert_bytes(self.dtype) - embedding_table) / L)
        set_(self, "kv_layer_bytes", spec.kv_bytes(self.context, self.dtype, 1) / L)
        attn = 4 * self.context * spec.num_attention_heads * spec.head_dim * len(spec.attention_layer_indices)
        set_(self, "token_flops", (2 * spec.active_params + attn) / L)

    def layer_seconds(self, distinct: float, batch: int) -> float:
        """GPU time of one MoE layer step: ``batch`` tokens touching ``distinct`` resident experts."""
        nbytes = self.layer_bytes + distinct * self.expert_bytes + batch * self.kv_layer_bytes
        return max(nbytes / (self.profile.hbm_gb_s * 1e9), batch * self.token_flops / self.profile.flops)

    def token_seconds(self, distinct_per_layer: float, batch: int) -> float:
        """All-resident GPU time of one decode step (every MoE layer) at a mean ``distinct_per_layer``."""
        return self.spec.num_moe_layers * self.layer_seconds(distinct_per_layer, batch)

    def copy_seconds(self) -> float:
        """Link time of one expert's host->device copy."""
        return self.profile.copy_seconds(self.expert_bytes)

    def link_budget(self, distinct: float, batch: int) -> dict[str, float]:
        """``copy_ms`` and ``layer_ms`` for `prophet.config.PrefetchConfig`: gate prefetches by what they can hide."""
        return {"copy_ms": self.copy_seconds() * 1e3, "layer_ms": self.layer_seconds(distinct, batch) * 1e3}

    def cpu_expert_seconds(self, tokens: int) -> float:
        """Host CPU time of one expert over ``tokens`` tokens: its weights stream from DRAM once."""
        return self.miss_costs().host_s(tokens)

    def miss_costs(self) -> MissCosts:
        """The costs `prophet.hybrid.decide` weighs, from the profile: a copy on the link, a host expert (weights
        from host DRAM once, or FLOPs at the host's rate), one more resident expert's reads on the GPU."""
        return MissCosts(
            copy_s=self.copy_seconds(),
            host_fixed_s=self.expert_bytes / (self.profile.host_gb_s * 1e9),
            host_token_s=2 * self.spec.expert_params / self.profile.cpu_flops,
            gpu_expert_s=self.expert_bytes / (self.profile.hbm_gb_s * 1e9),
        )


def expected_distinct(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a batch touches per layer under uniform, independent routing: E (1 - (1 - k/E)^B)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)
