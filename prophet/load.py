"""`prophet.load`: a local checkpoint straight into a wrapped model, never holding two copies of the experts.

transformers reads the safetensors shards (memory-mapped) and converts checkpoint layouts to its own; `wrap`
then moves the experts into the host store one layer at a time, emptying each layer's parameters as soon as
they are copied. Peak host memory is the checkpoint plus one layer's experts. A checkpoint with quantized
experts (MXFP4, as gpt-oss ships) is built without its experts and streams their stored bytes into the
store one expert at a time (`prophet.sources`).

Every way a folder can be wrong (a misspelt option, a broken config.json, an unknown model type, a corrupt
shard, weights that contradict the config) raises a `ProphetError` naming the file and what to change, and
all but the last are found before any weight is read.
"""

from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prophet.errors import CheckpointError, ConfigError, ProphetError, UnsupportedModelError
from prophet.models.adapter import ADAPTERS
from prophet.sources import quantized_checkpoint
from prophet.wrap import SUPPORTED_DTYPES, wrap

_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}


def load(checkpoint_dir: str | Path, *, dtype: torch.dtype | str = "auto", **wrap_options: Any) -> nn.Module:
    """Load a transformers checkpoint folder (config.json + safetensors) and `wrap` it with ``wrap_options``."""
    _check_options(wrap_options, dtype)
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder; point checkpoint_dir at a saved transformers model folder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: point checkpoint_dir at a saved transformers model folder")
    model_type = _model_type(path / "config.json")
    if model_type not in ADAPTERS and wrap_options.get("adapter") is None:
        raise UnsupportedModelError(
            f"{path / 'config.json'}: model_type={model_type!r} is not a supported MoE family (supported: "
            f"{', '.join(sorted(ADAPTERS))}); for custom MoE code pass adapter=prophet.models.GenericAdapter(...)"
        )
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path} has no .safetensors shards: save the model with safe_serialization (the default)")
    for shard in shards:
        _check_shard(shard)
    quantized = _quantized(path, dtype)  # quantized experts stream from the shards as stored
    if quantized is not None:
        model, source = quantized
        wrap_options = {**wrap_options, "expert_source": source}
    else:
        model = _from_pretrained(path, dtype)
    try:
        return wrap(model.eval(), **wrap_options)
    except ProphetError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def _quantized(path: Path, dtype: torch.dtype | str) -> tuple[nn.Module, Any] | None:
    """`prophet.sources.quantized_checkpoint`, with transformers' own failures named as the checkpoint's."""
    try:
        return quantized_checkpoint(path, _DTYPE_NAMES.get(dtype, dtype))
    except ProphetError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' config and safetensors readers raise many kinds
        raise CheckpointError(f"{path}: its quantized experts could not be read ({type(exc).__name__}: {exc}); "
                              "check quantization_config in config.json, or save the model again") from exc


def _check_options(options: dict[str, Any], dtype: object) -> None:
    """Misspelt or unknown options fail before anything is read."""
    known = [name for name in inspect.signature(wrap).parameters if name != "model"]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, "dtype"], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"prophet.load got an unknown option {name!r}; {hint}known: dtype, {', '.join(known)}")
    if not (dtype == "auto" or dtype in SUPPORTED_DTYPES or dtype in _DTYPE_NAMES):
        raise ConfigError(f"dtype={dtype!r}: use 'auto' (the checkpoint's own) or one of {', '.join(_DTYPE_NAMES)}")


def _model_type(config_path: Path) -> str:
    """The ``model_type`` of a config.json, refusing files transformers would fail on with an unclear error."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc}); restore it or save the model again") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{config_path}: needs a JSON object with a \"model_type\" string (e.g. \"mixtral\"); "
                              "save the model again with save_pretrained")
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise CheckpointError(f"{config_path}: model_type={model_type!r} is unknown to transformers "
                              f"{transformers.__version__}; fix the name or upgrade transformers")
    return model_type


def _check_shard(shard: Path) -> None:
    """Open a shard's header: truncated or corrupt files fail here, naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(shard, framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError alike
        raise CheckpointError(f"{shard}: not a readable safetensors file ({exc}); the shard is truncated or corrupt, "
                              "copy or save it again") from exc


def _from_pretrained(path: Path, dtype: torch.dtype | str) -> nn.Module:
    """transformers' loader, with its failures and silent re-initialisations turned into `CheckpointError`."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPE_NAMES.get(dtype, dtype), local_files_only=True, output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, RuntimeError, ... here
        if isinstance(exc, RuntimeError):
            raise CheckpointError(f"{path}: the shards' weight shapes contradict config.json (transformers' load report "
                                  "lists them: hidden_size, intermediate_size, num_local_experts, vocab_size, ...); "
                                  "fix config.json or save the model again") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: transformers could not load it ({type(exc).__name__}: {first}); check "
                              "config.json against the model's documented configuration, or save the model again") from exc
    for key, says in (("missing_keys", "config.json needs weights the shards lack"),
                      ("unexpected_keys", "the shards hold weights config.json has no place for"),
                      ("mismatched_keys", "weights have other shapes than config.json says")):
        names = sorted(info.get(key) or [])
        if names:
            raise CheckpointError(f"{path}: {says} ({len(names)}, e.g. {names[:3]}); the checkpoint and its "
                                  "config.json disagree (num_hidden_layers?): fix config.json or save the model again")
    return model
