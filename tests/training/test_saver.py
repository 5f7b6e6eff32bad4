"""The checkpoint saver: the best epoch by the monitored metric (higher or lower is better),
patience, the files it writes, and its state across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.inference.checkpoint import Checkpoint
from cellclass.models import create_model
from cellclass.training.saver import CheckpointSaver


def test_a_metric_improves_upwards_and_patience_counts_the_epochs_since() -> None:
    saver = CheckpointSaver("unused", "val/macro_f1", patience=2)
    assert [saver.update(e, v) for e, v in enumerate([0.5, 0.7, 0.7, 0.6, 0.8, 0.1, 0.2], start=1)] == \
        [True, True, False, False, True, False, False]
    assert saver.best_epoch == 5 and saver.best_value == 0.8 and saver.bad_epochs == 2
    assert saver.patience_spent


def test_a_loss_improves_downwards_and_nan_never_improves() -> None:
    saver = CheckpointSaver("unused", "val_loss")
    assert saver.mode == "min"
    assert [saver.update(e, v) for e, v in enumerate([math.nan, 0.9, 1.2, math.nan, 0.3], start=1)] == \
        [False, True, False, False, True]
    assert (saver.best_epoch, saver.best_value, saver.bad_epochs) == (5, 0.3, 0)
    assert not saver.patience_spent  # patience 0: never stops early


def test_epochs_before_the_first_candidate_are_never_the_best_nor_count_against_patience() -> None:
    saver = CheckpointSaver("unused", "val/macro_f1", patience=2, first_candidate=3)
    assert [saver.update(e, v) for e, v in enumerate([0.9, 0.95, 0.6, 0.5, 0.7, 0.65], start=1)] == \
        [False, False, True, False, True, False]
    assert (saver.best_epoch, saver.best_value, saver.bad_epochs) == (5, 0.7, 1)


@pytest.mark.parametrize(("best_after", "epochs", "first"), [(0.0, 30, 1), (0.5, 30, 16), (0.5, 1, 1),
                                                             (0.5, 3, 2), (0.99, 10, 10)])
def test_best_after_sets_the_first_candidate_within_the_run(best_after: float, epochs: int, first: int) -> None:
    from cellclass.training.config import TrainConfig
    from cellclass.training.loop import first_candidate

    assert first_candidate(TrainConfig(best_after=best_after, epochs=epochs)) == first


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_best_after_outside_zero_to_one_is_refused(value: float) -> None:
    from cellclass.errors import ConfigError
    from cellclass.training.config import TrainConfig

    with pytest.raises(ConfigError, match="best_after"):
        TrainConfig(best_after=value)


def test_its_state_continues_where_it_stopped() -> None:
    saver = CheckpointSaver("unused", "val/macro_f1", patience=3)
    for epoch, value in enumerate([0.4, 0.6, 0.5], start=1):
        saver.update(epoch, value)
    resumed = CheckpointSaver("unused", "val/macro_f1", patience=3)
    resumed.load_state_dict(saver.state_dict())
    assert resumed.state_dict() == {"best_score": 0.6, "best_epoch": 2, "bad_epochs": 1}
    assert not resumed.update(4, 0.55) and resumed.update(5, 0.9) and resumed.best_epoch == 5


@pytest.fixture
def template() -> Checkpoint:
    model = create_model("lenet5", in_chans=1, heads={"t": 2}, image_size=16, task_types={"t": "single"})
    images = list(np.random.default_rng(0).integers(0, 100, size=(4, 1, 16, 16)).astype(np.uint16))
    return Checkpoint(kind="network", model_config=model.config, encoders={"t": TaskEncoder("t", "single", ["a", "b"])},
                      normalizer=Normalizer().fit(images), image_size=16, config={"model": "lenet5"},
                      state_dict=model.state_dict())


def test_best_is_written_when_an_epoch_improves_and_last_after_every_epoch(template: Checkpoint,
                                                                          tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path / "checkpoints", "val/macro_f1")
    for epoch, value in ((1, 0.5), (2, 0.4)):
        improved = saver.update(epoch, value)
        saver.save(template.replace(epoch=epoch, metrics={"val/macro_f1": value}), improved,
                   {"epoch": epoch, **saver.state_dict()})
    best = Checkpoint.load(tmp_path, "best")
    last = Checkpoint.load(tmp_path, "last")
    assert best.epoch == 1 and best.metrics == {"val/macro_f1": 0.5} and best.training_state is None
    assert last.epoch == 2 and last.training_state == {"epoch": 2, "best_score": 0.5, "best_epoch": 1,
                                                       "bad_epochs": 1}
