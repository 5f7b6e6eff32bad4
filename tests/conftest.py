"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

import pytest

# The shared data sets live beside the repository checkout (../shared/data), not in it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-user cache (``precision: auto``'s choices) in a folder of the session, also
    for the CLI processes tests start: no test writes to the user's own cache."""
    folder = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELLCLASS_USER_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the shared real data sets; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent; these tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated BPS-layout dataset (read-only: copy it before modifying)."""
    from cellclass.data.simulate import simulate_bps

    out = tmp_path_factory.mktemp("bps")
    simulate_bps(out, n_images=68, seed=0)
    return out


@pytest.fixture(scope="session")
def hpa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated HPA-layout dataset (read-only)."""
    from cellclass.data.simulate import simulate_hpa

    out = tmp_path_factory.mktemp("hpa")
    simulate_hpa(out, n_images=24, seed=0)
    return out


def corrupt_bps_copy(src: Path, dst: Path) -> dict[str, int]:
    """Copy a simulated BPS set and break four rows four ways; return row numbers by fault:
    a truncated TIFF, a missing file, a label typo and an image with the wrong channel count."""
    from cellclass.data.io import write_tiff

    shutil.copytree(src, dst)
    meta = pd.read_csv(dst / "meta.csv", dtype=str, keep_default_na=False)
    rows = {"truncated": 2, "missing": 5, "typo": 7, "channels": 9}
    truncated = dst / meta.filename[rows["truncated"] - 1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (dst / meta.filename[rows["missing"] - 1]).unlink()
    meta.loc[rows["typo"] - 1, "particle_type"] = "Xray"
    write_tiff(dst / meta.filename[rows["channels"] - 1], np.full((3, 32, 32), 1000, dtype=np.uint16))
    meta.to_csv(dst / "meta.csv", index=False)
    return rows


@pytest.fixture
def corrupt_bps(bps_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A copy of the simulated BPS set with four faults, and the faulty row numbers."""
    out = tmp_path / "corrupt_bps"
    return out, corrupt_bps_copy(bps_dir, out)


def run_cli(*args: object, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cellclass`` console script as a user would; capture its output."""
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    exe = Path(sys.executable).with_name("cellclass")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def cli() -> object:
    """The :func:`run_cli` helper."""
    return run_cli


def make_untrained_run(spec: object, config: object, out: Path, thresholds: dict[str, list[float]] | None = None,
                       seed: int = 0) -> Path:
    """A run folder as training leaves it (config.yaml, split.json, best.ckpt) for ``spec``'s tasks in
    ``config``, with a LeNet-5's untrained weights (from ``seed``): evaluating it is quick and makes mistakes."""
    import torch
    import yaml

    from cellclass.data.cache import iter_images
    from cellclass.data.normalize import Normalizer
    from cellclass.data.prepared import prepare_data, write_split
    from cellclass.inference.checkpoint import Checkpoint
    from cellclass.models import create_model

    spec = spec.select_tasks(config.tasks)
    data = prepare_data(spec, config)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"train": config.to_dict(),
                                                     "dataset": {**spec.to_dict(), "base_dir": str(spec.base_dir)}}))
    write_split(out / "split.json", data)
    norm = Normalizer().fit(iter_images(data.images, data.split.train))
    torch.manual_seed(seed)
    model = create_model("lenet5", in_chans=data.images.shape[1],
                         heads={t: e.n_outputs for t, e in data.encoders.items()}, image_size=config.image_size,
                         task_types={t: e.type for t, e in data.encoders.items()})
    Checkpoint(kind="network", model_config=model.config, encoders=data.encoders, normalizer=norm,
               image_size=config.image_size, config=config.to_dict(), spec=spec.to_dict(),
               state_dict=model.state_dict(), epoch=1, run=str(out),
               thresholds=thresholds or {}).save(out / "checkpoints" / "best.ckpt")
    return out


@pytest.fixture(scope="session")
def untrained_run() -> object:
    """The :func:`make_untrained_run` helper."""
    return make_untrained_run
