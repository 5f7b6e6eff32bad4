"""The Trainer's state dict: what last.ckpt keeps beside the weights. Restored into a new
Trainer, training continues with the very same steps; a run given more epochs follows the
longer run's schedule from the step reached."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning_fabric import Fabric

from cellclass.models import create_model
from cellclass.training.config import TrainConfig
from cellclass.training.loop import Trainer, train_step
from cellclass.training.optim import plan_steps
from cellclass.training.saver import CheckpointSaver

CONFIG = TrainConfig(epochs=2, batch_size=4, image_size=16, channels_last=False, precision="32-true",
                     accelerator="cpu")


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits["t"], targets["t"])


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    return fabric


def _trainer(fabric: Fabric, config: TrainConfig, weights: dict[str, torch.Tensor] | None = None) -> Trainer:
    torch.manual_seed(0)
    model = create_model("lenet5", in_chans=1, heads={"t": 3}, image_size=16, task_types={"t": "single"})
    if weights is not None:
        model.load_state_dict(weights)
    trainer = Trainer(fabric, model, config, plan_steps(config, 16), _loss,
                      CheckpointSaver(Path("unused"), config.monitor))
    return trainer


def _steps(trainer: Trainer, n: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        xb = torch.randn(4, 1, 16, 16, generator=generator)
        yb = {"t": torch.randint(0, 3, (4,), generator=generator)}
        train_step(trainer.fabric, trainer.model, trainer.optimizer, trainer.scheduler, trainer.loss_fn, xb, yb)


def _saved(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as it comes back from last.ckpt (written, then read without running code)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}


def test_a_restored_trainer_continues_with_the_same_steps(fabric: Fabric) -> None:
    first = _trainer(fabric, CONFIG)
    _steps(first, 4, seed=1)  # epoch 1: 16 images in batches of 4
    torch.randperm(16, generator=first.order)
    first.epoch = 1
    first.saver.update(1, 0.42)
    state = _saved(first.state_dict())
    assert state["epoch"] == 1 and state["epochs"] == 2 and state["best_epoch"] == 1

    second = _trainer(fabric, CONFIG, weights=_weights(first))
    second.load_state_dict(state)
    assert second.epoch == 1 and second.saver.best_value == 0.42
    assert second.scheduler.state_dict() == first.scheduler.state_dict()
    assert torch.equal(second.order.get_state(), first.order.get_state())
    assert torch.equal(second.augment.generator.get_state(), first.augment.generator.get_state())
    _steps(first, 4, seed=2)
    _steps(second, 4, seed=2)
    for key, value in _weights(first).items():
        torch.testing.assert_close(_weights(second)[key], value, rtol=0, atol=0)
    assert torch.equal(torch.randperm(16, generator=second.order), torch.randperm(16, generator=first.order))


def test_a_longer_run_follows_its_own_schedule_from_the_step_reached(fabric: Fabric) -> None:
    first = _trainer(fabric, CONFIG)
    _steps(first, 4, seed=1)
    first.epoch = 1
    longer = TrainConfig(**{**CONFIG.to_dict(), "epochs": 4})
    resumed = _trainer(fabric, longer, weights=_weights(first))
    resumed.load_state_dict(_saved(first.state_dict()))
    assert resumed.plan.total_steps == 16 and resumed.plan.schedule == "onecycle"
    assert resumed.scheduler.total_steps == 16 and resumed.scheduler.last_epoch == 4
    assert resumed.state_dict()["epochs"] == 4
