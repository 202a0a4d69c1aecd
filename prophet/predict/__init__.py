"""Expert predictors: guess which experts upcoming layers and tokens will use.

All share `RoutingPredictor`'s protocol: ``fit(traces)``, ``observe(layer, expert_ids, weights, hidden)``,
``predict(horizon=, top=)``, ``scores(distances)``, ``eviction_score(layer, expert)`` and ``reset()``.
Measuring them: `prophet.predict.evaluate` (recall per look-ahead distance; hit rates on the real cache).
"""

from prophet.predict.base import Prediction, Predictor, RoutingPredictor
from prophet.predict.data import RouterTrace, as_router_trace, load
from prophet.predict.ensemble import EnsemblePredictor, OraclePredictor
from prophet.predict.heads import HiddenStateHead
from prophet.predict.learned import MLPPredictor
from prophet.predict.lookahead import SketchRouter, sketch_routers
from prophet.predict.pathmatch import PathMatchPredictor
from prophet.predict.router import RouterLookahead
from prophet.predict.statistical import (
    ActivationMatrixPredictor,
    CoOccurrencePredictor,
    FrequencyPredictor,
    ReusePredictor,
)

__all__ = [
    "ActivationMatrixPredictor",
    "CoOccurrencePredictor",
    "EnsemblePredictor",
    "FrequencyPredictor",
    "HiddenStateHead",
    "MLPPredictor",
    "OraclePredictor",
    "PathMatchPredictor",
    "Prediction",
    "Predictor",
    "RouterLookahead",
    "RouterTrace",
    "ReusePredictor",
    "RoutingPredictor",
    "SketchRouter",
    "as_router_trace",
    "load",
    "sketch_routers",
]
