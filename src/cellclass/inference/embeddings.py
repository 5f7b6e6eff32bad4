"""Embeddings: a trained network's penultimate features, and its probabilities from the same pass.

The features are what the task heads read (:meth:`MultiHeadNetwork.forward_features`):
LeNet-5's 84 outputs of its last hidden layer, a timm backbone's pooled features (built with
``num_classes=0``, the same as timm's ``forward_head(pre_logits=True)``). With D4 test-time
augmentation the features and the probabilities are averaged over the eight views, and the
probabilities of each view are kept, for the disagreement between views (BALD over views).
A baseline (scikit-learn on pixels) has no learned features and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellclass.data.augment import dihedral
from cellclass.errors import EmbeddingError
from cellclass.inference.predictor import Predictor
from cellclass.inference.probabilities import probabilities

D4_VIEWS = tuple(range(8))
"""The D4 elements averaged over with test-time augmentation (square model inputs)."""


@dataclass
class ModelOutputs:
    """What one pass of a network over some images gives.

    Attributes:
        features: ``(N, D)`` float32 penultimate features (the mean over views with TTA).
        probabilities: Task name to ``(N, K)`` float64 probabilities (the mean over views
            with TTA), as :meth:`Predictor.predict_normalized` gives them.
        views: Task name to ``(V, N, K)`` probabilities of each D4 view (``V`` = 8) with
            TTA; ``None`` without.
    """

    features: np.ndarray
    probabilities: dict[str, np.ndarray]
    views: dict[str, np.ndarray] | None = None


def check_embeddable(predictor: Predictor, name: str = "the model") -> None:
    """Refuse a model whose features cannot be read.

    Raises:
        EmbeddingError: When it is a baseline (no learned features) or runs on an exported
            backend (ONNX Runtime gives logits only).
    """
    if predictor.kind == "baseline":
        raise EmbeddingError(
            f"{name} is a baseline ({predictor.identity.get('model')}), which has no learned features to "
            "embed; valid: a run of a network (lenet5 or a timm backbone, see `cellclass models`)")
    if predictor.backend is not None or not hasattr(predictor.model, "forward_features"):
        raise EmbeddingError(f"{name} runs on {type(predictor.backend or predictor.model).__name__}, which gives "
                             "no features; valid: the torch network of a run's checkpoint")


def model_outputs(predictor: Predictor, x: Any, *, tta: bool | None = None) -> ModelOutputs:
    """Features and probabilities of normalized images, in one pass of the network.

    Args:
        predictor: A network's predictor.
        x: Normalized ``(N, C, S, S)`` float32 images: an array, or anything indexable by
            an int array that returns one (a :class:`~cellclass.data.normalize.NormalizedView`).
        tta: Average over the 8 D4 views (default: the predictor's setting).

    Raises:
        EmbeddingError: As :func:`check_embeddable`.
    """
    check_embeddable(predictor)
    tta = predictor.tta if tta is None else tta
    views = D4_VIEWS if tta else (0,)
    model = predictor.model
    model.eval()
    features: list[np.ndarray] = []
    per_view: dict[str, list[np.ndarray]] = {t: [] for t in predictor.encoders}
    with torch.inference_mode():
        for start in range(0, len(x), predictor.batch_size):
            rows = np.arange(start, min(start + predictor.batch_size, len(x)))
            batch = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))
            feature_sum = None
            probs: dict[str, list[np.ndarray]] = {t: [] for t in predictor.encoders}
            for k in views:
                view_features = model.forward_features(dihedral(batch, k))
                feature_sum = view_features if feature_sum is None else feature_sum + view_features
                logits = model.forward_heads(view_features)
                for task, encoder in predictor.encoders.items():
                    probs[task].append(probabilities(logits[task].float(), encoder.type).numpy())
            features.append((feature_sum / len(views)).float().numpy())
            for task in predictor.encoders:
                per_view[task].append(np.stack(probs[task]))
    width = int(getattr(model, "num_features", 0))
    stacked = {t: (np.concatenate(v, axis=1) if v else np.zeros((len(views), 0, predictor.encoders[t].n_outputs)))
               .astype(np.float64) for t, v in per_view.items()}
    return ModelOutputs(
        features=np.concatenate(features).astype(np.float32) if features else np.zeros((0, width), np.float32),
        probabilities={t: v.mean(axis=0) for t, v in stacked.items()},
        views=stacked if tta else None,
    )
