"""Z stacks on the command line: refused without --z, projected with it, the choice kept by the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from cellclass.data.axes import AxesPolicy
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.predictor import Predictor

pytestmark = pytest.mark.slow  # every test runs the cellclass console script in a new process


def write_hyperstacks(folder: Path, n: int, seed: int) -> Path:
    """ImageJ Z x C hyperstacks (5 x 2 x 16 x 16 uint16); class b has one bright slice in channel 1."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = "ab"[i % 2]
        stack = rng.integers(100, 200, (5, 2, 16, 16)).astype(np.uint16)
        if label == "b":
            stack[rng.integers(5), 1, 4:12, 4:12] += 3000
        tifffile.imwrite(folder / f"cell{i:02d}.tif", stack, imagej=True, metadata={"axes": "ZCYX"})
        rows.append({"image": f"cell{i:02d}.tif", "label": label})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hyperstacks(tmp_path_factory.mktemp("stacks"), 24, seed=0)


@pytest.fixture(scope="module")
def stack_run(stacks: Path, tmp_path_factory: pytest.TempPathFactory, cli) -> Path:
    run_cli = cli
    run = tmp_path_factory.mktemp("runs") / "mlp"
    result = run_cli("train", stacks, "--image-col", "image", "--task", "label", "--model", "mlp",
                     "--image-size", "16", "--z", "max", "--out", run)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_validate_refuses_z_stacks_and_passes_with_z_max(cli, stacks: Path) -> None:
    refused = cli("validate", stacks, "--image-col", "image", "--task", "label")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    text = " ".join(refused.stdout.split())
    assert "24 problem(s) in 24 of 24 rows" in text
    assert "holds a Z stack (Z=5): ImageJ axes ZCYX (Z=5, C=2, Y=16, X=16)" in text
    assert "--z max|mean|sum|min|middle|N" in text
    passed = cli("validate", stacks, "--image-col", "image", "--task", "label", "--z", "max")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "no problem found" in passed.stdout
    assert "(2, 16, 16) x24" in passed.stdout


def test_train_refuses_z_stacks_in_one_message(cli, stacks: Path, tmp_path: Path) -> None:
    result = cli("train", stacks, "--image-col", "image", "--task", "label", "--model", "mlp",
                 "--image-size", "16", "--out", tmp_path / "run")
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    assert text.count("error:") == 1 and "Traceback" not in result.stderr
    assert "row 1:" in text and "cell00.tif' holds a Z stack (Z=5)" in text and "--z max|mean" in text


def test_bad_z_value_is_a_one_line_error(cli, stacks: Path) -> None:
    result = cli("validate", stacks, "--image-col", "image", "--task", "label", "--z", "top")
    assert result.returncode == 2
    assert "--z 'top' is invalid; valid: max, mean, sum, min, middle or a 0-based" in " ".join(result.stderr.split())


def test_run_and_checkpoint_record_the_projection(stack_run: Path, stacks: Path) -> None:
    config = yaml.safe_load((stack_run / "config.yaml").read_text())
    assert config["dataset"]["image"]["z"] == "max"
    assert Checkpoint.load(stack_run).spec["image"]["z"] == "max"
    predictor = Predictor.from_checkpoint(stack_run)
    assert predictor.axes == AxesPolicy(z="max")
    stack = tifffile.imread(stacks.parent / "cell01.tif")
    np.testing.assert_array_equal(predictor.read_image(stacks.parent / "cell01.tif"), stack.max(axis=0))


def test_predict_and_evaluate_apply_the_runs_projection(cli, stack_run: Path, tmp_path: Path) -> None:
    new = write_hyperstacks(tmp_path / "new", 6, seed=1)
    out = tmp_path / "pred.csv"
    predicted = cli("predict", stack_run, *sorted(new.parent.glob("*.tif")), "--out", out)
    assert predicted.returncode == 0, predicted.stderr
    assert len(pd.read_csv(out)) == 6
    # the new dataset declares no --z: the run's choice applies
    evaluated = cli("evaluate", stack_run, "--data", new, "--image-col", "image", "--task", "label",
                    "--out", tmp_path / "ev")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["evaluation"]["n_images"] == 6
