"""bioimage.io model packages: metadata checks, the probability graph, and packages of real
runs that pass bioimageio.core's own model test, offline."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from serve_helpers import run_cellclass

from cellclass.data.augment import dihedral
from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.errors import MissingDependencyError, ModelPackageError
from cellclass.models import create_model
from cellclass.serving.bioimageio import (
    PackageInfo,
    ProbabilityGraph,
    check_info,
    d4_view,
    export_bioimageio,
    parse_citation,
    tensor_ids,
)
from cellclass.inference.predictor import Predictor

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
INFO = PackageInfo(license="CC-BY-4.0", authors=["Ada Lovelace"], cite=["Neumann et al. 2010 10.1038/nature08869"])
# Any HTTP request bioimageio makes goes to a closed port and fails at once: nothing downloads.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": ""}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No network and a private cache for bioimageio (its settings are read when first imported)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**OFFLINE, "BIOIMAGEIO_CACHE_PATH": str(tmp_path_factory.mktemp("bioimageio-cache"))}.items():
            mp.setenv(key, value)
        yield


def _predictor(tta: bool) -> Predictor:
    torch.manual_seed(0)
    encoders = {"particle": TaskEncoder("particle", "single", ["Fe", "X-ray"]),
                "marks": TaskEncoder("marks", "multilabel", ["a", "b", "c"])}
    model = create_model("lenet5", in_chans=2, heads={"particle": 2, "marks": 3}, image_size=32,
                         task_types={"particle": "single", "marks": "multilabel"}).eval()
    return Predictor(model=model, kind="network", encoders=encoders, normalizer=Normalizer(mode="none"), image_size=32,
                     tta=tta)


# -- metadata --------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("10.1038/nature08869", {"text": "10.1038/nature08869", "doi": "10.1038/nature08869"}),
    ("Neumann et al. 2010 https://doi.org/10.1038/nature08869", {"text": "Neumann et al. 2010",
                                                                  "doi": "10.1038/nature08869"}),
    ("Neumann et al. doi:10.1038/nature08869", {"text": "Neumann et al.", "doi": "10.1038/nature08869"}),
    ("cellclass https://example.com/cellclass", {"text": "cellclass", "url": "https://example.com/cellclass"}),
])
def test_citations_take_a_doi_or_url(text: str, expected: dict[str, str]) -> None:
    assert parse_citation(text) == expected


@pytest.mark.parametrize(("info", "match"), [
    (PackageInfo(license=None, authors=["A"]), "needs a licence; valid: --license SPDX_ID"),
    (PackageInfo(license="cc by", authors=["A"]), "'cc by' is not an SPDX licence identifier"),
    (PackageInfo(license="MIT", authors=[]), "needs at least one author"),
    (PackageInfo(license="MIT", authors=["A/B"]), "author 'A/B' is not a name"),
    (PackageInfo(license="MIT", authors=["A"], cite=["Neumann et al. 2010"]),
     "citation 'Neumann et al. 2010' ends in no DOI or URL"),
    (PackageInfo(license="MIT", authors=["A"], name="net"), "model name 'net' is invalid; valid: 5 to 128"),
    (PackageInfo(license="MIT", authors=["A"], name="resnet: plates"), r"characters \[':'\]"),
    (PackageInfo(license="MIT", authors=["A"], description="x" * 1025), "1025 characters; valid: at most 1024"),
])
def test_metadata_the_spec_refuses_is_refused(info: PackageInfo, match: str) -> None:
    pytest.importorskip("bioimageio.spec", reason="pip install 'cellclass[bioimageio]'")
    with pytest.raises(ModelPackageError, match=match):
        check_info(info)


def test_export_refuses_before_reading_the_run(tmp_path: Path) -> None:
    pytest.importorskip("bioimageio.spec", reason="pip install 'cellclass[bioimageio]'")
    with pytest.raises(ModelPackageError, match="needs a licence"):
        export_bioimageio(tmp_path / "no-run", None, PackageInfo(license=None, authors=["A"]))
    with pytest.raises(ModelPackageError, match="unknown ONNX exporter 'fast'; valid: auto, legacy, dynamo"):
        export_bioimageio(tmp_path / "no-run", None, INFO, exporter="fast")


def test_a_missing_bioimageio_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [m for m in sys.modules if m == "bioimageio" or m.startswith("bioimageio.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bioimageio", None)  # what an absent package looks like to import
    with pytest.raises(MissingDependencyError, match=r"pip install 'cellclass\[bioimageio\]'"):
        export_bioimageio(tmp_path, None, INFO)


def test_tensor_ids_are_lower_case_identifiers() -> None:
    assert tensor_ids(["particle_type", "dose_Gy", "2nd task", "Dose-Gy"]) == {
        "particle_type": "particle_type", "dose_Gy": "dose_gy", "2nd task": "task_2nd_task", "Dose-Gy": "dose_gy_2"}
    assert tensor_ids(["image"]) == {"image": "image_2"}  # the input's id is taken


# -- the graph -------------------------------------------------------------------------
def test_d4_views_are_the_training_symmetries() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for k in range(8):
        assert torch.equal(d4_view(x, k), dihedral(x, k)), k


@pytest.mark.parametrize("tta", [False, True])
def test_the_graph_gives_the_predictors_probabilities(tta: bool) -> None:
    predictor = _predictor(tta)
    x = np.random.default_rng(0).normal(0.3, 0.4, (5, 2, 32, 32)).astype(np.float32)
    expected = predictor.predict_normalized(x)
    with torch.inference_mode():
        got = ProbabilityGraph.of(predictor)(torch.from_numpy(x))
    for task, p in zip(predictor.encoders, got, strict=True):
        assert p.shape == expected[task].shape
        np.testing.assert_allclose(p.numpy(), expected[task], rtol=0, atol=1e-7)
    assert np.allclose(got[0].sum(1).numpy(), 1.0, atol=1e-6)  # softmax for the single-label task
    assert not np.allclose(got[1].sum(1).numpy(), 1.0)  # independent sigmoids for the multi-label one


# -- packages of real runs (slow: they train, export and run bioimageio.core) -----------------
def _train(out: Path, *args: object) -> Path:
    result = run_cellclass("train", *args, "--epochs", "1", "--image-size", "32", "--tracker", "none", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet18 (no pretrained weights) on 160 MitoCheck nuclei of 4 phenotypes split by plate, or on the
    simulated BPS set where ../shared/data is absent."""
    root = tmp_path_factory.mktemp("resnet")
    mitocheck = SHARED_DATA / "mitocheck_h2b_phenotypes"
    if not (mitocheck / "labels.csv").is_file():
        from cellclass.data.simulate import simulate_bps

        simulate_bps(root / "bps", n_images=68, seed=0)
        return _train(root / "run", root / "bps", "--preset", "bps", "--task", "particle_type", "--model", "resnet18")
    frame = pd.read_csv(mitocheck / "labels.csv")
    frame = frame[frame.phenotype.isin(["Interphase", "Large", "Prometaphase", "Apoptosis"])]
    frame = frame.groupby("phenotype").head(40).assign(filename=lambda f: str(mitocheck) + "/" + f.filename)
    frame[["filename", "phenotype", "plate", "well"]].to_csv(root / "mitocheck.csv", index=False)
    return _train(root / "run", root / "mitocheck.csv", "--image-col", "filename", "--task", "phenotype",
                  "--group", "plate", "--model", "resnet18")


@pytest.fixture(scope="module")
def bps_run(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LeNet-5 with two heads, particle type and dose, on the simulated BPS set."""
    return _train(tmp_path_factory.mktemp("bps") / "run", bps_dir, "--preset", "bps", "--task", "particle_type",
                  "--task", "dose", "--model", "lenet5")


def _warnings(summary: object) -> list[str]:
    return [w.msg for d in summary.details for w in d.warnings]


def _agrees_with_cellclass(run: Path, rdf: Path, image: Path, tta: bool | None = None) -> None:
    """bioimageio.core's prediction (its preprocessing, the weights) equals `cellclass predict`'s, to 1e-5."""
    from bioimageio.core import predict

    predictor = Predictor.from_checkpoint(run, tta=tta)
    raw = predictor.read_image(image)
    ours = predictor.predict_images([raw])[0]
    sample = predict(model=rdf, inputs={"image": predictor.prepare([raw])})
    for task, tid in tensor_ids(list(predictor.encoders)).items():
        got = sample.members[tid].data.to_numpy()[0]
        expected = [ours[task]["probabilities"][c] for c in predictor.encoders[task].classes]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resnet18_package_passes_bioimageio_core(resnet_run: Path, tmp_path: Path) -> None:
    core = pytest.importorskip("bioimageio.core", reason="pip install 'cellclass[bioimageio]'")
    out = tmp_path / "resnet18"
    result = run_cellclass("export", resnet_run, "--format", "bioimageio", "--out", out, "--license", "CC-BY-4.0",
                           "--author", "Ada Lovelace", "--author", "Alan Turing", "--cite",
                           "Neumann et al. 2010 10.1038/nature08869", "--name", "cellclass ResNet18 nuclei",
                           "--no-check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"written to {out} and {out}.zip" in " ".join(result.stdout.split())
    summary = core.test_model(out / "rdf.yaml")
    assert summary.status == "passed", summary.format()
    assert not [w for w in _warnings(summary) if "URL" in w or "download" in w.lower()]

    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    predictor = Predictor.from_checkpoint(resnet_run)
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    assert rdf["name"] == "cellclass ResNet18 nuclei" and rdf["license"] == "CC-BY-4.0"
    assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace", "Alan Turing"]
    assert rdf["cite"] == [{"text": "Neumann et al. 2010", "doi": "10.1038/nature08869"}]
    (image,) = rdf["inputs"]
    assert [a["type"] for a in image["axes"]] == ["batch", "channel", "space", "space"]
    assert [a.get("id") for a in image["axes"][2:]] == ["y", "x"] and image["axes"][2]["size"] == 32
    steps = {s["id"]: s["kwargs"] for s in image["preprocessing"]}
    span = predictor.normalizer.high_values_ - predictor.normalizer.low_values_
    np.testing.assert_allclose(steps["scale_linear"]["gain"], 1 / span)
    assert steps["clip"] == {"min": -0.5, "max": 1.5}
    (output,) = rdf["outputs"]
    task = next(iter(predictor.encoders))
    assert output["axes"][1]["channel_names"] == predictor.encoders[task].classes
    assert set(rdf["weights"]) == {"torchscript", "onnx"} and rdf["weights"]["onnx"]["parent"] == "torchscript"
    config = rdf["config"]["cellclass"]
    assert config["split"]["method"] == "group" and config["split"]["groups_overlap"] is False
    assert config["test_metrics"][task]["n"] == config["split"]["sizes"]["test"]
    assert "## Validation" in (out / "README.md").read_text()
    _agrees_with_cellclass(resnet_run, out / "rdf.yaml", Path(config["test_image"]))


@pytest.mark.slow
def test_multi_task_package_has_one_output_per_task(bps_run: Path, bps_dir: Path, tmp_path: Path) -> None:
    core = pytest.importorskip("bioimageio.core", reason="pip install 'cellclass[bioimageio]'")
    out = tmp_path / "bps"
    result = run_cellclass("export", bps_run, "--format", "bioimageio", "--out", out, "--license", "MIT",
                           "--author", "Ada Lovelace")  # --check: the CLI runs bioimageio.core's test
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert "outputs particle_type, dose; preprocessing scale_linear, clip" in text
    assert "bioimageio.core's model test passed (weights: torchscript, onnx)" in text
    summary = core.test_model(out.with_name("bps.zip"))  # the zip is a package too
    assert summary.status == "passed", summary.format()
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    classes = {o["id"]: o["axes"][1]["channel_names"] for o in rdf["outputs"]}
    predictor = Predictor.from_checkpoint(bps_run)
    assert classes == {t: predictor.encoders[t].classes for t in ("particle_type", "dose")}
    for tid, names in classes.items():
        given = np.load(out / f"test_output_{tid}.npy")
        assert given.shape == (1, len(names)) and np.isclose(given.sum(), 1.0, atol=1e-5)
    meta = pd.read_csv(bps_dir / "meta.csv", dtype=str)
    _agrees_with_cellclass(bps_run, out / "rdf.yaml", bps_dir / meta.filename.iloc[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["image", "group"])
def test_other_normalizations_are_declared_as_cellclass_applies_them(bps_dir: Path, tmp_path: Path, mode: str) -> None:
    pytest.importorskip("bioimageio.core", reason="pip install 'cellclass[bioimageio]'")
    run = _train(tmp_path / "run", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "lenet5",
                 "--set", f"normalize={mode}")
    package = export_bioimageio(run, tmp_path / "package", INFO, tta=False, zip_package=False)
    assert package.zip is None
    assert package.preprocessing == {"image": ["scale_range", "clip"], "group": ["scale_linear", "clip"]}[mode]
    meta = pd.read_csv(bps_dir / "meta.csv", dtype=str)
    for name in meta.filename.iloc[:3]:
        _agrees_with_cellclass(run, package.rdf, bps_dir / name, tta=False)


@pytest.mark.slow
def test_export_refusals_on_runs(bps_run: Path, bps_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bioimageio.spec", reason="pip install 'cellclass[bioimageio]'")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ModelPackageError, match="holds other files; valid: a new or empty folder"):
        export_bioimageio(bps_run, busy, INFO)
    with pytest.raises(ModelPackageError, match="--test-image .* cannot be used"):
        export_bioimageio(bps_run, tmp_path / "p", INFO, test_image=tmp_path / "missing.tif")
    baseline = _train(tmp_path / "mlp", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "mlp")
    with pytest.raises(ModelPackageError, match="mlp baseline, not a network"):
        export_bioimageio(baseline, tmp_path / "p", INFO)
    result = run_cellclass("export", bps_run, "--format", "bioimageio", "--author", "A", "--out", tmp_path / "p")
    assert result.returncode == 2 and "needs a licence" in result.stderr and "Traceback" not in result.stderr
    assert os.environ.get("HTTPS_PROXY") == OFFLINE["HTTPS_PROXY"]  # the CLI ran offline too
