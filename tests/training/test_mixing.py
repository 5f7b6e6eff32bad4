"""Mixup and CutMix (``mixup``, ``cutmix``): what a blended batch holds, the loss that
scores it, and that a run with them resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellclass.data.presets import bps
from cellclass.training.config import ConfigError, TrainConfig
from cellclass.training.loop import train
from cellclass.training.mixing import BatchMix, batch_mix

FAST = {"model": "lenet5", "tasks": ["particle_type"], "image_size": 32, "epochs": 3, "batch_size": 16,
        "workers": 2, "tta": False, "mixup": 0.4, "cutmix": 1.0}


def _batch() -> torch.Tensor:
    return torch.arange(4 * 2 * 8 * 8, dtype=torch.float32).reshape(4, 2, 8, 8)


def _recording_loss(calls: list) -> object:
    def loss(outputs: torch.Tensor, targets: dict) -> torch.Tensor:
        calls.append(targets["t"].clone())
        return targets["t"].float().sum()
    return loss


def test_mixup_blends_each_image_with_its_pair_and_the_loss_alike() -> None:
    xb, y = _batch(), {"t": torch.tensor([0, 1, 2, 3])}
    calls: list = []
    mixed, loss_fn = BatchMix(mixup=0.4, cutmix=0.0, seed=3)(xb, _recording_loss(calls))
    total = loss_fn(None, y)
    assert len(calls) == 2 and torch.equal(calls[0], y["t"])
    perm = calls[1]  # the pairing, read back from the permuted targets
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and not torch.equal(perm, y["t"])
    # x = lam * x + (1 - lam) * x[perm]: solve lam from one pixel, then check every pixel.
    i = int(torch.nonzero(perm != y["t"])[0])
    lam = float((mixed[i, 0, 0, 0] - xb[perm[i], 0, 0, 0]) / (xb[i, 0, 0, 0] - xb[perm[i], 0, 0, 0]))
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * xb + (1 - lam) * xb[perm])
    torch.testing.assert_close(total, torch.tensor(lam * 6.0 + (1 - lam) * 6.0))


def test_cutmix_pastes_one_box_and_weighs_the_loss_by_the_pixels_kept() -> None:
    xb = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 2, 8, 8).contiguous()  # image i is all i
    y = {"t": torch.tensor([0, 1, 2, 3])}
    for seed in range(10):
        calls: list = []
        mixed, loss_fn = BatchMix(mixup=0.0, cutmix=1.0, seed=seed)(xb, _recording_loss(calls))
        total = loss_fn(None, y)
        perm = calls[1]
        box = mixed[:, 0] == perm.float()[:, None, None]  # pixels that hold the partner's value
        inside = box[int(torch.nonzero(perm != y["t"])[0])]
        rows, cols = inside.any(dim=1).nonzero(), inside.any(dim=0).nonzero()
        kept = 1.0 - float(inside.float().mean())
        if len(rows):  # one rectangle
            assert bool(inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
        for i in range(4):  # outside the box every image is its own; inside, its partner's
            expected = torch.where(inside, perm[i].float(), float(i))
            assert torch.equal(mixed[i], expected.expand(2, 8, 8))
        torch.testing.assert_close(total, torch.tensor(kept * 6.0 + (1 - kept) * 6.0))
    assert batch_mix(0.0, 0.0, 0) is None


def test_both_on_use_each_and_the_draws_resume_from_the_saved_state() -> None:
    xb = _batch()
    plain = lambda outputs, targets: torch.tensor(0.0)
    mix = BatchMix(mixup=0.4, cutmix=1.0, seed=1)
    kinds = set()
    for _ in range(20):
        mixed, _ = mix(xb, plain)
        kinds.add("cutmix" if bool(((mixed == xb).all(dim=1)).any()) else "mixup")
    assert kinds == {"mixup", "cutmix"}
    state = mix.state_dict()
    again = BatchMix(mixup=0.4, cutmix=1.0, seed=99)
    again.load_state_dict(state)
    torch.testing.assert_close(mix(xb, plain)[0], again(xb, plain)[0])


def test_negative_alpha_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"mixup = -0.2 is invalid; valid: a number >= 0"):
        TrainConfig(mixup=-0.2)
    with pytest.raises(ConfigError, match=r"cutmix = -1.0 is invalid"):
        TrainConfig(cutmix=-1)


@pytest.mark.slow
def test_a_run_with_mixing_resumes_to_the_same_result(bps_dir: Path, tmp_path: Path,
        interrupt_in_epoch_2, same_epochs) -> None:
    cfg = TrainConfig(**FAST)
    straight = tmp_path / "straight"
    train(bps(bps_dir), cfg, straight)
    broken = tmp_path / "broken"
    interrupt_in_epoch_2(bps(bps_dir), cfg, broken)
    train(bps(bps_dir), cfg, broken, resume=True)
    same_epochs(straight, broken)
