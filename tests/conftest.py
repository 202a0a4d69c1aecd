"""Shared test setup: the `gpu` marker skips without CUDA; the shared real traces are found or skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prophet.envs import shared_traces_dir

# The tests' tensors are tiny: one thread runs them fastest, and on a shared 2-core machine torch's default of a
# thread per core oversubscribed the cores and made tiny-model tests up to 30x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_traces() -> Path:
    path = shared_traces_dir()
    if not (path / "mixtral-8x7b_humaneval_decode.npz").exists():
        pytest.skip(f"shared traces not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
