"""Model specs, tiny test models and the adapter table."""

from prophet.models import families as _families  # noqa: F401  (registers the adapters)
from prophet.models.adapter import (
    ADAPTERS,
    Adapter,
    ExpertFormat,
    MoELayer,
    expert_forward,
    get_adapter,
    moe_layers,
    register,
)
from prophet.models.families import FAMILY_ADAPTERS, GenericAdapter
from prophet.models.registry import SPECS, get_spec, list_specs
from prophet.models.spec import ModelSpec

__all__ = [
    "ADAPTERS",
    "FAMILY_ADAPTERS",
    "SPECS",
    "Adapter",
    "ExpertFormat",
    "GenericAdapter",
    "ModelSpec",
    "MoELayer",
    "expert_forward",
    "get_adapter",
    "get_spec",
    "list_specs",
    "moe_layers",
    "register",
]
