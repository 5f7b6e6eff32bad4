"""Small training sets: the automatic batch size, a learning-rate schedule that fits a run of
few optimizer steps, and resuming a run with more epochs (other changed settings refused)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cellclass.data.presets import bps
from cellclass.errors import TrainingError
from cellclass.inference.checkpoint import Checkpoint
from cellclass.training.config import ConfigError, TrainConfig
from cellclass.training.loop import train
from cellclass.training.optim import auto_batch_size, auto_epochs, plan_steps

FAST = {"model": "lenet5", "tasks": ["particle_type"], "image_size": 64, "epochs": 1, "workers": 1,
        "tta": False, "channels_last": False}


@pytest.fixture(scope="module")
def bps160(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small set: 160 simulated BPS nuclei (94 training images in the plate split)."""
    from cellclass.data.simulate import simulate_bps

    out = tmp_path_factory.mktemp("bps160")
    simulate_bps(out, n_images=160, seed=0)
    return out


class RecordingTracker:
    """A tracker that keeps what the loop tells it (the params are what this test reads)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifacts(self, folder: Path) -> None:
        pass


def runtime_steps(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())["runtime"]["steps"]


def test_auto_epochs_give_small_sets_more_passes_and_large_ones_20() -> None:
    assert TrainConfig().epochs is None  # auto by default
    # MitoCheck's 1,966 training images in batches of 64: 30 steps, 40 epochs (1,200 steps);
    # AutoFoci's 206 at 8: 25 steps, 48 epochs; a large set: 20; a tiny one: at most 60.
    assert [auto_epochs(s) for s in (1, 11, 25, 30, 40, 60, 61, 1200)] == [60, 60, 48, 40, 30, 20, 20, 20]
    plan = plan_steps(TrainConfig(), 1966)
    assert (plan.epochs, plan.epochs_from, plan.total_steps) == (40, "auto", 1200)
    assert plan_steps(TrainConfig(epochs=20), 1966).epochs_from == "config"
    assert plan_steps(TrainConfig(epochs=20), 1966).total_steps == 600
    assert TrainConfig.from_dict({"epochs": "auto"}).epochs is None
    with pytest.raises(ConfigError, match="epochs = 'lots' is invalid; valid: an integer >= 1 or auto"):
        TrainConfig.from_dict({"epochs": "lots"})
    with pytest.raises(ConfigError, match="epochs = 0 is invalid"):
        TrainConfig(epochs=0)


@pytest.mark.slow
def test_auto_epochs_are_recorded_and_a_resumed_run_keeps_them(bps160: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto"
    tracker = RecordingTracker()
    cfg = TrainConfig(**{**FAST, "epochs": None, "image_size": 32})
    result = train(bps(bps160), cfg, out, tracker=tracker)  # batch 8: 11 steps an epoch, so 60 epochs (cap)
    assert result["epochs_run"] == 60 and runtime_steps(out)["epochs_from"] == "auto"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 60
    assert tracker.params["epochs"] == 60 and runtime_steps(out)["total_steps"] == 660
    again = train(bps(bps160), cfg, out, resume=True)  # nothing left to do, same settings accepted
    assert again["epochs_run"] == 60 and runtime_steps(out)["epochs_from"] == "auto"


def test_auto_batch_size_gives_small_sets_enough_steps_and_leaves_large_ones_at_64() -> None:
    assert TrainConfig().batch_size is None  # auto by default
    # AutoFoci's 206 training images: 25 steps an epoch at 8, not 3 at 64.
    assert [auto_batch_size(n) for n in (5, 94, 206, 256, 511, 512, 1023, 1024, 1966, 50_000)] == \
        [8, 8, 8, 16, 16, 32, 32, 64, 64, 64]
    plan = plan_steps(TrainConfig(epochs=20), 206)
    assert (plan.batch_size, plan.batch_size_from, plan.steps_per_epoch, plan.total_steps) == (8, "auto", 25, 500)
    assert plan_steps(TrainConfig(batch_size=64), 206).batch_size == 64  # an explicit value wins
    assert plan_steps(TrainConfig(batch_size=64), 206).batch_size_from == "config"
    assert TrainConfig.from_dict({"batch_size": "auto"}).batch_size is None
    with pytest.raises(ConfigError, match="batch_size = 'many' is invalid; valid: an integer >= 1 or auto"):
        TrainConfig.from_dict({"batch_size": "many"})


@pytest.mark.shared_data
def test_auto_batch_size_on_the_real_sets(shared_data: Path) -> None:
    """AutoFoci (206 training images) trains at 8; MitoCheck (about 2,000) stays at 64, so
    its documented figures (made at 64) stand."""
    from cellclass.data.labels import encode_frame, fit_encoders
    from cellclass.data.presets import load_spec
    from cellclass.data.splits import choose_split_method, make_split

    def n_train(path: Path, **options: Any) -> int:
        """Training images of the default split, made as ``train`` makes it (no image read)."""
        spec = load_spec(path, **options)
        frame = spec.load_manifest()
        targets = encode_frame(spec, frame, fit_encoders(spec, frame))
        method, column, _ = choose_split_method(spec.groups, None, None, split_column=spec.split_column)
        config = TrainConfig()
        split = make_split(frame, labels=targets[spec.tasks[0].name], method=method, seed=config.seed,
                           groups=frame[column].astype(str).to_numpy() if column else None, group_column=column,
                           val_fraction=config.val_fraction, test_fraction=config.test_fraction, predefined=None)
        return len(split.train)

    foci = n_train(shared_data / "autofoci_dsb_foci_singlecell" / "labels.csv", image_col="filename",
                   tasks=["has_focus:binary"], drop_unlabeled=True)
    mito = n_train(shared_data / "mitocheck_h2b_phenotypes" / "labels.csv", image_col="filename",
                   tasks=["phenotype"], groups=["plate"])
    assert foci == 206 and auto_batch_size(foci) == 8
    assert mito > 1900 and auto_batch_size(mito) == 64


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "steps"), [(64, 1), (47, 2), (16, 5)])
def test_a_run_of_few_steps_trains_on_a_schedule_that_fits(bps160: Path, tmp_path: Path, batch_size: int,
                                                           steps: int, caplog: pytest.LogCaptureFixture) -> None:
    """One-cycle cannot warm up in 1, 2 or 5 steps (at 5, torch's OneCycleLR divides by zero):
    the run trains with cosine decay, says why in one line and records it."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="cellclass.training"):
        result = train(bps(bps160), TrainConfig(**FAST, batch_size=batch_size), out)
    assert 0 <= result["tasks"]["particle_type"]["macro_f1"] <= 1
    recorded = runtime_steps(out)
    assert (recorded["steps_per_epoch"], recorded["total_steps"], recorded["schedule"]) == (steps, steps, "cosine")
    assert "onecycle needs at least 2 warm-up steps" in recorded["schedule_note"]
    assert result["steps"]["schedule"] == "cosine"
    assert Checkpoint.load(out).steps["schedule"] == "cosine"
    lines = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert len(lines) == 1 and f"{steps} step(s) x warmup_fraction 0.2" in lines[0]


def test_enough_steps_keep_one_cycle(bps160: Path) -> None:
    plan = plan_steps(TrainConfig(**{**FAST, "epochs": 2}, batch_size=16), 94)
    assert (plan.total_steps, plan.schedule, plan.schedule_note) == (10, "onecycle", None)


@pytest.mark.slow
def test_the_batch_size_used_is_recorded_everywhere(bps160: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto"
    tracker = RecordingTracker()
    result = train(bps(bps160), TrainConfig(**FAST), out, tracker=tracker)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"] == 8
    steps = runtime_steps(out)
    timings = steps.pop("precision_timings")  # precision auto, 11 steps: timed (or cached by an earlier test)
    chosen = {k: steps.pop(k) for k in ("precision", "memory_format", "precision_from")}
    assert steps | {"schedule_note": None} == {
        "batch_size": 8, "batch_size_from": "auto", "train_images": 94, "steps_per_epoch": 11, "total_steps": 11,
        "schedule": "onecycle", "schedule_note": None, "ema_decay": 0.0, "epochs": 1, "epochs_from": "config"}
    assert chosen["precision_from"] in ("auto: timed", "auto: cached")
    assert list(timings) == ["32-true/contiguous", "bf16-mixed/contiguous"]  # channels_last off in FAST
    assert timings[f"{chosen['precision']}/{chosen['memory_format']}"] == max(timings.values())
    assert result["batch_size"] == 8 and json.loads((out / "metrics.json").read_text())["batch_size"] == 8
    assert Checkpoint.load(out).config["batch_size"] == 8
    assert tracker.params["batch_size"] == 8 and tracker.params["batch_size_from"] == "auto"
    assert tracker.params["schedule_used"] == "onecycle" and tracker.params["steps_per_epoch"] == 11
    assert (tracker.params["precision"], tracker.params["precision_used"], tracker.params["memory_format"],
            tracker.params["precision_from"], tracker.params["precision_timings"]) == \
        ("auto", chosen["precision"], chosen["memory_format"], chosen["precision_from"], timings)


@pytest.mark.slow
def test_resume_with_more_epochs_extends_the_run(bps160: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(bps(bps160), TrainConfig(**FAST), out)  # auto: batch 8, 11 steps
    result = train(bps(bps160), TrainConfig(**{**FAST, "epochs": 3}), out, resume=True)
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert result["epochs_run"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 3
    # The longer run's one-cycle schedule (33 steps), continued at step 11 and run to its end.
    assert runtime_steps(out)["total_steps"] == 33 and runtime_steps(out)["schedule"] == "onecycle"
    last = Checkpoint.load(out, "last")
    assert last.epoch == 3 and last.training_state["scheduler"]["total_steps"] == 33
    assert last.training_state["scheduler"]["last_epoch"] == 33
    assert last.training_state["epoch"] == 3 and last.training_state["epochs"] == 3
    lr = pd.read_csv(out / "metrics.csv")["lr"].tolist()
    assert lr[1] > lr[0] and lr[1] > lr[2]  # the rate rose again for the longer cycle, then fell


@pytest.mark.slow
def test_resume_refuses_changed_settings_naming_each(bps160: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(bps(bps160), TrainConfig(**{**FAST, "epochs": 2}), out)  # batch size auto: 8
    with pytest.raises(TrainingError, match=r"cannot resume .* with changed settings: image_size 64 in the run, "
                                            r"32 now; lr 0.003 in the run, 0.01 now; valid: the run's settings"):
        train(bps(bps160), TrainConfig(**{**FAST, "epochs": 2, "image_size": 32, "lr": 0.01}), out, resume=True)
    with pytest.raises(TrainingError, match="batch_size 8 in the run, 16 now"):
        train(bps(bps160), TrainConfig(**{**FAST, "epochs": 2}, batch_size=16), out, resume=True)
    with pytest.raises(TrainingError, match="epochs = 1 is invalid to resume .*: 2 epoch.s. are done; valid: more "
                                            "than 2"):
        train(bps(bps160), TrainConfig(**FAST), out, resume=True)
    # Machine settings may differ; auto takes the run's batch size: this resume re-evaluates.
    again = train(bps(bps160), TrainConfig(**{**FAST, "epochs": 2, "workers": 2}), out, resume=True)
    assert again["epochs_run"] == 2 and again["batch_size"] == 8


@pytest.mark.slow
def test_cli_resume_applies_more_epochs_and_refuses_other_changes(cli, bps160: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["train", bps160, "--preset", "bps", "--task", "particle_type", "--model", "lenet5",
              "--tracker", "none", "--set", "tta=false", "--set", "workers=1", "--out", out]
    first = cli(*common, "--epochs", "1", "--image-size", "64", "--batch-size", "8")
    assert first.returncode == 0, first.stderr
    more = cli(*common, "--resume", "--epochs", "2")  # no other option: the run's settings
    assert more.returncode == 0, more.stderr
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
    refused = cli(*common, "--resume", "--epochs", "3", "--lr", "0.01", "--set", "image_size=32")
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "error: cannot resume" in message and "image_size 64 in the run, 32 now; lr 0.003 in the run, 0.01 now" \
        in message, refused.stderr
    assert "Traceback" not in refused.stderr
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]  # nothing trained
