"""`cellclass cv --holdout --ensemble`, then `predict` and `evaluate` with the cv folder, run as users run them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cellclass.data.presets import bps
from cellclass.training.config import TrainConfig

pytestmark = pytest.mark.slow  # every test trains networks or runs the console script

FOLDS = [f"fold_{k}" for k in range(3)]
COLUMNS = ["particle_type__p__Fe", "particle_type__p__X-ray"]


@pytest.fixture(scope="module")
def cv(cli, bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A 3-fold cv of LeNet-5 on the simulated BPS set, with a held-out test and the ensemble."""
    root = tmp_path_factory.mktemp("ensemble")
    data = root / "bps"
    shutil.copytree(bps_dir, data)
    out = root / "cv"
    result = cli("cv", data, "--preset", "bps", "--task", "particle_type", "--model", "lenet5", "--epochs", "2",
                 "--image-size", "32", "--set", "tta=false", "--folds", "3", "--holdout", "--ensemble",
                 "--tracker", "none", "--out", out)
    assert result.returncode == 0, result.stderr
    return {"data": data, "out": out, "result": result}


def test_cv_writes_the_ensemble_and_scores_it_on_the_held_out_test_only(cv: dict[str, object]) -> None:
    out = cv["out"]
    assert yaml.safe_load((out / "ensemble.yaml").read_text())["members"] == FOLDS
    summary = json.loads((out / "cv.json").read_text())
    assert summary["ensemble"]["test"] == "ensemble_test" and "note" not in summary["ensemble"]
    held = summary["holdout"]
    assert set(held["models"]) == {*FOLDS, "ensemble"}
    # the held-out images are in no fold's training, validation or test side
    frame = pd.read_csv(out / "ensemble_test" / "predictions.csv")
    assert len(frame) == held["n_images"] > 0 and set(frame["split"]) == {"test"}
    for fold in FOLDS:
        ids = json.loads((out / fold / "split.json").read_text())["ids"]
        assert not set(frame["image"]) & {i for side in ("train", "val", "test") for i in ids[side]}
    metrics = json.loads((out / "ensemble_test" / "metrics.json").read_text())
    assert metrics["tasks"]["particle_type"]["accuracy"] == pytest.approx(
        held["models"]["ensemble"]["particle_type"]["accuracy"], abs=1e-6)
    assert metrics["evaluation"]["on"] == "test (held out from every fold)"
    table = pd.read_csv(out / "holdout.csv")
    assert set(table["model"]) == {*FOLDS, "ensemble"}
    accuracy = table[table["metric"] == "accuracy"].set_index("model")["value"]
    assert accuracy[FOLDS].mean() == pytest.approx(held["fold_mean"]["particle_type"]["accuracy"], abs=1e-6)
    text = " ".join(cv["result"].stdout.split())
    assert "task particle_type on the held-out test" in text and "mean of folds" in text
    assert f"ensemble of the 3 fold models (probabilities averaged) in {out / 'ensemble.yaml'}" in text


def test_predict_with_the_cv_folder_averages_the_fold_models(cli, cv: dict[str, object], tmp_path: Path) -> None:
    images = sorted(cv["data"].glob("*.tif"))[:5]
    result = cli("predict", cv["out"], *images, "--out", tmp_path / "ensemble.csv")
    assert result.returncode == 0, result.stderr
    assert "5 prediction(s) by an ensemble of 3 models (probabilities averaged)" in " ".join(result.stdout.split())
    ensemble = pd.read_csv(tmp_path / "ensemble.csv")
    members = []
    for fold in FOLDS:
        assert cli("predict", cv["out"] / fold, *images, "--out", tmp_path / f"{fold}.csv").returncode == 0
        members.append(pd.read_csv(tmp_path / f"{fold}.csv"))
    assert "particle_type__agreement" not in members[0].columns
    mean = np.mean([m[COLUMNS].to_numpy() for m in members], axis=0)
    np.testing.assert_allclose(ensemble[COLUMNS].to_numpy(), mean, atol=2e-6)
    assert list(ensemble["particle_type"]) == [["Fe", "X-ray"][i] for i in mean.argmax(axis=1)]
    votes = np.mean([m["particle_type"] == ensemble["particle_type"] for m in members], axis=0)
    np.testing.assert_allclose(ensemble["particle_type__agreement"], votes, atol=1e-3)
    # --member: the same three runs given one by one
    again = cli("predict", cv["out"] / "fold_0", *images, "--member", cv["out"] / "fold_1", "--member",
                cv["out"] / "fold_2", "--out", tmp_path / "members.csv")
    assert again.returncode == 0, again.stderr
    np.testing.assert_allclose(pd.read_csv(tmp_path / "members.csv")[COLUMNS], ensemble[COLUMNS], atol=1e-6)


def test_predict_and_evaluate_agree_with_the_held_out_results(cli, cv: dict[str, object], tmp_path: Path) -> None:
    held = pd.read_csv(cv["out"] / "ensemble_test" / "predictions.csv")
    result = cli("predict", cv["out"], "--data", cv["data"], "--preset", "bps", "--out", tmp_path / "all.csv")
    assert result.returncode == 0, result.stderr
    every = pd.read_csv(tmp_path / "all.csv").set_index("image").loc[held["image"]]
    np.testing.assert_allclose(every[COLUMNS].to_numpy(), held[COLUMNS].to_numpy(), atol=2e-6)
    evaluated = cli("evaluate", cv["out"], "--data", cv["data"], "--preset", "bps", "--out", tmp_path / "ev")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["evaluation"]["n_images"] == 68 and metrics["model"] == "ensemble of 3 (lenet5)"
    scored = pd.read_csv(tmp_path / "ev" / "predictions.csv").set_index("image").loc[held["image"]]
    np.testing.assert_allclose(scored[COLUMNS].to_numpy(), held[COLUMNS].to_numpy(), atol=2e-6)


def test_an_ensemble_without_its_data_or_with_other_tasks_is_one_error_line(cli, cv: dict[str, object],
                                                                            untrained_run, tmp_path: Path) -> None:
    refused = cli("evaluate", cv["out"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "is an ensemble, which has no test split of its own" in refused.stderr
    dose = untrained_run(bps(cv["data"]), TrainConfig(model="lenet5", tasks=["dose"], image_size=32, tta=False),
                         tmp_path / "dose")
    image = sorted(cv["data"].glob("*.tif"))[0]
    result = cli("predict", cv["out"], image, "--member", dose, "--out", tmp_path / "p.csv")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: ensemble member '{dose}' has tasks dose; the first member '{cv['out'] / 'fold_0'}' has "
        "particle_type; valid: models of the same tasks and classes"]
    assert not (tmp_path / "p.csv").exists()
