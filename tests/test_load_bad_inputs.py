"""Every way `prophet.load` can fail raises a `ProphetError` naming the file and the fix (issue 13, items 4, 8)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

import prophet
from prophet.errors import CheckpointError, ConfigError, ProphetError, UnsupportedModelError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "base"
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _config(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        cfg = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                cfg.pop(key)
            else:
                cfg[key] = value
        (path / "config.json").write_text(json.dumps(cfg))

    return edit


_DROP = object()
_SHARD = "model.safetensors"


def _shard(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda path: (path / _SHARD).write_bytes(change((path / _SHARD).read_bytes()))


def _header_only(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[: 8 + n + 16]  # a valid header, the tensor data cut short


def _second_shard(path: Path) -> None:
    (path / "extra.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _sharded(path: Path, index: Callable[[dict], object]) -> None:
    """Turn the single file into a sharded checkpoint (shard 1 of 2 plus an index), with ``index`` applied to
    the index's weight map (its result, when not None, is written as the index text)."""
    from safetensors import safe_open

    first = "model-00001-of-00002.safetensors"
    (path / _SHARD).rename(path / first)
    with safe_open(path / first, framework="pt") as f:
        weight_map = {k: first for k in f.keys()}
    text = index(weight_map)
    doc = json.dumps({"metadata": {}, "weight_map": weight_map}) if text is None else text
    (path / "model.safetensors.index.json").write_text(doc)


def _missing_second_shard(weight_map: dict) -> None:
    weight_map[next(iter(weight_map))] = "model-00002-of-00002.safetensors"


def _foreign_tensor(path: Path) -> None:
    save_file({"model.layers.7.mlp.surprise": torch.zeros(2)}, path / "model-00002-of-00002.safetensors")
    _sharded(path, lambda m: m.update({"model.layers.7.mlp.surprise": "model-00002-of-00002.safetensors"}))


def _shards_removed(path: Path) -> None:
    (path / _SHARD).unlink()


def _config_removed(path: Path) -> None:
    (path / "config.json").unlink()


def _config_a_folder(path: Path) -> None:
    (path / "config.json").unlink()
    (path / "config.json").mkdir()


# name -> how the saved checkpoint is damaged, and the error expected
BAD_CHECKPOINTS = {
    # config.json
    "config.json missing": (_config_removed, ConfigError),
    "config.json a folder": (_config_a_folder, ConfigError),
    "config.json not JSON": (lambda p: (p / "config.json").write_text("{model_type: mixtral"), CheckpointError),
    "config.json not UTF-8": (lambda p: (p / "config.json").write_bytes(b"\xff\xfe{"), CheckpointError),
    "config.json a list": (lambda p: (p / "config.json").write_text("[1, 2]"), CheckpointError),
    "config.json empty": (lambda p: (p / "config.json").write_text(""), CheckpointError),
    "model_type missing": (_config(model_type=_DROP), CheckpointError),
    "model_type a number": (_config(model_type=7), CheckpointError),
    "model_type unknown": (_config(model_type="bogus"), CheckpointError),
    "model_type of a dense model": (_config(model_type="mistral"), UnsupportedModelError),
    "num_attention_heads as text": (_config(num_attention_heads="x"), CheckpointError),
    # config.json against the weights
    "hidden_size other than the weights": (_config(hidden_size=32), CheckpointError),
    "intermediate_size other than the weights": (_config(intermediate_size=20), CheckpointError),
    "more experts than the weights": (_config(num_local_experts=8), CheckpointError),
    "vocab_size other than the weights": (_config(vocab_size=128), CheckpointError),
    "more layers than the weights": (_config(num_hidden_layers=3), CheckpointError),
    "fewer layers than the weights": (_config(num_hidden_layers=1), CheckpointError),
    "num_hidden_layers negative": (_config(num_hidden_layers=-1), CheckpointError),
    # shards
    "no shards": (_shards_removed, ConfigError),
    "shard empty": (_shard(lambda d: b""), CheckpointError),
    "shard garbage": (_shard(lambda d: b"\x00" * 100), CheckpointError),
    "shard header cut": (_shard(lambda d: d[:1000]), CheckpointError),
    "shard data cut": (_shard(_header_only), CheckpointError),
    "second shard corrupt": (_second_shard, CheckpointError),
    "index names a missing shard": (lambda p: _sharded(p, _missing_second_shard), CheckpointError),
    "index not JSON": (lambda p: _sharded(p, lambda m: "{"), CheckpointError),
    "shard with a tensor the model lacks": (_foreign_tensor, CheckpointError),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS), ids=list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_naming_the_file(checkpoint, tmp_path, case):
    damage, error = BAD_CHECKPOINTS[case]
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    damage(path)
    with pytest.raises(error, match=str(path)) as info:
        prophet.load(path, device="cpu", slots_per_layer=1)
    assert isinstance(info.value, ProphetError)


# name -> load keyword arguments a user could mistype; all are refused before any weight is read
BAD_OPTIONS = {
    "slot_per_layer (misspelt)": ({"slot_per_layer": 1}, "slots_per_layer"),
    "devic (misspelt)": ({"devic": "cpu"}, "'device'"),
    "cache_slot (misspelt)": ({"cache_slot": 2}, "cache_slots"),
    "dtype misspelt as dtpye": ({"dtpye": "bfloat16"}, "'dtype'"),
    "torch_dtype (the old name)": ({"torch_dtype": torch.float32}, "dtype"),
    "dtype float33": ({"dtype": "float33"}, "float32, float16, bfloat16"),
    "dtype float64": ({"dtype": torch.float64}, "float32, float16, bfloat16"),
    "dtype int8": ({"dtype": torch.int8}, "float32, float16, bfloat16"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_bad_option_is_refused_before_loading(tmp_path, case):
    kwargs, hint = BAD_OPTIONS[case]
    with pytest.raises(ConfigError, match=hint):
        prophet.load(tmp_path / "never-read", **kwargs)


# name -> (checkpoint_dir builder, the error expected)
BAD_FOLDERS = {
    "folder missing": (lambda d: d / "nope", CheckpointError),
    "a file, not a folder": (lambda d: (d / "f.bin").write_bytes(b"x") and d / "f.bin", CheckpointError),
    "an empty folder": (lambda d: d, ConfigError),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS), ids=list(BAD_FOLDERS))
def test_bad_folder_is_refused(tmp_path, case):
    build, error = BAD_FOLDERS[case]
    with pytest.raises(error):
        prophet.load(build(tmp_path))


# name -> wrap options that are wrong only once the model is known: the error names the checkpoint
BAD_WRAP_OPTIONS = {
    "zero slots": {"slots_per_layer": 0},
    "unknown policy": {"policy": "mru"},
    "no such device": {"device": "tpu"},
}


@pytest.mark.parametrize("case", list(BAD_WRAP_OPTIONS), ids=list(BAD_WRAP_OPTIONS))
def test_bad_wrap_option_names_the_checkpoint(checkpoint, case):
    with pytest.raises(ProphetError, match=str(checkpoint)):
        prophet.load(checkpoint, **BAD_WRAP_OPTIONS[case])
