"""The Predictor's inference path: test-time augmentation averages over the whole D4 group,
and a backend computing the logits (as ONNX Runtime does) goes through the same steps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.inference.predictor import Predictor
from cellclass.models import create_model

ENCODERS = {"particle": TaskEncoder("particle", "single", ["Fe", "X-ray", "none"]),
            "marks": TaskEncoder("marks", "multilabel", ["a", "b"])}


@pytest.fixture
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_model("lenet5", in_chans=2, heads={"particle": 3, "marks": 2}, image_size=16,
                         task_types={"particle": "single", "marks": "multilabel"}).eval()
    return Predictor(model=model, kind="network", encoders=ENCODERS, normalizer=Normalizer(mode="none"),
                     image_size=16, batch_size=4)


def _inputs(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 2, 16, 16)).astype(np.float32)


def test_probabilities_are_softmax_rows_and_sigmoids(predictor: Predictor) -> None:
    probs = predictor.predict_normalized(_inputs(), tta=False)
    np.testing.assert_allclose(probs["particle"].sum(axis=1), 1.0, atol=1e-6)
    assert probs["marks"].shape == (6, 2) and not np.allclose(probs["marks"].sum(axis=1), 1.0)
    assert probs["particle"].dtype == np.float64


def test_tta_averages_over_the_d4_group(predictor: Predictor) -> None:
    x = _inputs()
    turned = np.ascontiguousarray(np.rot90(x, 1, axes=(-2, -1)))
    mirrored = np.ascontiguousarray(x[..., ::-1])
    plain = predictor.predict_normalized(x, tta=False)
    averaged = predictor.predict_normalized(x, tta=True)
    assert not np.allclose(plain["particle"], predictor.predict_normalized(turned, tta=False)["particle"])
    for other in (turned, mirrored):  # the average over the group is the same from any element of it
        again = predictor.predict_normalized(other, tta=True)
        for task in ENCODERS:
            np.testing.assert_allclose(again[task], averaged[task], atol=1e-6)


@pytest.mark.parametrize("tta", [False, True])
def test_a_logits_backend_takes_the_same_path(predictor: Predictor, tta: bool) -> None:
    calls: list[tuple[int, ...]] = []

    def backend(x: np.ndarray) -> dict[str, Any]:  # what OnnxBackend returns: float32 logits per task
        calls.append(x.shape)
        with torch.inference_mode():
            return {t: v.numpy() for t, v in predictor.model(torch.from_numpy(np.ascontiguousarray(x))).items()}

    x = _inputs()
    expected = predictor.predict_normalized(x, tta=tta)
    predictor.backend = backend
    got = predictor.predict_normalized(x, tta=tta)
    assert len(calls) == (8 if tta else 1) * 2  # 6 images in batches of 4, each view of each batch
    for task in ENCODERS:
        np.testing.assert_allclose(got[task], expected[task], atol=1e-6)
