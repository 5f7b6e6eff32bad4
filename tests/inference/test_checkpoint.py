"""The typed checkpoint: a round trip keeps every field, the format of earlier versions
(an untyped dictionary) still loads, resumes and predicts, and every refusal says why."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.errors import CheckpointError
from cellclass.inference.checkpoint import FORMAT, LEGACY_FORMAT, Checkpoint, file_sha256, find_checkpoint
from cellclass.inference.predictor import Predictor
from cellclass.models import create_model

TASKS = {"particle": "single", "marks": "multilabel"}
ENCODERS = {"particle": TaskEncoder("particle", "single", ["Fe", "X-ray"]),
            "marks": TaskEncoder("marks", "multilabel", ["a", "b", "c"])}


def _images(n: int = 12, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4000, size=(n, 1, size, size)).astype(np.uint16)


def _normalizer() -> Normalizer:
    return Normalizer().fit(list(_images()), seed=0)


def _network() -> Any:
    torch.manual_seed(0)
    return create_model("lenet5", in_chans=1, heads={t: len(e.classes) for t, e in ENCODERS.items()},
                        image_size=16, task_types=TASKS).eval()


def _network_checkpoint(**changes: Any) -> Checkpoint:
    model = _network()
    fields: dict[str, Any] = dict(
        kind="network", model_config=model.config, encoders=dict(ENCODERS), normalizer=_normalizer(),
        image_size=16, fit="pad", channels=["DNA"], channel_indices=[], config={"model": "lenet5", "tta": False,
                                                                               "epochs": 3},
        spec={"name": "toy", "image": {"z": "max"}}, steps={"batch_size": 8, "schedule": "cosine"}, run="runs/toy",
        epoch=2, metrics={"val/macro_f1": 0.5}, thresholds={"marks": [0.3, 0.5, 0.7]},
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
    )
    return Checkpoint(**{**fields, **changes})


def _legacy_network_payload(checkpoint: Checkpoint, training_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """A network checkpoint as cellclass wrote it before the typed class (format 1)."""
    common = {
        "model_config": checkpoint.model_config,
        "encoders": {t: e.to_dict() for t, e in checkpoint.encoders.items()},
        "channels": checkpoint.channels,
        "channel_indices": checkpoint.channel_indices,
        "image_size": checkpoint.image_size,
        "fit": checkpoint.fit,
        "normalizer": checkpoint.normalizer.to_dict(),
        "config": checkpoint.config,
        "steps": checkpoint.steps,
        "spec": checkpoint.spec,
        "run": checkpoint.run,
    }
    payload = {**common, "kind": "network", "state_dict": checkpoint.state_dict, "epoch": checkpoint.epoch,
               "metrics": checkpoint.metrics}
    if training_state is not None:
        payload["training_state"] = training_state
    return {"format": LEGACY_FORMAT, **payload}


def test_a_network_checkpoint_round_trips(tmp_path: Path) -> None:
    saved = _network_checkpoint()
    path = saved.save(tmp_path / "checkpoints" / "best.ckpt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT == "cellclass-checkpoint/2" and "estimator" not in raw
    loaded = Checkpoint.load(tmp_path)  # a run folder resolves to checkpoints/best.ckpt
    assert loaded.path == path
    for name in ("kind", "model_config", "encoders", "image_size", "fit", "channels", "channel_indices", "config",
                 "spec", "steps", "run", "epoch", "metrics", "thresholds", "training_state"):
        assert getattr(loaded, name) == getattr(saved, name), name
    assert loaded.normalizer.to_dict() == saved.normalizer.to_dict()
    assert loaded.state_dict.keys() == saved.state_dict.keys()
    for key, value in saved.state_dict.items():
        assert torch.equal(loaded.state_dict[key], value), key
    # Saving what was loaded writes the same content again (thresholds are rewritten this way).
    loaded.replace(thresholds={"marks": [0.1, 0.2, 0.3]}).save(path)
    again = Checkpoint.load(path)
    assert again.thresholds == {"marks": [0.1, 0.2, 0.3]} and again.metrics == saved.metrics
    assert again.normalizer.to_dict() == saved.normalizer.to_dict()


def test_a_baseline_checkpoint_round_trips_its_fitted_estimator(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(20, 1, 16, 16)).astype(np.float32)
    y = {"particle": np.arange(20) % 2}
    model = create_model("logreg", in_chans=1, heads={"particle": 2}, image_size=16,
                         task_types={"particle": "single"}, pixels=8)
    model.fit(x, y)
    saved = Checkpoint(kind="baseline", model_config=model.config, encoders={"particle": ENCODERS["particle"]},
                       normalizer=_normalizer(), image_size=16, config={"model": "logreg"}, estimator=model, epoch=1)
    path = saved.save(tmp_path / "b.ckpt")
    assert isinstance(torch.load(path, weights_only=True)["estimator"], bytes)  # pickled, read only for baselines
    loaded = Checkpoint.load(path)
    assert loaded.kind == "baseline" and loaded.state_dict is None
    np.testing.assert_array_equal(loaded.estimator.predict_proba(x)["particle"], model.predict_proba(x)["particle"])


def test_a_format_1_network_checkpoint_loads_resumes_and_predicts(tmp_path: Path) -> None:
    reference = _network_checkpoint(thresholds={})
    old_state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 6},
                 "order_rng": torch.Generator().manual_seed(3).get_state(), "augment_rng": None,
                 "best_score": 0.5, "best_epoch": 2, "bad_epochs": 0}
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(_legacy_network_payload(reference, old_state), path)  # exactly as the untyped code saved it

    loaded = Checkpoint.load(tmp_path / "run", "last")
    assert loaded.kind == "network" and loaded.epoch == 2 and loaded.config == reference.config
    assert loaded.encoders == reference.encoders and loaded.thresholds == {}
    assert loaded.spec == reference.spec and loaded.steps == reference.steps and loaded.metrics == reference.metrics
    # The training state gains what format 2 records: the epoch it follows and the run's planned epochs.
    assert loaded.training_state["epoch"] == 2 and loaded.training_state["epochs"] == 3
    assert loaded.training_state["best_score"] == 0.5 and loaded.training_state["scheduler"] == {"last_epoch": 6}

    x = Predictor.from_checkpoint(reference).normalize(Predictor.from_checkpoint(reference).prepare(list(_images(4))))
    expected = Predictor.from_checkpoint(reference).predict_normalized(x)
    predicted = Predictor.from_checkpoint(path).predict_normalized(x)
    for task in TASKS:
        np.testing.assert_array_equal(predicted[task], expected[task])


def test_a_format_1_baseline_checkpoint_loads(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(16, 1, 16, 16)).astype(np.float32)
    model = create_model("logreg", in_chans=1, heads={"particle": 2}, image_size=16,
                         task_types={"particle": "single"}, pixels=8)
    model.fit(x, {"particle": np.arange(16) % 2})
    payload = {"format": LEGACY_FORMAT, "model_config": model.config,
               "encoders": {"particle": ENCODERS["particle"].to_dict()}, "channels": ["DNA"], "channel_indices": [],
               "image_size": 16, "fit": "pad", "normalizer": _normalizer().to_dict(), "config": {"model": "logreg"},
               "steps": None, "spec": {"name": "toy"}, "run": "r", "kind": "baseline",
               "estimator": pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL), "epoch": 1}
    torch.save(payload, tmp_path / "best.ckpt")
    loaded = Checkpoint.load(tmp_path / "best.ckpt")
    assert loaded.kind == "baseline" and loaded.epoch == 1 and loaded.training_state is None
    np.testing.assert_array_equal(loaded.estimator.predict_proba(x)["particle"], model.predict_proba(x)["particle"])


def test_the_oldest_format_1_checkpoints_without_optional_keys_load(tmp_path: Path) -> None:
    payload = _legacy_network_payload(_network_checkpoint())
    for key in ("fit", "channels", "channel_indices", "steps", "spec", "run", "metrics"):
        payload.pop(key)
    torch.save(payload, tmp_path / "old.ckpt")
    loaded = Checkpoint.load(tmp_path / "old.ckpt")
    assert (loaded.fit, loaded.channels, loaded.spec, loaded.thresholds) == ("pad", [], None, {})


def test_a_newer_format_is_refused_with_the_formats_this_version_reads(tmp_path: Path) -> None:
    payload = _network_checkpoint().to_payload()
    torch.save({**payload, "format": "cellclass-checkpoint/9"}, tmp_path / "new.ckpt")
    with pytest.raises(CheckpointError, match=r"is of format 'cellclass-checkpoint/9', which cellclass \S+ cannot "
                                              r"read; valid: cellclass-checkpoint/1, cellclass-checkpoint/2 "
                                              r"\(a newer cellclass wrote it"):
        Checkpoint.load(tmp_path / "new.ckpt")


def test_unusable_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at .*expected a .ckpt file or a run folder holding "
                                              "checkpoints/last.ckpt"):
        Checkpoint.load(tmp_path, "last")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint \(16 bytes, not a torch archive\)"):
        Checkpoint.load(tmp_path / "text.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")  # a bare torch file: not one of ours
    with pytest.raises(CheckpointError, match="is not a cellclass checkpoint"):
        Checkpoint.load(tmp_path / "bare.ckpt")
    payload = _network_checkpoint().to_payload()
    del payload["encoders"], payload["normalizer"]
    torch.save(payload, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="lacks encoders, normalizer"):
        Checkpoint.load(tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="checkpoint kind 'forest' is invalid; valid: network, baseline"):
        _network_checkpoint(kind="forest")


def test_find_checkpoint_and_file_sha256(tmp_path: Path) -> None:
    path = _network_checkpoint().save(tmp_path / "checkpoints" / "last.ckpt")
    assert find_checkpoint(tmp_path, "last") == path == find_checkpoint(path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
