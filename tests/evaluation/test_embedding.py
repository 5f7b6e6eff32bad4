"""The parts of `embed` that need no network: the 2-D map, profiles, the probe, a pool without labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.labels import TaskEncoder
from cellclass.data.prepared import prepare_pool
from cellclass.data.spec import spec_from_manifest
from cellclass.errors import EmbeddingError, SpecError
from cellclass.evaluation.embedding import check_profiles, map_2d, probe, profiles
from cellclass.training.config import TrainConfig


def test_profiles_are_the_mean_or_median_per_value() -> None:
    frame = pd.DataFrame({"well": ["A1", "A1", "B2", "A1"], "plate": ["p", "p", "p", "q"]})
    features = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 0.0], [8.0, 60.0]], dtype=np.float32)
    mean = profiles(frame, features, ["well"], "mean")
    assert mean["well"].tolist() == ["A1", "B2"] and mean["n_images"].tolist() == [3, 1]
    np.testing.assert_allclose(mean[["f0", "f1"]].to_numpy(), [[4.0, 30.0], [5.0, 0.0]])
    median = profiles(frame, features, ["well"], "median")
    np.testing.assert_allclose(median[["f0", "f1"]].to_numpy(), [[3.0, 20.0], [5.0, 0.0]])
    both = profiles(frame, features, ["plate", "well"], "mean")
    assert both[["plate", "well"]].values.tolist() == [["p", "A1"], ["p", "B2"], ["q", "A1"]]


def test_profile_options_are_checked() -> None:
    with pytest.raises(EmbeddingError, match=r"profile column\(s\) \['treatment'\] are not in the dataset; valid: well"):
        check_profiles(["_row", "well"], ["treatment"], "mean")
    with pytest.raises(EmbeddingError, match="profile statistic 'max' is unknown; valid: mean, median"):
        check_profiles(["well"], ["well"], "max")


def test_pca_map_and_the_fallback_for_few_images() -> None:
    features = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    coords, used = map_2d(features, "pca")
    assert coords.shape == (30, 2) and used == "pca"
    coords, used = map_2d(features[:4], "umap")
    assert coords.shape == (4, 2) and used.startswith("pca (UMAP needs at least 10 images)")
    assert map_2d(features, "none") == (None, "none")
    with pytest.raises(EmbeddingError, match="map 'tsne' is unknown; valid: umap, pca, none"):
        map_2d(features, "tsne")


@pytest.mark.slow
def test_umap_map_is_seeded() -> None:
    features = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    a, used = map_2d(features, "umap", seed=1)
    b, _ = map_2d(features, "umap", seed=1)
    assert used == "umap" and a.shape == (40, 2)
    np.testing.assert_allclose(a, b)


def test_probe_separates_separable_features_and_reports_the_network() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    features = (np.eye(3)[y] * 5 + rng.normal(scale=0.3, size=(60, 3))).astype(np.float32)
    encoder = TaskEncoder("cls", "single", ["a", "b", "c"])
    train, test = np.arange(0, 60, 2), np.arange(1, 60, 2)
    network = {"cls": np.full((60, 3), 1 / 3)}
    result = probe(features, {"cls": y}, {"cls": encoder}, train, test, network)["cls"]
    assert result["knn_macro_f1"] == 1.0 and result["logreg_macro_f1"] == 1.0
    assert result["network_macro_f1"] < 0.3 and (result["n_train"], result["n_test"]) == (30, 30)


def test_probe_skips_unlabelled_rows_and_multilabel_tasks() -> None:
    y = np.array([0, 1, -1, 0, 1, 1])
    features = np.array([[0.0], [1.0], [0.5], [0.1], [0.9], [1.1]], dtype=np.float32)
    encoders = {"cls": TaskEncoder("cls", "single", ["a", "b"]), "marks": TaskEncoder("marks", "multilabel", ["x"])}
    network = {"cls": np.tile([0.5, 0.5], (6, 1)), "marks": np.zeros((6, 1))}
    result = probe(features, {"cls": y, "marks": np.zeros((6, 1))}, encoders, np.array([0, 1, 2]),
                   np.array([3, 4, 5]), network)
    assert result["cls"]["n_train"] == 2 and result["cls"]["knn_neighbours"] == 2
    assert result["marks"] == {"note": "multi-label task: not probed"}


def _pool(tmp_path: Path, header: str, rows: list[str]) -> Path:
    from cellclass.data.io import write_tiff

    for name in ("a.tif", "b.tif"):
        write_tiff(tmp_path / name, np.full((1, 8, 8), 100, dtype=np.uint16))
    manifest = tmp_path / "pool.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


def test_a_pool_without_its_label_column_is_read_unlabelled(tmp_path: Path) -> None:
    manifest = _pool(tmp_path, "filename,plate", ["a.tif,P1", "b.tif,P2"])
    spec = spec_from_manifest(manifest, image_col="filename", tasks=["particle"], groups=["plate"])
    with pytest.raises(SpecError, match=r"lacks column\(s\) \['particle'\]"):
        spec.load_manifest()
    encoder = TaskEncoder("particle", "single", ["Fe", "X-ray"])
    pool = prepare_pool(spec, TrainConfig(image_size=16), {"particle": encoder})
    assert pool.ids == ["a.tif", "b.tif"] and pool.targets["particle"].tolist() == [-1, -1]
    assert pool.images.shape == (2, 1, 16, 16) and pool.groups.tolist() == ["P1", "P2"]
    assert pool.split.test.tolist() == [0, 1]


def test_a_pool_keeps_the_labels_it_has(tmp_path: Path) -> None:
    manifest = _pool(tmp_path, "filename,particle", ["a.tif,Fe", "b.tif,"])
    spec = spec_from_manifest(manifest, image_col="filename", tasks=["particle"], drop_unlabeled=True)
    pool = prepare_pool(spec, TrainConfig(image_size=16), {"particle": TaskEncoder("particle", "single", ["Fe", "X-ray"])})
    assert pool.targets["particle"].tolist() == [0, -1]  # an unlabelled row is not dropped from a pool


def test_an_empty_pool_is_refused(tmp_path: Path) -> None:
    manifest = _pool(tmp_path, "filename", [])
    spec = spec_from_manifest(manifest, image_col="filename", tasks=["particle"])
    with pytest.raises(SpecError, match="has no row; valid: a dataset with at least one image"):
        prepare_pool(spec, TrainConfig(image_size=16))
