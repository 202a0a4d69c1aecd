"""Trace replay under a hardware cost model: tokens/s of a policy and predictor without the GPU.

`replay` drives the runtime's own cache, policies, predictors and prefetcher with a router trace, timing it
with `SimCopyEngine` (modelled link) and `CostModel` (roofline per layer) on a `HardwareProfile`; `bounds` gives
the limits every result is reported beside, under the same capacity, link and compute (`prophet.sim.bounds`).
"""

from prophet.hardware import HardwareProfile, get_profile, list_profiles
from prophet.sim.bounds import bounds
from prophet.sim.cost import CostModel, expected_distinct
from prophet.sim.engine import SimCopyEngine
from prophet.sim.replay import ReplayResult, Schedule, ScheduleOracle, replay, schedule

__all__ = [
    "CostModel",
    "HardwareProfile",
    "ReplayResult",
    "Schedule",
    "ScheduleOracle",
    "SimCopyEngine",
    "bounds",
    "expected_distinct",
    "get_profile",
    "list_profiles",
    "replay",
    "schedule",
]
