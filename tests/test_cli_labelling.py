"""`cellclass embed` and `cellclass rank` on simulated BPS data, run as users run them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.presets import bps
from cellclass.data.simulate import simulate_bps
from cellclass.evaluation.ranking import STRATEGIES
from cellclass.evaluation.selection import Member, rank_run
from cellclass.inference.ensemble import ensemble_runs
from cellclass.training.config import TrainConfig, run_config
from cellclass.training.loop import train

pytestmark = pytest.mark.slow  # every test trains networks or runs the console script

CONFIG = TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, epochs=2)
COLUMNS = ["rank", "image", "score", "strategy", "pred_particle_type", "p_particle_type_Fe",
           "p_particle_type_X-ray", "id", "row", "plate", "well"]


@pytest.fixture(scope="module")
def runs(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LeNet-5 runs on the simulated BPS set (seeds 0 and 1) and a pool simulated apart (seed 1)."""
    root = tmp_path_factory.mktemp("labelling")
    data = root / "bps"
    shutil.copytree(bps_dir, data)
    out = {"data": data, "pool": root / "pool"}
    for name, seed in (("run", 0), ("run_b", 1)):
        out[name] = root / name
        train(bps(data), TrainConfig(**{**CONFIG.to_dict(), "seed": seed}), out[name])
    simulate_bps(out["pool"], n_images=40, seed=1)
    return out


def _test_plates(run: Path) -> set[str]:
    split = json.loads((run / "split.json").read_text())
    return {name.split("_")[0] for name in split["ids"]["test"]}


def test_embed_writes_features_map_profiles_and_the_probe(cli, runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "emb"
    result = cli("embed", runs["run"], runs["data"], "--preset", "bps", "--out", out, "--profile-by", "well")
    assert result.returncode == 0, result.stderr
    features = np.load(out / "features.npy")
    assert features.shape == (68, 84) and features.dtype == np.float32
    frame = pd.read_csv(out / "embeddings.csv", dtype=str, keep_default_na=False)
    assert list(frame.columns[:3]) == ["id", "row", "split"] and len(frame) == 68
    assert {"plate", "well", "label_particle_type", "pred_particle_type", "map_x", "map_y"} <= set(frame.columns)
    assert set(frame["split"]) == {"train", "val", "test"}
    assert set(frame["label_particle_type"]) == {"Fe", "X-ray"}
    for what in ("class", "prediction", "plate", "well"):
        assert (out / "plots" / f"map_by_{what}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "embed.json").read_text())
    assert summary["map"] == "umap" and summary["feature_dim"] == 84
    probe = summary["probe"]["particle_type"]
    assert 0 <= probe["knn_macro_f1"] <= 1 and 0 <= probe["logreg_macro_f1"] <= 1
    assert probe["n_test"] == int((frame["split"] == "test").sum())
    profiles = pd.read_csv(out / "profiles.csv")
    assert len(profiles) == frame["well"].nunique() and profiles["n_images"].sum() == 68
    assert "test macro F1" in result.stdout and "profile(s) by well (mean)" in result.stdout


def test_embed_of_another_dataset_has_no_probe(cli, runs: dict[str, Path], tmp_path: Path) -> None:
    result = cli("embed", runs["run"], runs["pool"], "--preset", "bps", "--out", tmp_path / "e", "--map", "pca",
                 "--tta")
    assert result.returncode == 0, result.stderr
    assert "not probed: the dataset is not the run's own" in " ".join(result.stdout.split())
    summary = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert summary["probe"] is None and summary["tta"] is True and summary["n_images"] == 40


def test_rank_leaves_out_the_test_plates_and_writes_the_interface(cli, runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rank.csv"
    result = cli("rank", runs["run"], runs["pool"], "--preset", "bps", "--budget", "6", "--out", out)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == COLUMNS
    assert frame["rank"].tolist() == [str(i) for i in range(1, 7)] and set(frame["strategy"]) == {"hybrid"}
    assert not set(frame["plate"]) & _test_plates(runs["run"])
    assert all((runs["pool"] / image).is_file() for image in frame["image"])
    p = frame[["p_particle_type_Fe", "p_particle_type_X-ray"]].astype(float).sum(axis=1)
    np.testing.assert_allclose(p, 1.0, atol=1e-5)
    pool = pd.read_csv(runs["pool"] / "meta.csv")
    n_test = int(pool["filename"].str.split("_").str[0].isin(_test_plates(runs["run"])).sum())
    text = " ".join(result.stdout.split())
    assert "6 of 40 pool image(s) ranked by hybrid" in text
    assert f"left out: {n_test} image(s) of the test, by the {len(_test_plates(runs['run']))} test plate value(s)" in text
    sidecar = json.loads((tmp_path / "rank.json").read_text())
    assert sidecar["image_root"] == str(runs["pool"].resolve()) and sidecar["left_out"]["test"] == n_test


def test_rank_by_an_ensemble_of_runs(cli, runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rank.csv"
    result = cli("rank", runs["run"], runs["pool"], "--preset", "bps", "--budget", "3", "--strategy", "ensemble-bald",
                 "--ensemble", runs["run"], "--ensemble", runs["run_b"], "--out", out)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out)
    assert len(frame) == 3 and (frame["score"] >= 0).all() and frame["score"].is_monotonic_decreasing


def test_rank_a_manifest_pool_without_labels(cli, runs: dict[str, Path], tmp_path: Path) -> None:
    manifest = runs["pool"] / "unlabelled.csv"
    pd.read_csv(runs["pool"] / "meta.csv")[["filename"]].to_csv(manifest, index=False)
    out = tmp_path / "rank.csv"
    result = cli("rank", runs["run"], manifest, "--image-col", "filename", "--budget", "4", "--strategy", "margin",
                 "--out", out)
    assert result.returncode == 0, result.stderr
    assert "the test images of run" in result.stdout and "the pool has no 'plate' column" in result.stdout
    assert len(pd.read_csv(out)) == 4


def test_rank_a_plain_folder_of_images(cli, runs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    names = sorted(p.name for p in runs["pool"].glob("*.tif"))
    for name in names[:6]:
        shutil.copy(runs["pool"] / name, folder / name)
    shutil.copy(runs["pool"] / names[6], folder / "sub" / names[6])
    out = tmp_path / "rank.csv"
    result = cli("rank", runs["run"], folder, "--budget", "20", "--strategy", "entropy", "--out", out, "--include-test")
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(frame["image"]) == sorted([*names[:6], f"sub/{names[6]}"])
    assert set(frame["plate"]) - {""} <= {n.split("_")[0] for n in names}  # derived from file names, as the run's
    assert json.loads((tmp_path / "rank.json").read_text())["image_root"] == str(folder.resolve())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_ranks_the_pool(strategy: str, runs: dict[str, Path], tmp_path: Path) -> None:
    members = [Member(r, run_config(r)) for r in (runs["run"], runs["run_b"])]
    summary = rank_run(runs["run"], run_config(runs["run"]), bps(runs["pool"]), tmp_path / "r.csv",
                       strategy=strategy, budget=5, members=members if strategy == "ensemble-bald" else ())
    frame = pd.read_csv(tmp_path / "r.csv")
    assert list(frame.columns) == COLUMNS and len(frame) == 5 and summary["n_ranked"] == 5
    assert frame["image"].is_unique and not set(frame["plate"]) & _test_plates(runs["run"])
    if strategy not in ("k-center", "hybrid"):
        assert frame["score"].is_monotonic_decreasing


def test_the_run_own_dataset_leaves_only_its_test_when_asked(runs: dict[str, Path], tmp_path: Path) -> None:
    from cellclass.errors import RankingError

    config = run_config(runs["run"])
    with pytest.raises(RankingError, match=r"nothing is left to rank: the pool's 68 image\(s\) are all left out"):
        rank_run(runs["run"], config, bps(runs["data"]), tmp_path / "r.csv", strategy="entropy", budget=5)
    summary = rank_run(runs["run"], config, bps(runs["data"]), tmp_path / "r.csv", strategy="entropy", budget=100,
                       keep_test=True)
    n_test = len(json.loads((runs["run"] / "split.json").read_text())["split"]["test"])
    assert summary["n_ranked"] == n_test and summary["left_out"]["labelled"] == 68 - n_test
    # the test plates of another run: the second run (seed 1) held out other plates
    assert _test_plates(runs["run_b"]) != _test_plates(runs["run"])
    other = rank_run(runs["run"], config, bps(runs["pool"]), tmp_path / "o.csv", strategy="entropy", budget=100,
                     exclude_groups_of=runs["run_b"])
    assert set(other["left_out"]["groups"]) == _test_plates(runs["run_b"])


def test_ensemble_runs_expands_a_cv_folder(tmp_path: Path) -> None:
    from cellclass.errors import EnsembleError

    for k in (1, 0):
        (tmp_path / "cv" / f"fold_{k}" / "checkpoints").mkdir(parents=True)
        (tmp_path / "cv" / f"fold_{k}" / "checkpoints" / "best.ckpt").write_bytes(b"x")
    assert ensemble_runs([tmp_path / "cv"]) == [tmp_path / "cv" / "fold_0", tmp_path / "cv" / "fold_1"]
    with pytest.raises(EnsembleError, match="is neither a run folder"):
        ensemble_runs([tmp_path])


def test_a_baseline_ranks_by_uncertainty_but_has_no_embeddings(runs: dict[str, Path], tmp_path: Path) -> None:
    from cellclass.errors import EmbeddingError, RankingError

    baseline = tmp_path / "mlp"
    train(bps(runs["data"]), TrainConfig(model="mlp", tasks=["particle_type"], image_size=16, tta=False), baseline)
    summary = rank_run(baseline, run_config(baseline), bps(runs["pool"]), tmp_path / "r.csv", strategy="entropy",
                       budget=4)
    assert summary["n_ranked"] == 4 and pd.read_csv(tmp_path / "r.csv")["score"].is_monotonic_decreasing
    with pytest.raises(EmbeddingError, match="is a baseline"):
        rank_run(baseline, run_config(baseline), bps(runs["pool"]), tmp_path / "r.csv", strategy="hybrid", budget=4)
    with pytest.raises(RankingError, match="was given to strategy 'entropy', which does not use one"):
        rank_run(baseline, run_config(baseline), bps(runs["pool"]), tmp_path / "r.csv", strategy="entropy", budget=4,
                 members=[Member(runs["run"], run_config(runs["run"]))])
