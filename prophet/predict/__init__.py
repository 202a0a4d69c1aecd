"""Expert predictors: guess which experts upcoming layers and tokens will use."""

from prophet.predict.base import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
