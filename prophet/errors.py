"""Every error Prophet raises derives from `ProphetError`; each message says what to change."""

from __future__ import annotations


class ProphetError(Exception):
    """Base of every error the package raises on purpose."""


class ConfigError(ProphetError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class UnsupportedModelError(ProphetError):
    """The model is not a Mixture-of-Experts model of a family Prophet has an adapter for."""


class CapacityError(ProphetError):
    """The expert cache is too small for what was asked of it."""


class DeviceError(ProphetError):
    """The requested device is not available, or a tensor is on the wrong device."""


class DtypeError(ProphetError, TypeError):
    """A dtype the kernels or the cache do not support."""


class AlreadyWrappedError(ProphetError):
    """`prophet.wrap` was called on a model that is already wrapped."""


class CheckpointError(ConfigError):
    """A checkpoint folder cannot be loaded: missing, corrupt, or its weights contradict its config.json."""


class TraceError(ProphetError):
    """A router trace file is missing, corrupt, of an unknown version or inconsistent with the model."""


class PlanError(ProphetError):
    """The memory plan cannot fit the requested model, context and batch on the GPU."""


class KernelError(ProphetError):
    """A kernel was called with inputs it cannot handle (shape, dtype, device or stride)."""
