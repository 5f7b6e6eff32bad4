"""The streaming batch loader: the same batches in-line and from worker processes,
reproducible from the augmentation generator, memory-bounded prefetch, cache sources."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellclass.data.augment import AugmentConfig, BatchAugment
from cellclass.data.batches import BatchLoader, default_workers
from cellclass.data.cache import CacheSettings, prepare_cache
from cellclass.data.normalize import NormalizedView, Normalizer
from cellclass.data.presets import bps


def _images(n: int = 40, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, (n, 2, size, size)).astype(np.float32)


def _view(images: object) -> NormalizedView:
    norm = Normalizer().fit(np.asarray(images))
    return NormalizedView(images, norm)


def _batches(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i : i + size] for i in range(0, n - size + 1, size)]


def _collect(loader: BatchLoader, batches: list[np.ndarray]) -> list[torch.Tensor]:
    return list(loader.epoch(batches))


def test_workers_give_the_same_batches_as_in_line() -> None:
    view = _view(_images())
    batches = _batches(40, 8)
    results = []
    for workers in (0, 2):
        augment = BatchAugment(AugmentConfig(), seed=3)
        with BatchLoader(view, batch_size=8, augment=augment, workers=workers, channels_last=True) as loader:
            epochs = [_collect(loader, batches), _collect(loader, batches)]  # persistent workers reused
            results.append((epochs, augment.generator.get_state()))
    (inline, state0), (workers, state2) = results
    assert torch.equal(state0, state2)
    for a_epoch, b_epoch in zip(inline, workers, strict=True):
        for a, b in zip(a_epoch, b_epoch, strict=True):
            assert a.shape == (8, 2, 16, 16) and a.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(inline[0][0], inline[1][0])  # a new epoch draws new augmentations


def test_without_augmentation_batches_are_the_normalized_rows() -> None:
    images = _images()
    view = _view(images)
    batches = _batches(40, 10)
    out = _collect(BatchLoader(view, batch_size=10), batches)
    for rows, batch in zip(batches, out, strict=True):
        np.testing.assert_array_equal(batch.numpy(), view[rows])


def test_seeds_are_drawn_when_the_epoch_starts() -> None:
    view = _view(_images())
    a, b = BatchAugment(seed=1), BatchAugment(seed=1)
    batches = _batches(40, 8)
    partial = BatchLoader(view, batch_size=8, augment=a).epoch(batches)
    next(partial)  # an interrupted epoch leaves the generator where a finished one does
    _collect(BatchLoader(view, batch_size=8, augment=b), batches)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_prefetch_depth_follows_the_memory_bound() -> None:
    view = _view(_images(8, 64))
    batch_mb = 4 * 2 * 64 * 64 * 4 / 2**20  # 4 rows, 2 channels, float32
    loader = BatchLoader(view, batch_size=4, workers=2, max_memory_mb=batch_mb * 6)
    assert loader.prefetch == 3 and loader.max_batches_in_flight == 6
    assert loader.max_batches_in_flight * loader.batch_bytes <= batch_mb * 6 * 2**20
    loader.close()
    tight = BatchLoader(view, batch_size=4, workers=2, max_memory_mb=batch_mb / 10)
    assert tight.prefetch == 1
    tight.close()
    assert BatchLoader(view, batch_size=4, workers=2, max_memory_mb=10_000).prefetch == 8


def test_streams_from_a_prepared_cache(bps_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "bps"
    shutil.copytree(bps_dir, data)
    images = prepare_cache(bps(data), CacheSettings(32)).images
    view = _view(images)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(view) == 4 and default_workers(view, devices=2) == 2
    assert default_workers(_view(_images())) == 0  # in memory: never
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers(view) == 0  # a worker would preempt the training threads
    batches = _batches(68, 16)
    with BatchLoader(view, batch_size=16, workers=1) as loader:
        out = _collect(loader, batches)
    assert [b.shape for b in out] == [(16, 1, 32, 32)] * 4
    np.testing.assert_array_equal(out[2].numpy(), view[batches[2]])
    # A cache within the memory bound stays mapped; a larger one is released after each read.
    BatchLoader(view, batch_size=16, max_memory_mb=1)
    assert images.release_each_read is False
    BatchLoader(view, batch_size=16, max_memory_mb=images.nbytes / 2**20 / 2)
    assert images.release_each_read is True
    np.testing.assert_array_equal(next(BatchLoader(view, batch_size=16).epoch(batches[2:3])).numpy(),
                                  view[batches[2]])


def test_invalid_loader_settings_are_refused() -> None:
    view = _view(_images())
    with pytest.raises(ValueError, match="loader workers = -1 is invalid; valid: an integer >= 0"):
        BatchLoader(view, batch_size=4, workers=-1)
    with pytest.raises(ValueError, match="loader max_memory_mb = 0 is invalid; valid: a number > 0"):
        BatchLoader(view, batch_size=4, max_memory_mb=0)


def test_config_refuses_invalid_loader_settings() -> None:
    from cellclass.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="loader_workers = -2 is invalid"):
        TrainConfig(loader_workers=-2)
    with pytest.raises(ConfigError, match="loader_memory_mb = 0 is invalid"):
        TrainConfig(loader_memory_mb=0)
    assert TrainConfig().cache is False and TrainConfig().loader_workers is None
