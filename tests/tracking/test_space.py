"""Sweep files: the W&B format read unchanged, search spaces, and every refusal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from cellclass.errors import SweepError
from cellclass.tracking.space import SweepSpace, valid_metrics
from cellclass.tracking.sweep import resolve_n_trials

WANDB_FILE = """\
program: train.py
method: grid
metric:
  name: val/macro_f1
  goal: maximize
parameters:
  batch_size:
    values: [16, 32]
  epochs:
    values: [1, 2]
  lr:
    min: 1e-4
    max: 0.01
"""

SEED_FILE = WANDB_FILE.replace("val/macro_f1", "train_loss").replace("maximize", "minimize")


def space(**parameters: Any) -> SweepSpace:
    return SweepSpace.from_dict({"method": "random", "metric": {"name": "val/macro_f1"}, "parameters": parameters})


def test_wandb_sweep_file_reads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(WANDB_FILE)
    s = SweepSpace.from_yaml(path)
    assert (s.method, s.metric, s.goal) == ("grid", "val/macro_f1", "maximize")
    by_name = {p.name: p for p in s.parameters}
    assert by_name["batch_size"].values == (16, 32) and by_name["epochs"].values == (1, 2)
    lr = by_name["lr"]  # `1e-4` is text to YAML 1.1: read as a number
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 0.01, False)
    assert s.grid() == {"batch_size": [16, 32], "epochs": [1, 2]}  # lr is drawn at random per grid point
    assert s.grid_size() == 4 and resolve_n_trials(s, None) == 4 and resolve_n_trials(s, 10) == 4
    s.check_metric(["particle_type"])


def test_training_loss_is_refused_with_the_validation_metrics(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_FILE)
    s = SweepSpace.from_yaml(path)
    with pytest.raises(SweepError, match=r"'train_loss' is a training metric.*valid \(validation metrics\): "
                                         r"val_loss, val/accuracy, .*val/macro_f1.*val/particle_type/macro_f1"):
        s.check_metric(["particle_type"])


@pytest.mark.parametrize(("metric", "message"), [
    ("test/particle_type/macro_f1", r"is a test metric: choosing hyperparameters on the test split"),
    ("val/f1", r"'val/f1' is not a validation metric of this dataset \(did you mean 'val/micro_f1'\?\)"),
    ("val/dose/macro_f1", r"not a validation metric of this dataset.*valid: val_loss"),
])
def test_other_non_validation_metrics_are_refused(metric: str, message: str) -> None:
    s = SweepSpace.from_dict({"method": "random", "metric": metric, "parameters": {"lr": [0.1, 0.2]}})
    with pytest.raises(SweepError, match=message):
        s.check_metric(["particle_type"])


def test_valid_metrics_name_tasks() -> None:
    names = valid_metrics(["a", "b"])
    assert names[0] == "val_loss" and "val/macro_f1" in names and "val/b/roc_auc" in names


def test_distributions_follow_wandb_and_the_field_type() -> None:
    s = space(lr={"min": -9.2, "max": -4.6, "distribution": "log_uniform"},
              weight_decay={"min": 0.01, "max": 0.1, "log": True},
              batch_size={"min": 16, "max": 64, "q": 16, "distribution": "q_uniform"},
              image_size={"min": 32, "max": 64},
              drop_rate={"min": 0, "max": 0.5, "distribution": "q_uniform", "q": 0.1},
              optimizer=["adamw", "sgd"], crop_scale={"values": [[0.8, 1.0], None]}, epochs={"value": 3})
    p = {x.name: x for x in s.parameters}
    assert p["lr"].log and math.isclose(p["lr"].low, math.exp(-9.2)) and math.isclose(p["lr"].high, math.exp(-4.6))
    assert p["weight_decay"].log and p["weight_decay"].kind == "float"
    assert (p["batch_size"].kind, p["batch_size"].grid_values()) == ("int", [16, 32, 48, 64])
    assert p["image_size"].kind == "int" and p["image_size"].grid_values() is not None
    assert p["drop_rate"].grid_values() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert p["crop_scale"].decode(p["crop_scale"].encode([0.8, 1.0])) == [0.8, 1.0]
    assert s.constants == {"epochs": 3} and "epochs" not in p
    seed_names = space(learning_rate={"min": 0.001, "max": 0.1}, num_epochs=[1, 2])  # W&B scripts' names
    assert [x.name for x in seed_names.parameters] == ["lr", "epochs"]


@pytest.mark.parametrize(("data", "message"), [
    ({"method": "hyperopt"}, r"method = 'hyperopt' is invalid; valid: grid, random, bayes"),
    ({"metric": {"name": "val_loss", "goal": "maximize"}},
     r"'val_loss' with goal 'maximize' is contradictory.*valid: goal minimize"),
    ({"metric": {"name": "val/macro_f1", "goal": "up"}}, r"goal = 'up' is invalid; valid: minimize, maximize"),
    ({"metric": None}, r"metric must be a mapping with name"),
    ({"parameters": {"batchsize": [16]}},
     r"'batchsize' is not a training setting \(did you mean 'batch_size'\?\); valid: accelerator"),
    ({"parameters": {"learning_rate": [0.1, 0.2], "lr": [0.1, 0.3]}}, r"parameters name a setting twice"),
    ({"parameters": {"monitor": ["val_loss"]}}, r"'monitor' cannot be swept: the sweep's metric sets it"),
    ({"parameters": {"lr": {"min": 0, "max": 0.1, "log": True}}}, r"a log scale needs min > 0; got min = 0"),
    ({"parameters": {"lr": {"min": 0.1, "max": 0.01}}}, r"min 0.1 is above max 0.01; valid: min <= max"),
    ({"parameters": {"lr": {"min": 0.1, "max": 1, "distribution": "normal"}}},
     r"distribution = 'normal' is not supported; valid: constant, categorical"),
    ({"parameters": {"optimizer": ["adam", "sgd"]}},
     r"value 'adam' is invalid: optimizer = 'adam' is invalid; valid: adamw, sgd"),
    ({"parameters": {"lr": {"values": []}}}, r"values must be a non-empty list"),
    ({"parameters": {"lr": {"value": 0.1}}}, r"nothing to search"),
    ({"parameters": {"optimizer": {"min": 1, "max": 2}}}, r"optimizer is a str setting, which takes values"),
    ({"parameters": {"lr": [0.1]}, "early_terminate": {"type": "envelope"}}, r"early_terminate = .* is invalid"),
    ({"parameters": {"lr": [0.1, 0.2]}, "pruner": {"type": "median", "patience": 2}},
     r"pruner median has unknown option\(s\) \['patience'\]; valid: startup_trials, warmup_epochs"),
    ({"parameters": {"lr": [0.1, 0.2]}, "agent": 1}, r"unknown key\(s\) \['agent'\]"),
])
def test_invalid_files_say_what_is_valid(data: dict[str, Any], message: str) -> None:
    full = {"method": "random", "metric": {"name": "val/macro_f1"}, "parameters": {"lr": [0.1, 0.2]}, **data}
    with pytest.raises(SweepError, match=message):
        SweepSpace.from_dict(full)


def test_missing_file_and_trial_count_errors(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"sweep file '.*nope.yaml' does not exist"):
        SweepSpace.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(SweepError, match=r"number of trials is not set for a random search; valid: --n-trials N"):
        resolve_n_trials(space(lr=[0.1, 0.2]), None)
    s = SweepSpace.from_dict({"method": "bayes", "metric": "val_loss", "parameters": {"lr": [0.1, 0.2]},
                              "run_cap": 7})
    assert s.goal == "minimize" and resolve_n_trials(s, None) == 7
