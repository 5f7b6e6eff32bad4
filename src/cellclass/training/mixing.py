"""Mixup and CutMix of training batches.

Mixup (Zhang et al., ICLR 2018) blends each image with another of the batch,
``lam * x + (1 - lam) * x[perm]``; CutMix (Yun et al., ICCV 2019) pastes a random box of
the other image instead, ``lam`` then being the share of the pixels kept. In both the loss
is blended the same way, ``lam * loss(y) + (1 - lam) * loss(y[perm])``, which for
cross-entropy and BCE is the loss of the blended targets. ``lam`` is drawn from
``Beta(alpha, alpha)`` per batch; with both on, each batch uses one of the two at random.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


class BatchMix:
    """Draws the blend of each training batch; its generator's state resumes with the run.

    Args:
        mixup: Beta concentration of mixup (0: off).
        cutmix: Beta concentration of CutMix (0: off).
        seed: Seed of the blend weights, boxes and pairings.
    """

    def __init__(self, mixup: float, cutmix: float, seed: int) -> None:
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.rng = np.random.default_rng(seed)

    def __call__(self, xb: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, LossFn]:
        """The blended batch and the loss of ``(outputs, targets)`` that scores it."""
        n = xb.shape[0]
        kinds = [k for k, alpha in (("mixup", self.mixup), ("cutmix", self.cutmix)) if alpha > 0]
        if n < 2 or not kinds:
            return xb, loss_fn
        kind = kinds[int(self.rng.integers(len(kinds)))] if len(kinds) > 1 else kinds[0]
        alpha = self.mixup if kind == "mixup" else self.cutmix
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(n)).to(xb.device)
        if kind == "mixup":
            mixed = xb * lam + xb[perm] * (1 - lam)
        else:
            mixed, lam = _paste_box(xb, perm, lam, self.rng)

        def blended(outputs: Any, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
            other = {task: y[perm] for task, y in targets.items()}
            return loss_fn(outputs, targets) * lam + loss_fn(outputs, other) * (1 - lam)

        return mixed, blended

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (plain data, for the checkpoint)."""
        return dict(self.rng.bit_generator.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the draws from a :meth:`state_dict`."""
        self.rng.bit_generator.state = dict(state)


def _paste_box(xb: torch.Tensor, perm: torch.Tensor, lam: float,
               rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """CutMix: a box covering about ``1 - lam`` of the image taken from the paired image;
    returns the batch and the share of each image left its own (the box clipped at the edges)."""
    h, w = xb.shape[-2:]
    side = np.sqrt(1.0 - lam)
    bh, bw = round(h * side), round(w * side)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + (bh + 1) // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + (bw + 1) // 2, w)
    mixed = xb.clone()
    mixed[..., y0:y1, x0:x1] = xb[perm][..., y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


def batch_mix(mixup: float, cutmix: float, seed: int) -> BatchMix | None:
    """The run's :class:`BatchMix`, or ``None`` when both are off."""
    return BatchMix(mixup, cutmix, seed) if mixup > 0 or cutmix > 0 else None
