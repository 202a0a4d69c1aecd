"""The wait / copy / host decision on named cases, with the H100 profile's Mixtral costs where it matters."""

from __future__ import annotations

import pytest

from prophet.config import ProphetConfig
from prophet.errors import ConfigError
from prophet.hardware import get_profile
from prophet.hybrid import Choice, MissCosts, RunningCosts, allowed, decide
from prophet.models.registry import get_spec
from prophet.sim.cost import CostModel


def _costs(gpu: str) -> tuple[MissCosts, float]:
    cost = CostModel(get_spec("mixtral-8x7b"), get_profile(gpu), context=131072)
    return cost.miss_costs(), cost.layer_seconds(2, 1)


@pytest.mark.parametrize("gpu", ["h100-sxm", "rtx-4090", "a100-80gb"])
def test_decode_computes_on_the_host(gpu: str) -> None:
    costs, layer = _costs(gpu)
    d = decide({3: 1, 5: 1}, costs, layer)
    assert d.choices == {3: Choice.HOST, 5: Choice.HOST}
    assert d.layer_s == pytest.approx(2 * costs.host_s(1))  # the two host experts run one after the other


@pytest.mark.parametrize("gpu", ["h100-sxm", "rtx-4090"])
def test_prefill_and_large_batches_copy(gpu: str) -> None:
    costs, layer = _costs(gpu)
    assert decide({0: 2048, 1: 1900}, costs, layer).choices == {0: Choice.COPY, 1: Choice.COPY}
    assert decide({0: 64}, costs, layer).choices == {0: Choice.COPY}  # batch 64 on one expert
    assert 16 < costs.host_breakeven_tokens() < 64


def test_inflight_copy_is_waited_for_only_when_it_lands_first() -> None:
    costs = MissCosts(copy_s=6e-3, host_fixed_s=1e-3, host_token_s=1e-4)
    assert decide({7: 1}, costs, 2e-4, inflight_ready_s={7: 0.5e-3}).choices == {7: Choice.WAIT}
    late = decide({7: 1}, costs, 2e-4, inflight_ready_s={7: 4e-3})
    assert late.choices == {7: Choice.HOST} and late.layer_s == pytest.approx(1e-3)


def test_queues_spread_misses_over_link_and_host() -> None:
    """A fast link and a slow host: the second expert copies while the host computes the first and third."""
    costs = MissCosts(copy_s=1.0, host_fixed_s=0.8, host_token_s=0.0)
    d = decide({1: 1, 2: 1, 3: 1}, costs, 0.1)
    assert d.choices == {1: Choice.HOST, 2: Choice.COPY, 3: Choice.HOST}
    assert (d.layer_s, d.link_free_s, d.host_free_s) == pytest.approx((1.6, 1.0, 1.6))
    busy = decide({1: 1}, costs, 0.1, host_free_s=5.0, link_free_s=0.5)  # queued work counts
    assert busy.choices == {1: Choice.COPY} and busy.finish_s[1] == pytest.approx(1.5)


def test_largest_expert_placed_first_gets_the_gpu() -> None:
    costs = MissCosts(copy_s=1.0, host_fixed_s=0.5, host_token_s=0.1)
    d = decide({1: 1, 2: 20}, costs, 0.1)
    assert d.choices == {2: Choice.COPY, 1: Choice.HOST} and d.experts(Choice.HOST) == [1]


def test_on_miss_restricts_the_options() -> None:
    costs, layer = _costs("h100-sxm")
    assert set(decide({1: 1, 2: 500}, costs, layer, allow=allowed("copy")).choices.values()) == {Choice.COPY}
    assert set(decide({1: 1, 2: 500}, costs, layer, allow=allowed("host")).choices.values()) == {Choice.HOST}
    with pytest.raises(ConfigError, match="on_miss"):
        allowed("gpu")
    with pytest.raises(ConfigError, match="COPY or HOST"):
        decide({1: 1}, costs, layer, allow=(Choice.WAIT,))
    with pytest.raises(ConfigError, match="copy_s"):
        MissCosts(copy_s=-1, host_fixed_s=0, host_token_s=0)


def test_running_costs_follow_measurements() -> None:
    run = RunningCosts(MissCosts(copy_s=1.0, host_fixed_s=1.0, host_token_s=0.01), decay=0.5)
    for _ in range(30):
        run.observe_copy(2.0)
        run.observe_host(1, 3.0)  # memory-bound region: the streaming time moves
        run.observe_host(1000, 50.0)  # compute-bound region: the time per token moves
    assert run.costs.copy_s == pytest.approx(2.0) and run.costs.host_fixed_s == pytest.approx(3.0)
    assert run.costs.host_token_s == pytest.approx(0.05)


def test_config_on_miss_and_host_threads_are_validated() -> None:
    assert ProphetConfig().on_miss == "copy"
    assert ProphetConfig.from_json(ProphetConfig(on_miss="auto", host_threads=4).to_json()).host_threads == 4
    with pytest.raises(ConfigError, match="on_miss"):
        ProphetConfig(on_miss="cpu")
    with pytest.raises(ConfigError, match="host_threads"):
        ProphetConfig(host_threads=0)


def test_measured_host_bandwidth_replaces_the_profiles(tmp_path) -> None:
    """A host-experts benchmark result calibrates host_gb_s, and with it the host side of the decision."""
    path = tmp_path / "host.json"
    path.write_text('{"read_gb_s": {"1": {"stream_sum": {"median": 6.1}}, "2": {"stream_sum": {"median": 9.5}, '
                    '"torch_fp32_mv": {"median": 7.0}}}}')
    profile = get_profile("rtx-4090").calibrated(path, base="rtx-4090")
    assert profile.host_gb_s == 9.5 and "host_gb_s (read)" in profile.notes
    slow = CostModel(get_spec("mixtral-8x7b"), profile, context=8192)
    assert slow.miss_costs().host_fixed_s > _costs("rtx-4090")[0].host_fixed_s
    assert decide({1: 1}, slow.miss_costs(), slow.layer_seconds(2, 1)).choices == {1: Choice.COPY}  # 37 ms > copy
