"""Setup for the trace tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from trace_helpers import TINY_TRACE


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads; on a busy 2-core machine they only spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_trace_path() -> Path:
    """The trace the project recorded itself (``traces/tiny-mixtral``)."""
    return TINY_TRACE
