"""Where a result came from: versions and git SHA, for the JSON records benchmarks and replays end with."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_sha() -> str | None:
    """The checkout's HEAD, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    """Python, torch, transformers, numpy and Prophet versions."""
    import numpy
    import torch
    import transformers

    import prophet

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "prophet": prophet.__version__}
