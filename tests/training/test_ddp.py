"""Two-process CPU DDP (gloo) through the CLI gives the same metrics as one process
training in the same precision."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellclass.data.simulate import simulate_bps


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(cli, tmp_path: Path) -> None:
    data = tmp_path / "bps"
    simulate_bps(data, n_images=272, seed=1)
    common = ["train", data, "--preset", "bps", "--task", "particle_type", "--where", "dose_Gy > 0",
              "--model", "lenet5", "--epochs", "4", "--image-size", "32", "--batch-size", "32",
              "--set", "tta=false", "--set", "augment=false"]
    ddp = cli(*common, "--devices", "2", "--strategy", "ddp", "--out", tmp_path / "two")
    assert ddp.returncode == 0, ddp.stderr
    assert "[rank: 1]" in ddp.stderr  # a second process really ran
    # precision auto (12 steps: timed, or cached by an earlier run): the main process chose for both
    steps = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["runtime"]["steps"]
    assert steps["precision_from"] in ("auto: timed", "auto: cached")
    # The single process trains in the same precision and memory format, for the same numerics.
    single = cli(*common, "--precision", steps["precision"],
                 "--set", f"channels_last={str(steps['memory_format'] == 'channels_last').lower()}",
                 "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    one = pd.read_csv(tmp_path / "one" / "metrics.csv")
    two = pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert one["epoch"].tolist() == two["epoch"].tolist() == [1, 2, 3, 4]
    # Without augmentation the two ranks' batches together are exactly the single process's
    # batch and gradients are averaged, so the runs agree up to floating-point summation order.
    assert abs(one["val_loss"].iloc[-1] - two["val_loss"].iloc[-1]) < 1e-3
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["tasks"]["particle_type"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["tasks"]["particle_type"]
    assert abs(m1["roc_auc"] - m2["roc_auc"]) < 0.01
    assert abs(m1["accuracy"] - m2["accuracy"]) < 0.02
