"""The command line, run as users run it: one real `cellclass` process per command."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # every test runs the cellclass console script in a new process


def test_help_and_version(cli) -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("simulate", "validate", "inspect", "train", "evaluate", "cv", "compare", "predict", "demo"):
        assert command in result.stdout
    assert cli("--version").stdout.startswith("cellclass ")


def test_validate_lists_all_four_faults_and_exits_1(cli, corrupt_bps: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    data, rows = corrupt_bps
    clean = tmp_path / "clean.csv"
    report = tmp_path / "problems.csv"
    result = cli("validate", data, "--preset", "bps", "--write-clean", clean, "--report", report)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "problem(s) in 4 of 68 rows" in result.stdout
    problems = pd.read_csv(report)
    assert set(problems["row"]) == set(rows.values())
    reasons = problems.groupby("row")["reason"].agg(" | ".join).to_dict()
    assert "truncated" in reasons[rows["truncated"]]
    assert "missing file" in reasons[rows["missing"]]
    assert "'Xray'" in reasons[rows["typo"]]
    assert "3 channel(s)" in reasons[rows["channels"]]
    assert len(pd.read_csv(clean)) == len(pd.read_csv(data / "meta.csv")) - 4


def test_validate_clean_set_exits_0(cli, bps_dir: Path) -> None:
    result = cli("validate", bps_dir, "--preset", "bps")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no problem found" in result.stdout


def test_bad_spec_is_a_one_line_error_exit_2(cli, tmp_path: Path) -> None:
    result = cli("validate", tmp_path, "--preset", "nope")
    assert result.returncode == 2
    assert "error: unknown preset 'nope'; valid: bps, hpa, rxrx1, folder, csv" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.shared_data
def test_inspect_real_bps_metadata_flags_plate_confound(cli, shared_data: Path, tmp_path: Path) -> None:
    result = cli("inspect", shared_data / "bps_metadata", "--preset", "bps", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "metadata-only inspection" in text
    for task in ("particle_type", "dose", "hours"):
        assert f"{task} is fully determined by plate" in text
    assert "The 2 sham groups (dose_Gy = 0) of particle_type differ only by plate" in text
    assert (tmp_path / "confounds.csv").is_file()


@pytest.mark.shared_data
def test_inspect_mitocheck_reports_sixteen_classes(cli, shared_data: Path) -> None:
    manifest = shared_data / "mitocheck_h2b_phenotypes" / "labels.csv"
    result = cli("inspect", manifest, "--image-col", "filename", "--task", "phenotype", "--group", "plate",
                     "--max-images", "200")
    assert result.returncode == 0, result.stderr
    assert "task phenotype: 16 classes" in result.stdout
    assert "Polylobed" in result.stdout and "473" in result.stdout


def test_simulate_train_predict_evaluate_compare(cli, tmp_path: Path) -> None:
    data = tmp_path / "bps"
    assert cli("simulate", "bps", data, "--n-images", "68").returncode == 0
    common = ["--preset", "bps", "--task", "particle_type", "--image-size", "32", "--set", "tta=false"]
    lenet = cli("train", data, *common, "--model", "lenet5", "--epochs", "2", "--out", tmp_path / "lenet")
    assert lenet.returncode == 0, lenet.stderr
    assert "split group by plate" in " ".join(lenet.stdout.split())
    assert "epoch 2/2" in lenet.stderr
    mlp = cli("train", data, *common, "--model", "mlp", "--out", tmp_path / "mlp")
    assert mlp.returncode == 0, mlp.stderr
    images = sorted(data.glob("*.tif"))[:3]
    out_csv = tmp_path / "pred.csv"
    pred = cli("predict", tmp_path / "lenet", *images, "--out", out_csv)
    assert pred.returncode == 0, pred.stderr
    frame = pd.read_csv(out_csv)
    assert len(frame) == 3 and set(frame["particle_type"]) <= {"Fe", "X-ray"}
    ev = cli("evaluate", tmp_path / "lenet")
    assert ev.returncode == 0, ev.stderr
    original = json.loads((tmp_path / "lenet" / "metrics.json").read_text())["tasks"]["particle_type"]
    again = json.loads((tmp_path / "lenet" / "evaluation" / "metrics.json").read_text())["tasks"]["particle_type"]
    assert again["accuracy"] == pytest.approx(original["accuracy"])
    cmp = cli("compare", tmp_path / "lenet", tmp_path / "mlp", "--n-boot", "200", "--out", tmp_path / "cmp")
    assert cmp.returncode == 0, cmp.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    pair = result["tasks"]["particle_type"]["pairs"][0]
    assert pair["ci_low"] <= pair["delta"] <= pair["ci_high"]
    assert "McNemar" in cmp.stdout
