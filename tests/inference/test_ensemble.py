"""Ensembles: the mean of the members' probabilities, each member reading images its own way,
thresholds from ensemble.yaml or the members', and clear errors for members that do not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellclass.data.labels import TaskEncoder
from cellclass.data.presets import bps, hpa
from cellclass.errors import EnsembleError
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.ensemble import (
    ENSEMBLE_FILE,
    Ensemble,
    ensemble_runs,
    is_ensemble_folder,
    read_ensemble_file,
    write_ensemble_file,
)
from cellclass.inference.predictor import Predictor
from cellclass.training.config import TrainConfig

CONFIG = TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, tta=False)


def _probabilities(predictor: Predictor, files: list[Path], task: str) -> np.ndarray:
    """The predictor's probabilities of ``files`` on its own path (read, prepare, normalize, predict)."""
    classes = predictor.encoders[task].classes
    results = predictor.predict_images([predictor.read_image(f) for f in files])
    return np.array([[r[task]["probabilities"][c] for c in classes] for r in results])


def _predict(ensemble: Ensemble, files: list[Path]) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    prepared = [ensemble.prepare(lambda member, f=f: member.read_image(f), f"image {f.name!r}") for f in files]
    return ensemble.predict_prepared(prepared)


def test_the_ensemble_is_the_mean_of_members_that_read_images_their_own_way(untrained_run, bps_dir: Path,
                                                                             tmp_path: Path) -> None:
    small = TrainConfig(**{**CONFIG.to_dict(), "image_size": 24, "fit": "resize"})
    runs = [untrained_run(bps(bps_dir), CONFIG, tmp_path / "a", seed=0),
            untrained_run(bps(bps_dir), small, tmp_path / "b", seed=1)]
    files = sorted(bps_dir.glob("*.tif"))[:6]
    ensemble = Ensemble.load(runs)
    prepared = ensemble.prepare(lambda member: member.read_image(files[0]), "first")
    assert [p.shape[-1] for p in prepared] == [32, 24]  # each member fitted the image to its own input
    mean, each = _predict(ensemble, files)
    alone = [_probabilities(Predictor.from_checkpoint(r), files, "particle_type") for r in runs]
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    np.testing.assert_allclose(each[0]["particle_type"], alone[0], atol=1e-6)
    np.testing.assert_allclose(mean["particle_type"], (alone[0] + alone[1]) / 2, atol=1e-6)
    labels = ensemble.decide(mean)["particle_type"]
    assert labels == [["Fe", "X-ray"][i] for i in mean["particle_type"].argmax(axis=1)]
    agreement = ensemble.agreement(each, mean)["particle_type"]
    assert set(np.round(agreement, 6)) <= {0.5, 1.0} and agreement.shape == (6,)
    assert ensemble.identity["model"] == "ensemble of 2 (lenet5)"


def test_one_member_is_the_run_itself(untrained_run, bps_dir: Path, tmp_path: Path) -> None:
    run = untrained_run(bps(bps_dir), CONFIG, tmp_path / "a")
    files = sorted(bps_dir.glob("*.tif"))[:3]
    mean, _ = _predict(Ensemble.load([run]), files)
    np.testing.assert_array_equal(mean["particle_type"],
                                  _probabilities(Predictor.from_checkpoint(run), files, "particle_type"))


def test_members_of_other_tasks_or_classes_are_named(untrained_run, bps_dir: Path, tmp_path: Path) -> None:
    a = untrained_run(bps(bps_dir), CONFIG, tmp_path / "a")
    dose = untrained_run(bps(bps_dir), TrainConfig(**{**CONFIG.to_dict(), "tasks": ["dose"]}), tmp_path / "dose")
    with pytest.raises(EnsembleError, match=rf"ensemble member '{dose}' has tasks dose; the first member '{a}' has "
                                            r"particle_type; valid: models of the same tasks and classes"):
        Ensemble.load([a, dose])
    other = untrained_run(bps(bps_dir), CONFIG, tmp_path / "other")
    best = other / "checkpoints" / "best.ckpt"
    Checkpoint.load(best).replace(encoders={"particle_type": TaskEncoder("particle_type", "single",
                                                                         ["Fe", "Proton"])}).save(best)
    with pytest.raises(EnsembleError, match=r"has task 'particle_type' of type single with classes Fe, Proton; the "
                                            r"first member .* has type single with classes Fe, X-ray"):
        Ensemble.load([a, other])


def test_multilabel_members_thresholds_are_averaged(untrained_run, hpa_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(model="lenet5", image_size=32, tta=False)
    runs = [untrained_run(hpa(hpa_dir), config, tmp_path / name, thresholds={"localization": [value] * 28},
                          seed=seed) for name, value, seed in (("a", 0.2, 0), ("b", 0.4, 1))]
    ensemble = Ensemble.load(runs)
    np.testing.assert_allclose(ensemble.thresholds["localization"], [0.3] * 28)
    assert ensemble.thresholds_from.startswith("mean of the members' thresholds")
    probs = {"localization": np.full((2, 28), 0.35)}
    assert ensemble.decide(probs)["localization"][0] == list(ensemble.encoders["localization"].classes)


def test_ensemble_yaml_names_members_and_brings_its_thresholds(untrained_run, hpa_dir: Path, tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    config = TrainConfig(model="lenet5", image_size=32, tta=False)
    runs = [untrained_run(hpa(hpa_dir), config, cv / f"fold_{k}", seed=k) for k in range(2)]
    assert is_ensemble_folder(cv) and not is_ensemble_folder(runs[0])
    assert ensemble_runs([cv]) == runs  # the fold runs, before ensemble.yaml exists
    write_ensemble_file(cv, runs, {"localization": [0.25] * 28}, "tuned on the pooled out-of-fold predictions")
    saved = read_ensemble_file(cv)
    assert saved["members"] == runs and saved["thresholds"] == {"localization": [0.25] * 28}
    ensemble = Ensemble.load([cv])
    assert ensemble.runs == runs and ensemble.thresholds == {"localization": [0.25] * 28}
    assert ensemble.thresholds_from == f"tuned on the pooled out-of-fold predictions ({ENSEMBLE_FILE})"
    # given with other runs, a cv folder stands for its members and its thresholds give way to the mean
    assert Ensemble.load([cv, runs[0]]).thresholds_from.startswith("mean of the members'")


@pytest.mark.parametrize(("text", "match"), [
    ("format: other/1\nmembers: [fold_0]\n", r"has format 'other/1'; valid: 'cellclass-ensemble/1'"),
    ("format: cellclass-ensemble/1\nmembers: []\n", r"members is \[\]; valid: a list of run folders"),
    ("format: cellclass-ensemble/1\nmembers: [fold_9]\n", r"member 'fold_9' is not a run folder"),
    ("format: cellclass-ensemble/1\nmembers: [fold_0]\ncombine: max\n", r"combine is 'max'; valid: mean"),
    ("format: cellclass-ensemble/1\nmembers: [fold_0]\nthresholds: {t: x}\n", r"thresholds is \{'t': 'x'\}"),
    ("members: [unclosed\n", r"ensemble file '.*ensemble.yaml' is not valid YAML at line 2, column 1"),
    (b"format: \xff\n", r"ensemble file '.*' is not UTF-8 text: line 1, column 9"),
])
def test_a_bad_ensemble_yaml_is_a_clear_error(text: str | bytes, match: str, untrained_run, bps_dir: Path,
                                             tmp_path: Path) -> None:
    untrained_run(bps(bps_dir), CONFIG, tmp_path / "cv" / "fold_0")
    (tmp_path / "cv" / ENSEMBLE_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(EnsembleError, match=match):
        Ensemble.load([tmp_path / "cv"])


def test_thresholds_that_do_not_fit_the_members_are_refused(untrained_run, bps_dir: Path, tmp_path: Path) -> None:
    run = untrained_run(bps(bps_dir), CONFIG, tmp_path / "cv" / "fold_0")
    write_ensemble_file(tmp_path / "cv", [run], {"particle_type": [0.5, 0.5]}, None)
    with pytest.raises(EnsembleError, match=r"thresholds of task 'particle_type' \(2 value\(s\)\) do not fit the "
                                            r"members; valid: one per class of a multi-label task"):
        Ensemble.load([tmp_path / "cv"])
