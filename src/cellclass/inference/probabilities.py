"""Logits to probabilities, the one place a task's activation is chosen."""

from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Probabilities of one task's logits (classes along the last dimension).

    Args:
        logits: ``(N, K)`` (or ``(K,)``) logits of one task.
        task_type: ``multilabel`` (an independent sigmoid per class), or ``single`` and
            ``binary`` (a softmax over the classes).
    """
    if task_type == "multilabel":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)
