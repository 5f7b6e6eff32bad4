"""Embeddings: the features the heads read, from the same pass as the probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.errors import EmbeddingError
from cellclass.inference.embeddings import check_embeddable, model_outputs
from cellclass.inference.predictor import Predictor
from cellclass.models import create_model

ENCODERS = {"particle": TaskEncoder("particle", "single", ["Fe", "X-ray", "none"]),
            "marks": TaskEncoder("marks", "multilabel", ["a", "b"])}


def _predictor(name: str = "lenet5") -> Predictor:
    torch.manual_seed(0)
    model = create_model(name, in_chans=2, heads={"particle": 3, "marks": 2}, image_size=16,
                         task_types={"particle": "single", "marks": "multilabel"}).eval()
    return Predictor(model=model, kind="network", encoders=ENCODERS, normalizer=Normalizer(mode="none"),
                     image_size=16, batch_size=4)


def _inputs(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 2, 16, 16)).astype(np.float32)


def test_features_are_the_penultimate_layer_and_probabilities_match_the_predictor() -> None:
    predictor, x = _predictor(), _inputs()
    outputs = model_outputs(predictor, x, tta=False)
    with torch.inference_mode():
        expected = predictor.model.forward_features(torch.from_numpy(x)).numpy()
    assert outputs.features.shape == (6, 84) and outputs.features.dtype == np.float32
    np.testing.assert_allclose(outputs.features, expected, atol=1e-6)
    plain = predictor.predict_normalized(x, tta=False)
    for task in ENCODERS:
        np.testing.assert_allclose(outputs.probabilities[task], plain[task], atol=1e-6)
    assert outputs.views is None


def test_tta_averages_features_and_probabilities_over_the_d4_views() -> None:
    predictor, x = _predictor(), _inputs()
    outputs = model_outputs(predictor, x, tta=True)
    turned = np.ascontiguousarray(np.rot90(x, 1, axes=(-2, -1)))
    again = model_outputs(predictor, turned, tta=True)
    np.testing.assert_allclose(again.features, outputs.features, atol=1e-5)  # the group mean: from any element
    averaged = predictor.predict_normalized(x, tta=True)
    for task, encoder in ENCODERS.items():
        np.testing.assert_allclose(outputs.probabilities[task], averaged[task], atol=1e-6)
        assert outputs.views[task].shape == (8, 6, encoder.n_outputs)
        np.testing.assert_allclose(outputs.views[task].mean(axis=0), outputs.probabilities[task], atol=1e-9)
    plain = model_outputs(predictor, x, tta=False)
    np.testing.assert_allclose(outputs.views["particle"][0], plain.probabilities["particle"], atol=1e-6)


def test_a_timm_backbone_gives_its_pooled_features() -> None:
    pytest.importorskip("timm")
    predictor = _predictor("resnet18")
    outputs = model_outputs(predictor, _inputs(3), tta=False)
    assert outputs.features.shape == (3, 512)


def test_a_baseline_has_no_features() -> None:
    predictor = Predictor(model=object(), kind="baseline", encoders=ENCODERS, normalizer=Normalizer(mode="none"),
                          image_size=16, identity={"model": "logreg"})
    with pytest.raises(EmbeddingError, match=r"run 'r' is a baseline \(logreg\), which has no learned features"):
        check_embeddable(predictor, "run 'r'")


def test_an_exported_backend_has_no_features() -> None:
    predictor = _predictor()
    predictor.backend = lambda x: {}
    with pytest.raises(EmbeddingError, match="gives no features"):
        model_outputs(predictor, _inputs(2))
