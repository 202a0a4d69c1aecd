"""Launch settings of the MoE kernels (`prophet.kernels.tuning`): JSON tables, nearest bucket, logged default."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from prophet.errors import ConfigError
from prophet.kernels import tuning
from prophet.kernels.tuning import (
    CONFIG_DIR,
    GemmConfig,
    MoEConfig,
    config_file_name,
    default_config,
    get_config,
    load_configs,
    write_configs,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache():
    load_configs.cache_clear()
    yield
    load_configs.cache_clear()


def _table() -> dict[int, MoEConfig]:
    small = MoEConfig("decode", GemmConfig(32, 256, 4, 4), GemmConfig(64, 128), split_k=2)
    big = MoEConfig("prefill", GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 3), block_m=64)
    return {2: small, 512: big}


def test_written_table_is_read_back_and_the_bucket_at_or_above_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PROPHET_KERNEL_CONFIGS", str(tmp_path))
    name = config_file_name(64, 32, torch.float16, "cpu", "interpreter")
    write_configs(tmp_path / name, _table(), {"device": "cpu"})
    assert get_config(64, 32, 1, torch.float16, CPU) == _table()[2]
    assert get_config(64, 32, 2, torch.float16, CPU) == _table()[2]
    assert get_config(64, 32, 3, torch.float16, CPU) == _table()[512]  # rounds up, never down
    assert get_config(64, 32, 4096, torch.float16, CPU) == _table()[512]  # past the last bucket: the last


def test_missing_table_warns_of_the_default_once_per_shape(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("PROPHET_KERNEL_CONFIGS", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=tuning.__name__):
        assert get_config(48, 40, 3, torch.float32, CPU) == default_config(3)
        assert get_config(48, 40, 300, torch.float32, CPU) == default_config(300)
    logged = [r for r in caplog.records if "using the default" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert "H=48 I=40 float32 on cpu" in logged[0].getMessage()


@pytest.mark.parametrize(
    ("tuned", "running", "chosen"),
    [
        (["3.6.0"], "3.6.0", "3.6.0"),  # exact
        (["3.6.0"], "3.9.0", "3.6.0"),  # a newer Triton finds the older tuning
        (["3.4.0", "3.6.0", "3.10.0"], "3.9.1", "3.6.0"),  # the newest older one; 3.10 > 3.9 numerically
        (["3.6.0", "3.7.0"], "3.5.0", "3.6.0"),  # only newer ones: the oldest of them
        (["3.6.0", "3.7.0+git1a2b"], "3.7.0", "3.7.0+git1a2b"),  # local suffixes ignored
    ],
)
def test_tuned_settings_apply_across_triton_versions(tmp_path: Path, monkeypatch, caplog, tuned, running, chosen):
    monkeypatch.setenv("PROPHET_KERNEL_CONFIGS", str(tmp_path))
    tables = {}
    for i, version in enumerate(tuned):
        table = {2 ** (i + 1): _table()[2]}
        write_configs(tmp_path / config_file_name(64, 32, torch.float16, "cpu", version), table, {})
        tables[version] = table
    with caplog.at_level(logging.INFO, logger=tuning.__name__):
        assert load_configs(64, 32, torch.float16, "cpu", running) == tables[chosen]
    assert ("were tuned under Triton" in caplog.text) == (chosen != running)
    assert "using the default" not in caplog.text


def test_shipped_h100_settings_are_found_under_a_newer_triton() -> None:
    table = load_configs(4096, 14336, torch.bfloat16, "NVIDIA_H100_80GB_HBM3", "99.0.0")
    assert table and all(isinstance(cfg, MoEConfig) for cfg in table.values())


def test_stale_format_version_says_to_retune(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PROPHET_KERNEL_CONFIGS", str(tmp_path))
    name = config_file_name(64, 32, torch.float32, "cpu", "interpreter")
    (tmp_path / name).write_text(json.dumps({"format_version": 0, "configs": {}}))
    with pytest.raises(ConfigError, match="tune_grouped_gemm.py"):
        get_config(64, 32, 1, torch.float32, CPU)


def test_shipped_tables_parse() -> None:
    # Every file shipped in prophet/kernels/configs/ is well formed.
    for path in CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["format_version"] == tuning.FORMAT_VERSION
        for bucket, cfg in data["configs"].items():
            assert int(bucket) > 0
            MoEConfig.from_dict(cfg)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: GemmConfig(block_n=48, block_k=64), "block_n=48"),  # not a power of two
        (lambda: GemmConfig(block_n=64, block_k=8), "block_k=8"),  # below tl.dot's minimum
        (lambda: GemmConfig(block_n=64, block_k=64, num_warps=3), "num_warps=3"),
        (lambda: MoEConfig("gemv", GemmConfig(64, 64), GemmConfig(64, 64)), "path='gemv'"),
        (lambda: MoEConfig("prefill", GemmConfig(64, 64), GemmConfig(64, 64), block_m=24), "block_m=24"),
        (lambda: MoEConfig("decode", GemmConfig(64, 64), GemmConfig(64, 64), split_k=0), "split_k=0"),
    ],
)
def test_bad_launch_settings_are_refused(make, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make()
