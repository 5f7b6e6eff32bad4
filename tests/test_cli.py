"""The command line, run as users run it: one real `cellclass` process per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


def run_cli(*args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the installed console script and capture its output."""
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    exe = Path(sys.executable).with_name("cellclass")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def test_help_and_version() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("simulate", "validate", "inspect", "train", "evaluate", "cv", "compare", "predict", "demo"):
        assert command in result.stdout
    assert run_cli("--version").stdout.startswith("cellclass ")


def test_validate_lists_all_four_faults_and_exits_1(corrupt_bps: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    data, rows = corrupt_bps
    clean = tmp_path / "clean.csv"
    report = tmp_path / "problems.csv"
    result = run_cli("validate", data, "--preset", "bps", "--write-clean", clean, "--report", report)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "4 problem(s) in 4 of" in result.stdout
    problems = pd.read_csv(report)
    assert sorted(problems["row"]) == sorted(rows.values())
    reasons = dict(zip(problems["row"], problems["reason"], strict=True))
    assert "truncated" in reasons[rows["truncated"]]
    assert "missing file" in reasons[rows["missing"]]
    assert "'Xray'" in reasons[rows["typo"]]
    assert "3 channel(s)" in reasons[rows["channels"]]
    assert len(pd.read_csv(clean)) == len(pd.read_csv(data / "meta.csv")) - 4


def test_validate_clean_set_exits_0(bps_dir: Path) -> None:
    result = run_cli("validate", bps_dir, "--preset", "bps")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no problem found" in result.stdout


def test_bad_spec_is_a_one_line_error_exit_2(tmp_path: Path) -> None:
    result = run_cli("validate", tmp_path, "--preset", "nope")
    assert result.returncode == 2
    assert "error: unknown preset 'nope'; valid: bps, hpa, rxrx1, folder, csv" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.shared_data
def test_inspect_real_bps_metadata_flags_plate_confound(shared_data: Path, tmp_path: Path) -> None:
    result = run_cli("inspect", shared_data / "bps_metadata", "--preset", "bps", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "metadata-only inspection" in text
    for task in ("particle_type", "dose", "hours"):
        assert f"{task} is fully determined by plate" in text
    assert "The 2 sham groups (dose_Gy = 0) of particle_type differ only by plate" in text
    assert (tmp_path / "confounds.csv").is_file()


@pytest.mark.shared_data
def test_inspect_mitocheck_reports_sixteen_classes(shared_data: Path) -> None:
    manifest = shared_data / "mitocheck_h2b_phenotypes" / "labels.csv"
    result = run_cli("inspect", manifest, "--image-col", "filename", "--task", "phenotype", "--group", "plate",
                     "--max-images", "200")
    assert result.returncode == 0, result.stderr
    assert "task phenotype: 16 classes" in result.stdout
    assert "Polylobed" in result.stdout and "473" in result.stdout


def test_simulate_train_predict_evaluate_compare(tmp_path: Path) -> None:
    data = tmp_path / "bps"
    assert run_cli("simulate", "bps", data, "--n-images", "68").returncode == 0
    common = ["--preset", "bps", "--task", "particle_type", "--image-size", "32", "--set", "tta=false"]
    lenet = run_cli("train", data, *common, "--model", "lenet5", "--epochs", "2", "--out", tmp_path / "lenet")
    assert lenet.returncode == 0, lenet.stderr
    assert "split group by plate" in " ".join(lenet.stdout.split())
    assert "epoch 2/2" in lenet.stderr
    mlp = run_cli("train", data, *common, "--model", "mlp", "--out", tmp_path / "mlp")
    assert mlp.returncode == 0, mlp.stderr
    images = sorted(data.glob("*.tif"))[:3]
    out_csv = tmp_path / "pred.csv"
    pred = run_cli("predict", tmp_path / "lenet", *images, "--out", out_csv)
    assert pred.returncode == 0, pred.stderr
    frame = pd.read_csv(out_csv)
    assert len(frame) == 3 and set(frame["particle_type"]) <= {"Fe", "X-ray"}
    ev = run_cli("evaluate", tmp_path / "lenet")
    assert ev.returncode == 0, ev.stderr
    original = json.loads((tmp_path / "lenet" / "metrics.json").read_text())["tasks"]["particle_type"]
    again = json.loads((tmp_path / "lenet" / "evaluation" / "metrics.json").read_text())["tasks"]["particle_type"]
    assert again["accuracy"] == pytest.approx(original["accuracy"])
    cmp = run_cli("compare", tmp_path / "lenet", tmp_path / "mlp", "--n-boot", "200", "--out", tmp_path / "cmp")
    assert cmp.returncode == 0, cmp.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    pair = result["tasks"]["particle_type"]["pairs"][0]
    assert pair["ci_low"] <= pair["delta"] <= pair["ci_high"]
    assert "McNemar" in cmp.stdout
