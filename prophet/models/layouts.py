"""Expert storage layouts: exact conversion between a family's own expert tensors and the canonical layout.

Each ``*_access`` function inspects one experts module and returns an `ExpertAccess` whose ``get(e)`` gives
expert ``e`` in the canonical layout of `prophet.models.adapter` and whose ``set(e, tensors)`` writes such
tensors back. Conversions only slice, transpose and concatenate, so ``set(e, get(e))`` is bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prophet.errors import ConfigError, UnsupportedModelError
from prophet.formats import canonical_shapes

Tensors = dict[str, torch.Tensor]

# Per-expert projection names (gate, up, down) or (up, down) used by known one-module-per-expert models.
KNOWN_EXPERT_NAMES: tuple[tuple[str, ...], ...] = (
    ("gate_proj", "up_proj", "down_proj"),  # DeepSeek-MoE 16B, Qwen-style custom code
    ("w1", "w3", "w2"),  # Arctic, Mixtral's original code
    ("linear", "linear_v", "linear_1"),  # Grok-1
    ("wi", "wo"),  # Switch Transformers (non-gated)
)


@dataclass(frozen=True)
class ExpertAccess:
    """Sizes of one experts module and exact canonical readers/writers for it."""

    storage: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    glu: bool
    has_bias: bool
    get: Callable[[int], Tensors]
    set: Callable[[int, Tensors], None]


def _check(shapes: dict[str, tuple[int, ...]], tensors: Tensors) -> None:
    """Refuse tensors whose names or shapes differ from the canonical ones: ``copy_`` would broadcast silently."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != shapes:
        raise ConfigError(f"expert tensors {got} do not match the canonical shapes {shapes}")


def _index(num_experts: int, e: int) -> int:
    if not 0 <= e < num_experts:
        raise ConfigError(f"expert index {e} out of range: the layer has {num_experts} experts")
    return e


def fused_access(experts: nn.Module) -> ExpertAccess:
    """``gate_up_proj [E, N1, H]`` and ``down_proj [E, H, I]`` (N1 = 2I gated, I plain): canonical as stored."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if (
        gate_up.dim() != 3
        or down.dim() != 3
        or gate_up.shape[2] != down.shape[1]
        or gate_up.shape[0] != down.shape[0]
    ):
        raise UnsupportedModelError(
            f"gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not [E,N1,H] / [E,H,I]; "
            "for [E,H,2I] interleaved storage pass storage='fused_transposed_interleaved'"
        )
    num, n1, hidden = gate_up.shape
    inter = down.shape[2]
    if n1 not in (inter, 2 * inter):
        raise UnsupportedModelError(
            f"gate_up_proj has {n1} rows for intermediate size {inter}: expected {2 * inter} or {inter}"
        )
    shapes = canonical_shapes(hidden, inter, n1 == 2 * inter, False)

    def get(e: int) -> Tensors:
        e = _index(num, e)
        return {"w1": gate_up[e], "w2": down[e]}

    def set_(e: int, tensors: Tensors) -> None:
        e = _index(num, e)
        _check(shapes, tensors)
        with torch.no_grad():
            gate_up[e].copy_(tensors["w1"])
            down[e].copy_(tensors["w2"])

    return ExpertAccess("fused", num, hidden, inter, n1 == 2 * inter, False, get, set_)


def transposed_interleaved_access(experts: nn.Module) -> ExpertAccess:
    """gpt-oss: ``gate_up_proj [E, H, 2I]`` with gate in even and up in odd columns, biases, ``down_proj [E, I, H]``."""
    gate_up, gate_up_bias = experts.gate_up_proj, experts.gate_up_proj_bias
    down, down_bias = experts.down_proj, experts.down_proj_bias
    num, hidden, n1 = gate_up.shape
    inter = n1 // 2
    if n1 % 2 or tuple(down.shape) != (num, inter, hidden):
        raise UnsupportedModelError(
            f"gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not [E,H,2I] / [E,I,H]"
        )
    shapes = canonical_shapes(hidden, inter, True, True)

    def get(e: int) -> Tensors:
        e = _index(num, e)
        w, b = gate_up[e], gate_up_bias[e]
        return {
            "w1": torch.cat([w[:, 0::2].t(), w[:, 1::2].t()]),
            "w2": down[e].t(),
            "b1": torch.cat([b[0::2], b[1::2]]),
            "b2": down_bias[e],
        }

    def set_(e: int, tensors: Tensors) -> None:
        e = _index(num, e)
        _check(shapes, tensors)
        w1, b1 = tensors["w1"], tensors["b1"]
        with torch.no_grad():
            gate_up[e][:, 0::2].copy_(w1[:inter].t())
            gate_up[e][:, 1::2].copy_(w1[inter:].t())
            gate_up_bias[e][0::2].copy_(b1[:inter])
            gate_up_bias[e][1::2].copy_(b1[inter:])
            down[e].copy_(tensors["w2"].t())
            down_bias[e].copy_(tensors["b2"])

    return ExpertAccess("fused_transposed_interleaved", num, hidden, inter, True, True, get, set_)


def flat_split_access(experts: nn.Module, num_experts: int) -> ExpertAccess:
    """DBRX: ``mlp.w1`` (gate), ``mlp.v1`` (up) and ``mlp.w2`` (down, used as ``act @ w2``), each ``[E*I, H]``."""
    mlp = experts.mlp
    w1, v1, w2 = mlp.w1, mlp.v1, mlp.w2
    rows, hidden = w1.shape
    if rows % num_experts:
        raise UnsupportedModelError(f"mlp.w1 has {rows} rows, not a multiple of {num_experts} experts")
    inter = rows // num_experts
    shapes = canonical_shapes(hidden, inter, True, False)

    def part(t: torch.Tensor, e: int) -> torch.Tensor:
        return t.view(num_experts, inter, hidden)[e]

    def get(e: int) -> Tensors:
        e = _index(num_experts, e)
        return {"w1": torch.cat([part(w1, e), part(v1, e)]), "w2": part(w2, e).t()}

    def set_(e: int, tensors: Tensors) -> None:
        e = _index(num_experts, e)
        _check(shapes, tensors)
        with torch.no_grad():
            part(w1, e).copy_(tensors["w1"][:inter])
            part(v1, e).copy_(tensors["w1"][inter:])
            part(w2, e).copy_(tensors["w2"].t())

    return ExpertAccess("flat_split", num_experts, hidden, inter, True, False, get, set_)


def expert_modules(experts: nn.Module) -> list[nn.Module]:
    """The per-expert modules of a ModuleList or ModuleDict, in expert order."""
    if isinstance(experts, nn.ModuleDict):
        return list(experts.values())
    if isinstance(experts, nn.ModuleList):
        return list(experts)
    raise UnsupportedModelError(
        f"{type(experts).__name__} is neither a ModuleList nor a ModuleDict of experts; point experts_attr at the "
        "container of per-expert modules, or pass storage= (one of 'fused', 'fused_transposed_interleaved', "
        "'flat_split')"
    )


def _names_for(module: nn.Module, names: Sequence[str] | None) -> tuple[str, ...]:
    candidates = (tuple(names),) if names is not None else KNOWN_EXPERT_NAMES
    for cand in candidates:
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in cand):
            return cand
    children = [n for n, _ in module.named_children()]
    raise UnsupportedModelError(
        f"expert module {type(module).__name__} (children {children}) has none of the nn.Linear projections "
        f"{list(candidates)}; pass expert_names=(gate, up, down) or (up, down) naming its projections"
    )


def modules_access(experts: nn.Module, names: Sequence[str] | None = None) -> ExpertAccess:
    """One module per expert with nn.Linear projections (gate, up, down) or (up, down)."""
    if names is not None and len(names) not in (2, 3):
        raise ConfigError(f"expert_names={tuple(names)}: give (gate, up, down) or (up, down)")
    mods = expert_modules(experts)
    if not mods:
        raise UnsupportedModelError(f"{type(experts).__name__} holds no expert modules")
    proj_names = _names_for(mods[0], names)
    glu = len(proj_names) == 3
    in_names, down_name = proj_names[:-1], proj_names[-1]
    down0 = getattr(mods[0], down_name)
    hidden, inter = down0.weight.shape
    has_bias = down0.bias is not None
    shapes = canonical_shapes(hidden, inter, glu, has_bias)

    def linears(e: int) -> tuple[list[nn.Linear], nn.Linear]:
        mod = mods[_index(len(mods), e)]
        return [getattr(mod, n) for n in in_names], getattr(mod, down_name)

    def get(e: int) -> Tensors:
        ins, down = linears(e)
        out = {"w1": torch.cat([m.weight for m in ins]) if glu else ins[0].weight, "w2": down.weight}
        if has_bias:
            out["b1"] = torch.cat([m.bias for m in ins]) if glu else ins[0].bias
            out["b2"] = down.bias
        return out

    def set_(e: int, tensors: Tensors) -> None:
        ins, down = linears(e)
        _check(shapes, tensors)
        with torch.no_grad():
            for j, m in enumerate(ins):
                m.weight.copy_(tensors["w1"][j * inter : (j + 1) * inter])
                if has_bias:
                    m.bias.copy_(tensors["b1"][j * inter : (j + 1) * inter])
            down.weight.copy_(tensors["w2"])
            if has_bias:
                down.bias.copy_(tensors["b2"])

    return ExpertAccess("modules", len(mods), hidden, inter, glu, has_bias, get, set_)
