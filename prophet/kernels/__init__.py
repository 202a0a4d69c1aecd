"""Triton kernels, shipped as ``prophet.kernels``. Importing this package never needs Triton."""
