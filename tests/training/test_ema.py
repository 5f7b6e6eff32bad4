"""The weight average (``ema_decay``): what it averages, what a run saves, and that an
interrupted run with an average resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellclass.data.presets import bps
from cellclass.inference.checkpoint import Checkpoint
from cellclass.training.config import ConfigError, TrainConfig
from cellclass.training.loop import train, weight_average

FAST = {"model": "lenet5", "tasks": ["particle_type"], "image_size": 32, "epochs": 3, "batch_size": 16,
        "workers": 2, "tta": False, "ema_decay": 0.9}


def test_average_follows_the_weights_with_a_warm_up() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = weight_average(model, 0.9)
    assert weight_average(model, 0.0) is None
    first = model[0].weight.detach().clone()
    ema.update_parameters(model)  # the first update copies
    torch.testing.assert_close(ema.module[0].weight, first)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update_parameters(model)  # second update: decay min(0.9, 2/11)
    beta = 2 / 11
    torch.testing.assert_close(ema.module[0].weight, beta * first + (1 - beta) * (first + 1.0))
    assert int(ema.module[1].num_batches_tracked) == 7  # counters are copied, not averaged


def test_decay_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"ema_decay = 1.0 is invalid; valid: a number >= 0 and < 1"):
        TrainConfig(ema_decay=1.0)


@pytest.mark.slow
def test_a_run_saves_the_average_and_resumes_to_the_same_result(bps_dir: Path, tmp_path: Path,
        interrupt_in_epoch_2, same_epochs) -> None:
    cfg = TrainConfig(**FAST)
    straight = tmp_path / "straight"
    train(bps(bps_dir), cfg, straight)
    last = Checkpoint.load(straight / "checkpoints" / "last.ckpt")
    raw = last.training_state["raw_weights"]
    assert last.training_state["ema_updates"] > 0
    changed = [k for k, v in last.state_dict.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    assert changed, "the saved weights are the average, not the last step's"
    broken = tmp_path / "broken"
    interrupt_in_epoch_2(bps(bps_dir), cfg, broken)
    train(bps(bps_dir), cfg, broken, resume=True)
    same_epochs(straight, broken)


def test_auto_decay_spans_a_sixth_of_the_run_and_is_recorded_in_the_plan() -> None:
    from cellclass.training.optim import auto_ema_decay, plan_steps

    assert auto_ema_decay(600) == pytest.approx(0.99)
    assert auto_ema_decay(10) == 0.9 and auto_ema_decay(10**7) == 0.9999
    assert TrainConfig().ema_decay == 0.0  # off by default
    auto = TrainConfig(ema_decay="auto", batch_size=64, epochs=20)
    assert auto.ema_decay is None
    assert plan_steps(auto, 1966).ema_decay == pytest.approx(1 - 6 / (30 * 20))
    assert plan_steps(TrainConfig(ema_decay=0.95), 1966).ema_decay == 0.95
    with pytest.raises(ConfigError, match=r"ema_decay = 'often' is invalid; valid: a number or auto"):
        TrainConfig(ema_decay="often")
