"""Host expert store: every expert of every MoE layer as one contiguous slab in (pinned) host memory.

One slab per expert means one host->device copy per expert load, the cheapest way over PCIe. Each MoE layer's
slabs live in one tensor ``layers[l] [E, numel]`` (one pinned allocation per layer: smaller allocations pin
reliably, and a layer can be filled and its source freed before the next one is allocated, so loading never
holds two full copies of the experts). Pinned layers are locked at their exact size (`prophet.pinned`). A
slab's tensors follow its `prophet.formats.SlabLayout`: dense experts keep ``ExpertFormat.shapes`` in order
(w1, w2[, b1, b2]); quantized ones are bytes holding values and scales side by side, so one copy moves both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from prophet.errors import ConfigError
from prophet.formats import (
    ExpertFormat,
    SlabLayout,
    WeightFormat,
    dense_format,
    dequantize_expert,
    quantize_expert,
    slab_layout,
)
from prophet.models.adapter import MoELayer
from prophet.pinned import pinned_empty, unregister

if TYPE_CHECKING:
    from prophet.sources import ExpertSource


def slab_views(slab: torch.Tensor, fmt: ExpertFormat) -> dict[str, torch.Tensor]:
    """Named tensor views into ``slab`` (``[..., numel]``); leading dims (slots) are kept."""
    lead = slab.shape[:-1]
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in fmt.shapes.items():
        n = math.prod(shape)
        out[name] = slab[..., offset : offset + n].unflatten(-1, shape) if lead else slab[offset : offset + n].view(shape)
        offset += n
    return out


class HostStore:
    """All experts of a model in host memory, ``layers[l] [E, numel]``, pinned when CUDA is present.

    Layers are allocated on first write (or by `allocate`), so a loader can fill them one at a time.
    ``dtype`` is the model's compute dtype; ``weights`` (default: dense in ``dtype``) is how the experts are
    stored, and ``self.dtype`` the slab's storage dtype (uint8 for quantized formats).
    """

    def __init__(self, num_layers: int, num_experts: int, fmt: ExpertFormat, dtype: torch.dtype, pin: bool,
                 weights: WeightFormat | None = None) -> None:
        self.fmt = fmt
        quantized = weights is not None and weights.quantized
        self.layout: SlabLayout = slab_layout(fmt, weights or dense_format(dtype), dtype if quantized else None)
        self.compute_dtype = dtype
        self.dtype = self.layout.storage_dtype
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pinned = pin
        self.layers: list[torch.Tensor | None] = [None] * num_layers
        self._registered: list[torch.Tensor] = []  # layers locked by cudaHostRegister, unlocked in close()

    def allocate(self, layer: int) -> torch.Tensor:
        """``[E, numel]`` storage of ``layer``, allocated (pinned, at its exact size, if asked) on first use."""
        data = self.layers[layer]
        if data is None:
            shape = (self.num_experts, self.layout.numel)
            if self.pinned:
                data, registered = pinned_empty(shape, self.dtype)
                if registered:
                    self._registered.append(data)
            else:
                data = torch.empty(shape, dtype=self.dtype)
            self.layers[layer] = data
        return data

    def close(self) -> None:
        """Unlock the registered layers (their memory stays valid until the last view of it is gone), once no
        copy from them can still be running."""
        if self._registered:
            torch.cuda.synchronize()
        while self._registered:
            unregister(self._registered.pop())

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver drops a dead process's registrations
            pass

    @property
    def weights(self) -> WeightFormat:
        return self.layout.weights

    @property
    def slab_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def nbytes(self) -> int:
        return self.slab_bytes * self.num_experts * self.num_layers

    def slab(self, layer: int, expert: int) -> torch.Tensor:
        """``[numel]`` view of one expert's slab."""
        return self.allocate(layer)[expert]

    def write(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one expert into its slab: its stored fields (values, scales, biases) as they are, or its canonical
        dense tensors, which a quantized store quantizes first."""
        views = self.layout.views(self.slab(layer, expert))
        if set(tensors) != set(views):
            tensors = quantize_expert(self.layout, tensors)
        for name, view in views.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(view.shape):
                raise ConfigError(f"expert {expert} of layer {layer}: {name} has shape {tuple(src.shape)}, expected {tuple(view.shape)}")
            view.copy_(src)

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's stored fields."""
        return self.layout.views(self.slab(layer, expert))

    def read_canonical(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's canonical tensors in the compute dtype: the stored ones when dense, else dequantized."""
        if not self.weights.quantized:
            return self.read(layer, expert)
        tensors = dequantize_expert(self.layout, self.read(layer, expert))
        return {name: t.to(self.compute_dtype) for name, t in tensors.items()}

    @classmethod
    def for_layers(cls, layers: Sequence[MoELayer], pin: bool, weights: WeightFormat | None = None,
                   source: ExpertSource | None = None, dtype: torch.dtype | None = None) -> HostStore:
        """An empty store shaped for ``layers`` (nothing allocated yet), storing ``weights`` (or ``source``'s
        format); ``dtype`` is the model's compute dtype. Refuses layers whose experts differ."""
        fmt = layers[0].fmt
        num_experts = layers[0].num_experts
        for layer in layers:
            if layer.fmt != fmt or layer.num_experts != num_experts:
                raise ConfigError(
                    f"{layer.name}: experts differ from the first MoE layer ({layer.fmt}, {layer.num_experts} experts "
                    f"vs {fmt}, {num_experts}); Prophet needs every MoE layer to have the same expert shape"
                )
        dtype = dtype or layers[0].expert_parameters()[0].dtype
        return cls(len(layers), num_experts, fmt, dtype, pin, source.weights if source else weights)

    def fill(self, layers: Sequence[MoELayer], free_source: bool = False, source: ExpertSource | None = None) -> None:
        """Copy the experts of ``layers`` out of their modules, layer by layer (quantized to the store's format),
        or, with ``source``, its stored fields as they are.

        With ``free_source`` each layer's expert parameters are emptied as soon as they are copied, so host
        memory holds at most one layer's experts twice.
        """
        with torch.no_grad():
            for li, layer in enumerate(layers):
                for e in range(self.num_experts):
                    self.write(li, e, source.read(li, e) if source else layer.get_expert(e))
                if free_source:
                    for p in layer.expert_parameters():
                        p.data = torch.empty(0, dtype=p.dtype)

    @classmethod
    def from_layers(cls, layers: Sequence[MoELayer], pin: bool, free_source: bool = False,
                    weights: WeightFormat | None = None, source: ExpertSource | None = None,
                    dtype: torch.dtype | None = None) -> HostStore:
        """A store filled from ``layers`` or ``source`` (see `for_layers` and `fill`)."""
        store = cls.for_layers(layers, pin, weights, source, dtype)
        store.fill(layers, free_source, source)
        return store
