"""What "same outputs" means in each dtype: a wrapped model's error against an fp32 reference, beside the
unwrapped model's error in the same dtype.

In fp32 the wrapped model reproduces the unwrapped one (logits within 1e-5). In bf16 and fp16 no two
implementations agree exactly: transformers' experts round each product to 16 bits, Prophet's kernels
accumulate in fp32 and round once; both differ from the fp32 model by the dtype's rounding. So in low
precision "same outputs" means: the wrapped model is no further from the fp32 reference than the unwrapped
one. Its distance to the unwrapped model can be as large as both their errors together, which is why greedy
tokens may differ where two candidates are closer than that.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``, the measure the GPU decode check reports (``prefill_logits_rel_diff``)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``rms(out - ref) / rms(ref)``: the typical error, less driven by one outlier than `rel_error`."""
    diff = out.float() - ref.float()
    return (diff.pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()


@dataclass(frozen=True)
class PrecisionReport:
    """Logit errors of one model in one dtype (relative max and relative RMS, see `rel_error`, `rms_error`)."""

    dtype: str
    unwrapped_max: float  # unwrapped model in ``dtype`` vs the fp32 model
    wrapped_max: float  # wrapped model in ``dtype`` vs the fp32 model
    between_max: float  # wrapped vs unwrapped, both in ``dtype``: what the GPU decode check measured
    unwrapped_rms: float
    wrapped_rms: float
    between_rms: float
    argmax_agreement: float  # share of positions where wrapped and unwrapped pick the same top token
    experts_unwrapped_rms: float  # the experts modules alone, fed identical inputs: the model's own in ``dtype``
    experts_wrapped_rms: float  # Prophet's `OffloadedExperts` in ``dtype``, against the fp32 experts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def precision_report(model: nn.Module, dtype: torch.dtype, inputs: dict[str, torch.Tensor],
                     **wrap_options: Any) -> PrecisionReport:
    """Run ``model`` (fp32, left untouched) as the reference, then a ``dtype`` copy unwrapped and wrapped with
    ``wrap_options`` on the same ``inputs``; compare their logits, and each MoE layer's experts output on the
    very inputs the unwrapped ``dtype`` model gave them (so the experts' own rounding is seen alone)."""
    from prophet.models.adapter import moe_layers
    from prophet.wrap import unwrap, wrap

    ref = model(**inputs).logits.float()
    low = copy.deepcopy(model).to(dtype)
    layers = moe_layers(low)
    calls: list[tuple[int, tuple, dict, torch.Tensor]] = []  # (MoE layer, args, kwargs, output) per experts call
    hooks = [layer.experts.register_forward_hook(
        lambda m, a, k, out, i=i: calls.append((i, a, k, _first(out))), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        plain = low(**inputs).logits.float()
    finally:
        for h in hooks:
            h.remove()
    fp32_experts = [layer.experts for layer in moe_layers(model)]
    expected = torch.cat([_first(fp32_experts[i](*_to32(a), **_to32(k))).flatten() for i, a, k, _ in calls])
    native = torch.cat([out.float().flatten() for *_, out in calls])
    wrap(low, **wrap_options)
    try:
        wrapped = low(**inputs).logits.float()
        swapped = [getattr(layer.parent, layer.attr) for layer in layers]
        offloaded = torch.cat([_first(swapped[i](*a, **k)).float().flatten() for i, a, k, _ in calls])
    finally:
        unwrap(low)
    return PrecisionReport(
        dtype=str(dtype).removeprefix("torch."),
        unwrapped_max=rel_error(plain, ref),
        wrapped_max=rel_error(wrapped, ref),
        between_max=rel_error(wrapped, plain),
        unwrapped_rms=rms_error(plain, ref),
        wrapped_rms=rms_error(wrapped, ref),
        between_rms=rms_error(wrapped, plain),
        argmax_agreement=(wrapped.argmax(-1) == plain.argmax(-1)).float().mean().item(),
        experts_unwrapped_rms=rms_error(native, expected),
        experts_wrapped_rms=rms_error(offloaded, expected),
    )


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _to32(value: Any) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) as fp32; everything else as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to32(v) for k, v in value.items()}
    return value
