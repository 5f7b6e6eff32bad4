"""Re-evaluating a run folder: its own saved test split, described in metrics.json, and a
clear refusal when the folder does not say what its test split was."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cellclass.data.cache import iter_images
from cellclass.data.normalize import Normalizer
from cellclass.data.prepared import prepare_data, write_split
from cellclass.data.presets import bps
from cellclass.errors import CellclassError
from cellclass.evaluation.evaluate import evaluate_run
from cellclass.inference.checkpoint import Checkpoint
from cellclass.models import create_model
from cellclass.training.config import TrainConfig

CONFIG = TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, workers=2, tta=False)


@pytest.fixture
def run(bps_dir: Path, tmp_path: Path) -> Path:
    """A run folder as training leaves it (config.yaml, split.json, best.ckpt), with untrained weights."""
    spec = bps(bps_dir).select_tasks(CONFIG.tasks)
    data = prepare_data(spec, CONFIG)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"train": CONFIG.to_dict(),
                                                     "dataset": {**spec.to_dict(), "base_dir": str(spec.base_dir)}}))
    write_split(out / "split.json", data)
    norm = Normalizer().fit(iter_images(data.images, data.split.train))
    torch.manual_seed(0)
    model = create_model("lenet5", in_chans=1, heads={"particle_type": 2}, image_size=32,
                         task_types={"particle_type": "single"})
    Checkpoint(kind="network", model_config=model.config, encoders=data.encoders, normalizer=norm, image_size=32,
               config=CONFIG.to_dict(), spec=spec.to_dict(), state_dict=model.state_dict(), epoch=1,
               run=str(out)).save(out / "checkpoints" / "best.ckpt")
    return out


def test_a_run_is_evaluated_on_its_saved_test_split(run: Path) -> None:
    result = evaluate_run(run, CONFIG)
    test_ids = json.loads((run / "split.json").read_text())["ids"]["test"]
    assert result["evaluation"] == {"on": "test", "n_images": len(test_ids),
                                    "checkpoint": str(run / "checkpoints" / "best.ckpt"), "tta": "none",
                                    "thresholds": "argmax (single-label tasks)"}
    assert result["model"] == "lenet5" and result["split"]["group_column"] == "plate"
    assert json.loads((run / "evaluation" / "metrics.json").read_text()) == json.loads(json.dumps(result))
    predictions = pd.read_csv(run / "evaluation" / "predictions.csv")
    assert predictions["image"].tolist() == test_ids and set(predictions["split"]) == {"test"}
    assert (run / "evaluation" / "report.html").is_file()


def test_a_run_folder_without_its_split_is_refused(run: Path) -> None:
    (run / "split.json").unlink()
    with pytest.raises(CellclassError, match="has no split.json, so its test split is unknown; valid: a run folder "
                                             "made by `cellclass train`, or --data SPEC"):
        evaluate_run(run, CONFIG)
