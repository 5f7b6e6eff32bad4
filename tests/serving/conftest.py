"""Fixtures of the serving tests: tiny trained runs, apps in this process (TestClient), and real
`cellclass serve` processes on loopback for what needs one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from serve_helpers import Server, api_settings, run_cellclass, tiff_bytes

from cellclass.data.presets import bps
from cellclass.serving.app import create_app
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train


@pytest.fixture(scope="session")
def served_run(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5 trained for one epoch on the simulated BPS set (particle type, 32 x 32)."""
    run = tmp_path_factory.mktemp("served") / "run"
    result = run_cellclass("train", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "lenet5",
                           "--epochs", "1", "--image-size", "32", "--out", run)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


@pytest.fixture(scope="session")
def bps_images(bps_dir: Path) -> list[tuple[str, bytes, str]]:
    """``(file name, TIFF bytes, particle type)`` of every simulated BPS image."""
    meta = pd.read_csv(bps_dir / "meta.csv", dtype=str)
    return [(row.filename, (bps_dir / row.filename).read_bytes(), row.particle_type) for row in meta.itertuples()]


@pytest.fixture(scope="session")
def server(served_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the API tests: 1 MiB uploads, 4 images per request (so limits are cheap to hit)."""
    state = tmp_path_factory.mktemp("state")
    srv = Server(served_run, state, state.parent / "server.log", "--max-upload-mb", "1",
                 env={"CELLCLASS_MAX_IMAGES": "4"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def keys(server: Server) -> dict[str, str]:
    """One key per role (two contribute keys) in the shared server's state."""
    return {"predict": server.key("predict"), "contribute": server.key("contribute", "lab A"),
            "contribute_b": server.key("contribute", "lab B"), "curate": server.key("curate", "curator")}


@pytest.fixture(scope="session")
def api_run(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5 trained in this process for one epoch on the simulated BPS set (particle type, 32 x 32)."""
    run = tmp_path_factory.mktemp("api") / "run"
    train(bps(bps_dir), TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, epochs=1), run)
    return run


@pytest.fixture(scope="module")
def api(api_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app of :func:`api_settings` on :func:`api_run`, started (lifespan run) for a test module."""
    state = tmp_path_factory.mktemp("api-state")
    with TestClient(create_app(api_settings(api_run, state))) as client:
        yield client


@pytest.fixture(scope="module")
def api_keys(api: TestClient) -> dict[str, str]:
    """One key per role (two contribute keys) in the app's database."""
    store = api.app.state.service.keys
    return {"predict": store.create("predict")[0], "contribute": store.create("contribute", "lab A")[0],
            "contribute_b": store.create("contribute", "lab B")[0], "curate": store.create("curate", "curator")[0]}


@pytest.fixture(scope="session")
def field_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cell model: 10 simulated HPA fields of 192 x 192 segmented (nuclei on blue, cells grown on red), cut into
    32 x 32 crops with neighbours masked, and a LeNet-5 trained on them for one epoch.

    Returns the folders: ``fields``, ``seg``, ``cells`` and ``run``.
    """
    from cellclass.data.crops import make_crops
    from cellclass.data.masks import segment_fields
    from cellclass.data.presets import hpa
    from cellclass.data.segment import SkimageBackend
    from cellclass.data.simulate_hpa_fields import simulate_hpa_fields
    from cellclass.data.spec import DatasetSpec

    root = tmp_path_factory.mktemp("field_run")
    paths = {name: root / name for name in ("fields", "seg", "cells", "run")}
    simulate_hpa_fields(paths["fields"], n_fields=10, size=192, seed=4)
    spec = hpa(paths["fields"])
    segment_fields(spec, SkimageBackend(channel=2), paths["seg"], cell_channel=0)
    crops = make_crops(spec, paths["seg"], paths["cells"], 32, mask_neighbours=True, border="pad")
    train(DatasetSpec.from_yaml(crops.spec), TrainConfig(model="lenet5", image_size=32, epochs=1, tta=False,
                                                         precision="32-true"), paths["run"])
    return paths


@pytest.fixture(scope="session")
def field_tiff(field_run: dict[str, Path]) -> tuple[str, bytes, np.ndarray]:
    """The first simulated field as one 4-channel TIFF: ``(its Id, the TIFF's bytes, the (C, H, W) image)``."""
    from cellclass.data.presets import hpa

    spec = hpa(field_run["fields"])
    record = spec.load_manifest().to_dict("records")[0]
    image = spec.read_image(record)
    return str(record["Id"]), tiff_bytes(image), image
