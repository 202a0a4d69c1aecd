"""`prophet.load`: a local checkpoint straight into a wrapped model, never holding two copies of the experts.

transformers reads the safetensors shards (memory-mapped) and converts checkpoint layouts to its own; `wrap`
then moves the experts into the host store one layer at a time, emptying each layer's parameters as soon as
they are copied. Peak host memory is the checkpoint plus one layer's experts. A checkpoint with quantized
experts (MXFP4, as gpt-oss ships) is built without its experts and streams their stored bytes into the
store one expert at a time (`prophet.sources`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prophet.errors import ConfigError
from prophet.sources import quantized_checkpoint
from prophet.wrap import wrap


def load(checkpoint_dir: str | Path, *, dtype: torch.dtype | str = "auto", **wrap_options: Any) -> nn.Module:
    """Load a transformers checkpoint folder (config.json + safetensors) and `wrap` it with ``wrap_options``."""
    from transformers import AutoModelForCausalLM

    path = Path(checkpoint_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json: point checkpoint_dir at a saved transformers model folder")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{path} has no .safetensors shards: save the model with safe_serialization (the default)")
    quantized = quantized_checkpoint(path, dtype)  # quantized experts stream from the shards as stored
    if quantized is not None:
        model, source = quantized
        return wrap(model, expert_source=source, **wrap_options)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return wrap(model.eval(), **wrap_options)
