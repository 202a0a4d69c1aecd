"""Kernel tests run compiled on a CUDA GPU, else in Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, and `prophet.kernels.moe` imports its
kernels on the first launch, so setting it here (before any test runs) is early enough.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
