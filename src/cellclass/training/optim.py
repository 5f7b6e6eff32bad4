"""How a network is optimized: the batch size and steps of a run, the optimizer and the
learning-rate schedule (and the schedule of a run resumed with more epochs)."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from cellclass.training.config import TrainConfig

log = logging.getLogger(__name__)

AUTO_BATCH_MAX = 64
"""Largest batch ``batch_size: auto`` picks (every set with 1,024 training images or more)."""
AUTO_BATCH_MIN = 8
"""Smallest batch ``batch_size: auto`` picks, however small the training set."""
AUTO_MIN_STEPS = 16
"""Optimizer steps an epoch should have under ``batch_size: auto``."""
MIN_WARMUP_STEPS = 2
"""Fewest warm-up steps of a one-cycle schedule: with fewer the rate cannot rise (and
torch's ``OneCycleLR`` divides by zero at exactly one)."""


def auto_batch_size(n_train: int) -> int:
    """The batch size of ``batch_size: auto`` for ``n_train`` training images.

    The largest power of two from :data:`AUTO_BATCH_MAX` (64) down to :data:`AUTO_BATCH_MIN`
    (8) that gives an epoch at least :data:`AUTO_MIN_STEPS` (16) optimizer steps: a set of
    1,024 training images or more trains at 64, one of 206 at 8, so that a small set gets
    enough updates to learn from instead of a handful per epoch.
    """
    batch = AUTO_BATCH_MAX
    while batch > AUTO_BATCH_MIN and n_train // batch < AUTO_MIN_STEPS:
        batch //= 2
    return batch


@dataclass
class StepPlan:
    """How a run steps through its epochs: batch size, steps, the learning-rate schedule,
    and the precision and memory format of its steps.

    Attributes:
        batch_size: Global batch size used.
        batch_size_from: ``auto`` (chosen by :func:`auto_batch_size`) or ``config``.
        train_images: Training images per epoch.
        steps_per_epoch: Optimizer steps per epoch (a last partial batch is dropped).
        total_steps: Optimizer steps of the whole run.
        schedule: Schedule used (``onecycle``, ``cosine`` or ``none``).
        schedule_note: Why it is not the configured one (``None`` when it is).
        ema_decay: Decay of the weight average (0: none), resolved from ``auto``.
        epochs: Epochs of the run.
        epochs_from: ``auto`` (chosen by :func:`auto_epochs`) or ``config``.
        precision: Fabric precision trained in (``auto`` until the loop resolves it, see
            :mod:`cellclass.training.precision`).
        memory_format: ``channels_last`` or ``contiguous``.
        precision_from: How they were chosen: ``set``, ``auto: timed``, ``auto: cached``, ...
        precision_timings: Training images per second of each candidate ``auto`` timed
            (``precision/memory_format``), or ``None``.
    """

    batch_size: int
    batch_size_from: str
    train_images: int
    steps_per_epoch: int
    total_steps: int
    schedule: str
    schedule_note: str | None = None
    ema_decay: float = 0.0
    epochs: int = 20
    epochs_from: str = "config"
    precision: str = "32-true"
    memory_format: str = "contiguous"
    precision_from: str = "set"
    precision_timings: dict[str, float] | None = None

    @property
    def channels_last(self) -> bool:
        """Whether the network trains in channels-last memory format."""
        return self.memory_format == "channels_last"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (recorded in config.yaml, metrics.json and the checkpoints)."""
        return dataclasses.asdict(self)


def plan_steps(config: TrainConfig, n_train: int, world: int = 1) -> StepPlan:
    """Resolve the batch size (``auto`` or the configured one) and the schedule that fits.

    One-cycle needs :data:`MIN_WARMUP_STEPS` warm-up steps; a run with fewer (a small set,
    few epochs) decays the rate by cosine from its peak instead. Precision and memory format
    are the configured ones (``precision: auto`` is resolved by the training loop).
    """
    batch = config.batch_size if config.batch_size is not None else auto_batch_size(n_train)
    per_rank = max(1, batch // world)
    steps = max(1, (n_train // world) // per_rank)
    epochs = config.epochs if config.epochs is not None else auto_epochs(steps)
    total = steps * epochs
    schedule, note = config.schedule, None
    warmup = config.warmup_fraction * total
    if schedule == "onecycle" and warmup < MIN_WARMUP_STEPS:
        schedule = "cosine"
        note = (f"onecycle needs at least {MIN_WARMUP_STEPS} warm-up steps, and {total} step(s) x "
                f"warmup_fraction {config.warmup_fraction:g} give {warmup:.3g}: training with cosine decay from "
                "the peak rate (no warm-up) instead")
    return StepPlan(batch_size=batch, batch_size_from="config" if config.batch_size is not None else "auto",
                    train_images=n_train, steps_per_epoch=steps, total_steps=total, schedule=schedule,
                    schedule_note=note,
                    ema_decay=auto_ema_decay(total) if config.ema_decay is None else config.ema_decay,
                    epochs=epochs, epochs_from="config" if config.epochs is not None else "auto",
                    precision=config.precision, memory_format="channels_last" if config.channels_last else "contiguous",
                    precision_from="set" if config.precision != "auto" else "auto")


AUTO_EPOCH_STEPS = 1200  # optimizer steps `epochs: auto` aims at
AUTO_EPOCHS = (20, 60)  # the fewest and most epochs it gives


def auto_epochs(steps_per_epoch: int) -> int:
    """The epochs of ``epochs: auto``: enough for about :data:`AUTO_EPOCH_STEPS` optimizer
    steps, within :data:`AUTO_EPOCHS`.

    A small set gets more passes (40 for MitoCheck's 30 steps per epoch, where 20 epochs
    left validation macro F1 still rising: docs/results.md); from 60 steps per epoch on
    (about 3,800 images in batches of 64) it is 20, the fixed default before.
    """
    low, high = AUTO_EPOCHS
    return int(min(high, max(low, math.ceil(AUTO_EPOCH_STEPS / max(steps_per_epoch, 1)))))


def auto_ema_decay(total_steps: int) -> float:
    """The weight average's decay of ``ema_decay: auto``: ``1 - 6 / total_steps`` within
    [0.9, 0.9999], so the average spans about the last sixth of the run's steps (0.99 for
    MitoCheck's 600 steps; see docs/results.md for what it did there)."""
    return float(min(0.9999, max(0.9, 1.0 - 6.0 / max(total_steps, 1))))


def build_optimizer(model: Any, config: TrainConfig, device: Any = None) -> torch.optim.Optimizer:
    """AdamW (or SGD) with weight decay on weights only; ``device``: where training runs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    # The fused kernel makes the same update in one pass over all parameters instead of
    # torch's default per-tensor loop on a CPU, which shows in a small network's step.
    where = {torch.device(device).type} if device is not None else {p.device.type for p in decay + no_decay}
    fused = where <= {"cpu", "cuda"} and all(p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int,
                    schedule: str | None = None) -> Any:
    """The learning-rate schedule over ``total_steps`` (``schedule``: one that fits, from
    :func:`plan_steps`; ``config.schedule`` when not given)."""
    schedule = schedule or config.schedule
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                   pct_start=config.warmup_fraction)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def extended_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, plan: StepPlan, done: int) -> Any:
    """The schedule of a run resumed with more epochs: built for the longer run, at step ``done``.

    The loaded optimizer state carries the old schedule's values (rates, momenta); they are
    reset to the configured ones first, as when the run started.
    """
    for group in optimizer.param_groups:
        for key in ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"):
            group.pop(key, None)
        group["lr"] = config.lr
        for key in ("betas", "momentum"):
            if key in group and key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
    scheduler = build_scheduler(optimizer, config, plan.total_steps, plan.schedule)
    with warnings.catch_warnings():  # no optimizer step between these scheduler steps, by design
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(done):
            scheduler.step()
    log.info("learning-rate schedule %s rebuilt for %d steps, continuing at step %d", plan.schedule,
             plan.total_steps, done)
    return scheduler
