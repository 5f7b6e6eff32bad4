"""The training loop end to end on small simulated data: run folder, checkpoints enough
to serve, resume after an interruption, baselines, multi-task and multi-label runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cellclass.data.presets import bps, hpa
from cellclass.errors import TrainingError
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.predictor import Predictor
from cellclass.training.config import ConfigError, TrainConfig, parse_set_options
from cellclass.training.loop import _network_kwargs, monitor_names, train

FAST = {"image_size": 32, "epochs": 2, "batch_size": 16, "workers": 2, "tta": False}


def test_lenet_run_folder_is_complete_and_honest(bps_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(model="lenet5", tasks=["particle_type"], **FAST)
    result = train(bps(bps_dir), cfg, out)
    for name in ("config.yaml", "encoders.json", "split.json", "metrics.csv", "metrics.json",
                 "predictions.csv", "report.html", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "plots/learning_curves.png", "plots/confusion_particle_type.png",
                 "mistakes_particle_type.csv", "plots/mistakes_particle_type.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["split"]["method"] == "group" and metrics["split"]["group_column"] == "plate"
    assert metrics["split"]["groups_overlap"] is False
    assert 0 <= metrics["tasks"]["particle_type"]["accuracy"] <= 1
    assert "macro_f1" in metrics["tasks"]["particle_type"]
    per_epoch = pd.read_csv(out / "metrics.csv")
    assert per_epoch["epoch"].tolist() == [1, 2]
    assert {"train_loss", "val_loss", "val/macro_f1", "val/particle_type/macro_f1"} <= set(per_epoch.columns)
    assert set(monitor_names({"particle_type": "single"})) <= set(per_epoch.columns)  # each one a monitor may name
    split = json.loads((out / "split.json").read_text())
    test_ids = set(split["ids"]["test"])
    assert set(pd.read_csv(out / "predictions.csv")["image"]) == test_ids
    plates = lambda ids: {i.split("_")[0] for i in ids}  # noqa: E731
    assert not plates(split["ids"]["train"]) & plates(test_ids)


@pytest.mark.slow
def test_checkpoint_is_enough_to_serve(bps_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(bps(bps_dir), TrainConfig(model="lenet5", tasks=["particle_type"], **FAST), out)
    ckpt = Checkpoint.load(out)
    assert ckpt.kind == "network" and ckpt.state_dict and ckpt.model_config["name"] == "lenet5"
    assert ckpt.config["model"] == "lenet5" and ckpt.image_size == 32
    assert ckpt.channels == ["53BP1"]
    assert ckpt.encoders["particle_type"].classes == ["Fe", "X-ray"]
    assert ckpt.normalizer.low_values_ is not None
    predictor = Predictor.from_checkpoint(out)
    frame = pd.read_csv(out / "predictions.csv")
    from cellclass.data.io import read_image

    images = [read_image(bps_dir / name) for name in frame["image"][:5]]
    results = predictor.predict_images(images)
    for result, (_, row) in zip(results, frame.head(5).iterrows(), strict=True):
        assert result["particle_type"]["label"] == row["particle_type__pred"]
        assert result["particle_type"]["probabilities"]["Fe"] == pytest.approx(row["particle_type__p__Fe"], abs=1e-4)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(bps_dir: Path, tmp_path: Path, interrupt_in_epoch_2,
                                                    same_epochs) -> None:
    cfg = TrainConfig(model="lenet5", tasks=["particle_type"], **{**FAST, "epochs": 3})
    straight = tmp_path / "straight"
    train(bps(bps_dir), cfg, straight)
    broken = tmp_path / "broken"
    interrupt_in_epoch_2(bps(bps_dir), cfg, broken)
    assert pd.read_csv(broken / "metrics.csv")["epoch"].tolist() == [1]
    assert not (broken / "metrics.json").exists()
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        train(bps(bps_dir), cfg, broken)
    train(bps(bps_dir), cfg, broken, resume=True)
    same_epochs(straight, broken)


def test_resume_without_checkpoint_is_an_error(bps_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(bps(bps_dir), TrainConfig(**FAST), tmp_path / "empty", resume=True)


@pytest.mark.slow
def test_baseline_and_multitask_network(bps_dir: Path, tmp_path: Path) -> None:
    spec = bps(bps_dir)
    result = train(spec, TrainConfig(model="logreg", tasks=["particle_type", "dose"], **FAST), tmp_path / "lr")
    assert set(result["tasks"]) == {"particle_type", "dose"}
    assert Checkpoint.load(tmp_path / "lr").kind == "baseline"
    net = train(spec, TrainConfig(model="lenet5", tasks=["particle_type", "dose"], **FAST), tmp_path / "net")
    assert set(net["tasks"]) == {"particle_type", "dose"}
    header = pd.read_csv(tmp_path / "net" / "metrics.csv").columns
    assert "val/dose/macro_f1" in header and "val/particle_type/macro_f1" in header


@pytest.mark.slow
def test_multilabel_run_tunes_thresholds(hpa_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="lenet5", split="random", **FAST)
    result = train(hpa(hpa_dir), cfg, tmp_path / "ml")
    task = result["tasks"]["localization"]
    # A multi-label task's test metrics always say the thresholds they used: here the ones tuned on validation.
    assert len(task["thresholds"]) == 28 and task["thresholds"] != [0.5] * 28
    assert "fixed_threshold_0.5" in task and "hamming_loss" in task
    assert Checkpoint.load(tmp_path / "ml").thresholds["localization"] == task["thresholds"]
    assert set(monitor_names({"localization": "multilabel"})) <= set(pd.read_csv(tmp_path / "ml" / "metrics.csv"))


def test_config_errors_and_set_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimizer = 'adam' is invalid; valid: adamw, sgd"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="--set 'lr' is invalid"):
        parse_set_options(["lr"])
    assert parse_set_options(["lr=1e-3", "tta=false", "crop_scale=[0.9, 1.0]"]) == {
        "lr": 1e-3, "tta": False, "crop_scale": [0.9, 1.0]}
    path = TrainConfig(epochs=3).to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(path).epochs == 3


def test_a_wrong_monitor_fails_before_anything_is_read(bps_dir: Path, hpa_dir: Path, tmp_path: Path) -> None:
    seen: list[str] = []
    cfg = TrainConfig(model="lenet5", tasks=["particle_type"], monitor="train_loss", **FAST)
    with pytest.raises(TrainingError, match=r"monitor 'train_loss' is not a validation metric of this run \(the "
                                            r"best epoch is chosen on validation data\); valid: val_loss, "
                                            r"val/accuracy, .*, val/particle_type/roc_auc$"):
        train(bps(bps_dir), cfg, tmp_path / "r", progress=lambda stage, done, total: seen.append(stage))
    assert seen == [] and not (tmp_path / "r").exists()  # no image read, no epoch, no run folder
    # Multi-label tasks record no accuracy: a monitor of one is refused as early.
    cfg = TrainConfig(model="lenet5", monitor="val/localization/accuracy", **FAST)
    with pytest.raises(TrainingError, match=r"valid: val_loss, val/macro_f1, val/micro_f1, val/map, "
                                            r"val/localization/macro_f1, val/localization/micro_f1, "
                                            r"val/localization/map$"):
        train(hpa(hpa_dir), cfg, tmp_path / "ml", progress=lambda stage, done, total: seen.append(stage))
    assert seen == [] and not (tmp_path / "ml").exists()


def test_network_settings_the_loop_passes_to_the_model() -> None:
    assert _network_kwargs(TrainConfig(model="resnet18")) == {"zero_init_last": False}  # the training default
    assert _network_kwargs(TrainConfig(model="resnet18", zero_init_last=True)) == {}  # timm's own
    chosen = TrainConfig(model="resnet18", stem_pool=False, head="mlp", drop_path_rate=0.1)
    assert _network_kwargs(chosen) == {"zero_init_last": False, "stem_pool": False, "head": "mlp",
                                       "drop_path_rate": 0.1}


def test_zero_init_last_is_not_passed_to_networks_without_residual_blocks() -> None:
    assert _network_kwargs(TrainConfig(model="lenet5")) == {}
