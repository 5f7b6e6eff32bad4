"""Losses chosen by task type; a multi-task loss is their weighted sum.

- ``single`` and ``binary``: cross-entropy with optional label smoothing and inverse
  frequency class weights; rows with an empty label (``-1``) are ignored.
- ``multilabel``: BCE with optional ``pos_weight``, focal loss, or soft-F1 (one minus a
  differentiable macro F1).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cellclass.data.labels import TaskEncoder
from cellclass.training.config import TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over elements."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return ((1 - p_t) ** gamma * bce).mean()


def soft_f1_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """One minus the macro F1 computed on probabilities instead of hard decisions."""
    p = torch.sigmoid(logits)
    tp = (p * target).sum(0)
    fp = (p * (1 - target)).sum(0)
    fn = ((1 - p) * target).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + eps)
    return 1 - f1.mean()


def class_weights(targets: np.ndarray, n_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights ``(1 / count) ** power`` normalised to mean 1.

    ``power=1`` is plain inverse frequency, ``power=0.5`` its square root. A class absent
    from the training targets gets the mean weight.
    """
    counts = np.bincount(targets[targets >= 0], minlength=n_classes).astype(np.float64)
    seen = counts > 0
    weights = np.ones(n_classes)
    weights[seen] = (counts[seen].sum() / counts[seen]) ** power
    weights[~seen] = weights[seen].mean() if seen.any() else 1.0
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def positive_weights(targets: np.ndarray) -> torch.Tensor:
    """BCE ``pos_weight`` per class: negatives / positives (1 where a class has none)."""
    pos = targets.sum(0).astype(np.float64)
    neg = len(targets) - pos
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def build_loss(encoder: TaskEncoder, config: TrainConfig, train_targets: np.ndarray) -> LossFn:
    """The loss of one task, given its training targets (for class and positive weights)."""
    if encoder.type == "multilabel":
        pw = positive_weights(train_targets) if config.pos_weight else None
        if config.multilabel_loss == "focal":
            return lambda logits, y: focal_loss(logits, y.float(), pos_weight=_to(pw, logits))
        if config.multilabel_loss == "softf1":
            return lambda logits, y: soft_f1_loss(logits, y.float())
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=_to(pw, logits))
    powers = {"inverse": 1.0, "sqrt": 0.5}
    weight = (class_weights(train_targets, encoder.n_outputs, powers[config.class_weights])
              if config.class_weights in powers else None)

    def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if (y < 0).all():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, y, weight=_to(weight, logits), ignore_index=-1,
                               label_smoothing=config.label_smoothing)

    return cross_entropy


def _to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


def multitask_loss(losses: Mapping[str, LossFn], weights: Mapping[str, float]) -> Callable[
        [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]:
    """Weighted sum of per-task losses (weight 1 for a task not in ``weights``)."""
    if not losses:
        raise ValueError("multitask_loss needs at least one task loss; got none")

    def term(task: str, fn: LossFn, outputs: Mapping[str, torch.Tensor],
             targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = fn(outputs[task].float(), targets[task])
        weight = weights.get(task, 1.0)
        return loss if weight == 1.0 else weight * loss

    def total(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # reduce, not sum() (which starts from 0), and no multiplying by a weight of 1: the
        # same value, two autograd nodes fewer per task, which a small network's step notices.
        return functools.reduce(operator.add, (term(t, fn, outputs, targets) for t, fn in losses.items()))

    return total
