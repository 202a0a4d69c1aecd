"""Prophet: expert offloading and predictive prefetch for Mixture-of-Experts language models.

Importing this package needs neither a GPU nor Triton; CUDA is touched only when used.
"""

from __future__ import annotations

from prophet.config import CacheConfig, PrefetchConfig, ProphetConfig
from prophet.errors import ProphetError, UnsupportedModelError
from prophet.load import load
from prophet.wrap import stats, unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "CacheConfig",
    "PrefetchConfig",
    "ProphetConfig",
    "ProphetError",
    "UnsupportedModelError",
    "load",
    "stats",
    "unwrap",
    "wrap",
]
