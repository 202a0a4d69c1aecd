"""The ``prophet`` policy follows the miss mode: the predictor and prefetch chosen by simulated speed for it."""

from prophet.config import PrefetchConfig
from prophet.models import get_spec
from prophet.predict.data import as_router_trace
from prophet.sim import get_profile, schedule
from prophet.sim.compare import replay_policies
from prophet.sim.replay import PROPHET_PREDICTOR, make_predictor, policy_args, prophet_prefetch
from prophet.sim.samples import split_sample
from prophet.trace.synth import synthetic_trace


def test_prophet_takes_its_miss_modes_predictor_unless_one_is_named():
    assert policy_args("prophet", on_miss="auto") == ("predicted", "value") == policy_args("prophet", on_miss="host")
    assert policy_args("prophet") == ("predicted", "value-copy") == ("predicted", PROPHET_PREDICTOR["copy"])
    assert policy_args("prophet", "frequency", on_miss="auto") == ("predicted", "frequency")
    assert policy_args("lru", on_miss="auto") == ("lru", None)
    assert prophet_prefetch("value", "auto") == PrefetchConfig(max_inflight=1)
    assert prophet_prefetch("value", "copy") is None and prophet_prefetch("pathmatch", "auto") is None


def test_value_copy_is_the_value_policy_at_its_copy_only_setting():
    from prophet.predict.value import COPY_ONLY

    r = as_router_trace(synthetic_trace(2, 8, 2, num_sequences=1, tokens_per_sequence=8, seed=0, progress=False))
    p = make_predictor("value-copy", r, schedule(r))
    assert (p.span, p.decay, p.margin, p.horizon) == tuple(COPY_ONLY[k] for k in ("span", "decay", "margin", "horizon"))


def test_replayed_rows_name_the_predictor_of_each_mode_and_warm_start_fills_every_row():
    spec = get_spec("mixtral").tiny()
    r = as_router_trace(synthetic_trace(spec.num_moe_layers, spec.num_experts, spec.top_k, num_sequences=2,
                                        tokens_per_sequence=16, seed=3, progress=False))
    sample = split_sample(r)
    sched = schedule(sample.replay)
    rows = replay_policies(sample, spec, get_profile("h100-sxm"), ["lru", "prophet"], None, sched, progress=False,
                           on_miss=("copy", "auto"), warm="prefill", cache_slots=6)
    by = {row["policy"]: row for row in rows}
    assert by["prophet (auto)"]["predictor"].startswith("value")
    assert by["prophet"]["predictor"].startswith("value")
    assert all(row["warmed"] == 6 and row["warm_during"] == "prefill" for row in rows)
