"""Model specs, tiny test models and the adapter table."""

from prophet.models import families as _families  # noqa: F401  (registers the adapters)
from prophet.models.adapter import ADAPTERS, Adapter, ExpertFormat, MoELayer, get_adapter, moe_layers, register

__all__ = ["ADAPTERS", "Adapter", "ExpertFormat", "MoELayer", "get_adapter", "moe_layers", "register"]
