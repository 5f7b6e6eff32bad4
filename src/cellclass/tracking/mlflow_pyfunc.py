"""The MLflow pyfunc model of a cellclass run (see :mod:`cellclass.tracking.mlflow_model`).

Kept apart because it subclasses ``mlflow.pyfunc.PythonModel``, so importing it imports
MLflow; a saved model builds it from here when MLflow loads the model.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from cellclass.inference.predictor import Predictor
from cellclass.tracking.mlflow_model import CHECKPOINT_ARTIFACT, predict_frame


class CellclassPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts raw ``(N, C, H, W)`` images with the checkpoint among the model's artifacts."""

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Labels and probabilities per task of the raw images (see :func:`predict_frame`)."""
        return predict_frame(self.predictor, model_input)
