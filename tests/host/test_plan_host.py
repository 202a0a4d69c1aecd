"""The planner's host terms: hybrid execution needs host threads and host memory bandwidth, not device memory."""

from __future__ import annotations

import pytest

from prophet.errors import PlanError
from prophet.hardware import get_profile
from prophet.plan import HOST_KERNEL_SHARE, PER_THREAD_GB_S, plan


def test_copy_plans_have_no_host_terms() -> None:
    p = plan("mixtral-8x7b", "h100-sxm", 131072)
    assert p.host is None and "host (hybrid)" not in p.table()


def test_hybrid_plan_states_threads_and_bandwidth() -> None:
    copy = plan("mixtral-8x7b", "h100-sxm", 131072)
    p = plan("mixtral-8x7b", "h100-sxm", 131072, on_miss="auto", host_threads=16)
    h = p.host
    assert h is not None and h.pays and p.expert_slots == copy.expert_slots  # the host costs no device memory
    hw = get_profile("h100-sxm")
    assert h.misses_per_token == pytest.approx(32 * 2 * (1 - p.slots_share))
    usable = min(hw.host_gb_s, 16 * PER_THREAD_GB_S) * HOST_KERNEL_SHARE
    assert h.host_s_per_token == pytest.approx(h.misses_per_token * p.expert_bytes / (usable * 1e9))
    assert h.copy_s_per_token == pytest.approx(h.misses_per_token * hw.copy_seconds(p.expert_bytes))
    assert 0 < h.bandwidth_share < 1 and 1 <= h.needed_threads <= 16
    assert "host (hybrid)" in p.table() and p.to_dict()["host"]["threads"] == 16


def test_too_few_host_threads_warn_for_auto_and_refuse_host() -> None:
    p = plan("mixtral-8x7b", "h100-sxm", 131072, on_miss="auto", host_threads=1)
    assert p.host is not None and not p.host.pays
    assert any("will mostly copy" in w for w in p.warnings)
    with pytest.raises(PlanError, match="host_threads"):
        plan("mixtral-8x7b", "h100-sxm", 131072, on_miss="host", host_threads=1)


def test_a_slow_host_is_refused_whatever_its_threads() -> None:
    slow = get_profile("h100-sxm").replace(host_gb_s=20.0)  # less than the link: copying always wins
    with pytest.raises(PlanError, match="on_miss='copy'"):
        plan("mixtral-8x7b", "h100-sxm", 131072, on_miss="host", host_threads=64, hardware=slow)


def test_all_resident_needs_no_host_work() -> None:
    p = plan("mixtral-8x7b", "h200", 4096, on_miss="host", host_threads=1)
    assert p.fits_all_resident and p.host is not None and p.host.misses_per_token == 0 and p.host.pays


def test_bad_hybrid_options_raise() -> None:
    with pytest.raises(PlanError, match="on_miss"):
        plan("mixtral-8x7b", "h100-sxm", 4096, on_miss="never")
    with pytest.raises(PlanError, match="host_threads"):
        plan("mixtral-8x7b", "h100-sxm", 131072, on_miss="auto", host_threads=0)
