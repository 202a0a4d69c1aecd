"""Hardware profiles are data, and calibration files replace what they measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prophet.errors import ConfigError
from prophet.hardware import fit_copy_cost
from prophet.sim import HardwareProfile, get_profile, list_profiles

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def test_builtin_profiles_cover_the_issue_list():
    assert {"h100-sxm", "h200", "a100-80gb", "rtx-4090", "l4"} <= set(list_profiles())
    assert get_profile("h200").hbm_gb_s > get_profile("h100-sxm").hbm_gb_s > get_profile("a100-80gb").hbm_gb_s
    assert get_profile("rtx-4090").h2d_gb_s < get_profile("h100-sxm").h2d_gb_s  # PCIe 4 vs 5


def test_fit_recovers_fixed_cost_and_bandwidth():
    sizes = [1e6, 1e7, 1e8, 4e8]
    fixed, gb_s = fit_copy_cost(sizes, [20e-6 + n / 40e9 for n in sizes])
    assert fixed == pytest.approx(20e-6, rel=1e-6) and gb_s == pytest.approx(40.0, rel=1e-6)


def test_offload_check_result_calibrates_the_h100_link():
    path = RESULTS / "offload_check_NVIDIA_H100_80GB_HBM3.json"
    if not path.exists():
        pytest.skip("H100 offload check result not in this checkout")
    p = HardwareProfile.calibrated(path)
    assert p.name == "h100-sxm+cal"
    assert p.h2d_gb_s == pytest.approx(52.5, abs=0.5) and p.copy_fixed_us == pytest.approx(9.4, abs=1.0)


def test_calibration_format_overrides_only_its_fields(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"profile": "rtx-4090", "h2d_gb_s": 21.5}))
    p = get_profile(str(path))
    base = get_profile("rtx-4090")
    assert p.h2d_gb_s == 21.5 and p.hbm_gb_s == base.hbm_gb_s and "cal.json" in p.notes


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError, match="h100-sxm"):
        get_profile("tpu-v5")
