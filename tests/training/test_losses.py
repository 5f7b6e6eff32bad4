"""Losses by task type: cross-entropy with smoothing and class weights, BCE, focal, soft-F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellclass.data.labels import TaskEncoder
from cellclass.training.config import TrainConfig
from cellclass.training.losses import (
    build_loss,
    class_weights,
    focal_loss,
    multitask_loss,
    positive_weights,
    soft_f1_loss,
)


def test_class_and_positive_weights() -> None:
    w = class_weights(np.array([0, 0, 0, 0, 1, -1]), 3)
    assert float(w[1] / w[0]) == pytest.approx(4.0)
    assert float(w[2]) == pytest.approx(float(w[:2].mean()))  # an unseen class gets the mean weight
    assert float(w.mean()) == pytest.approx(1.0)
    root = class_weights(np.array([0, 0, 0, 0, 1, -1]), 2, power=0.5)
    assert float(root[1] / root[0]) == pytest.approx(2.0)
    pw = positive_weights(np.array([[1, 0], [0, 0], [0, 0], [1, 1]]))
    assert pw.tolist() == pytest.approx([1.0, 3.0])


def test_single_label_cross_entropy_ignores_empty_labels() -> None:
    enc = TaskEncoder("t", "single", ["a", "b", "c"])
    loss = build_loss(enc, TrainConfig(label_smoothing=0.0, class_weights="none"), np.array([0, 1, 2]))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0]])
    expected = F.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert loss(logits, torch.tensor([0, 1, -1])) == pytest.approx(float(expected))
    assert float(loss(logits, torch.tensor([-1, -1, -1]))) == 0.0


def test_focal_loss_downweights_easy_examples() -> None:
    target = torch.tensor([[1.0], [1.0]])
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[-1.0]])
    bce = F.binary_cross_entropy_with_logits
    assert focal_loss(easy, target[:1]) / bce(easy, target[:1]) < focal_loss(hard, target[:1]) / bce(hard, target[:1])
    assert float(focal_loss(torch.zeros(2, 1), target, gamma=0.0)) == pytest.approx(float(bce(torch.zeros(2, 1), target)))


def test_soft_f1_is_zero_for_confident_correct_predictions() -> None:
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(soft_f1_loss(torch.tensor([[20.0, -20.0], [-20.0, 20.0]]), target)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_f1_loss(torch.tensor([[-20.0, 20.0], [20.0, -20.0]]), target)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["bce", "focal", "softf1"])
def test_multilabel_losses_and_weighted_sum(kind: str) -> None:
    enc = TaskEncoder("m", "multilabel", ["x", "y"])
    targets = np.array([[1, 0], [0, 1], [1, 1]])
    loss = build_loss(enc, TrainConfig(multilabel_loss=kind, pos_weight=True), targets)
    value = loss(torch.zeros(3, 2, requires_grad=True), torch.from_numpy(targets))
    assert value.ndim == 0 and float(value.detach()) > 0
    total = multitask_loss({"m": loss, "n": loss}, {"n": 2.0})
    out = {"m": torch.zeros(3, 2), "n": torch.zeros(3, 2)}
    y = {"m": torch.from_numpy(targets), "n": torch.from_numpy(targets)}
    assert float(total(out, y)) == pytest.approx(3 * float(value.detach()))


def test_single_task_loss_is_the_task_loss_itself() -> None:
    enc = TaskEncoder("t", "single", ["a", "b", "c"])
    targets = np.array([0, 1, 2, 2])
    loss = build_loss(enc, TrainConfig(), targets)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.from_numpy(targets)
    single = multitask_loss({"t": loss}, {})({"t": logits}, {"t": y})
    assert torch.equal(single, loss(logits, y))
    halved = multitask_loss({"t": loss}, {"t": 0.5})({"t": logits}, {"t": y})
    assert float(halved) == pytest.approx(0.5 * float(single))
    with pytest.raises(ValueError, match="at least one task loss"):
        multitask_loss({}, {})
