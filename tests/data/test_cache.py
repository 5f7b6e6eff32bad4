"""The prepared image cache: contents, keying (rebuild on change, reuse otherwise),
atomic and resumable builds, the bounded reader, and the training hook."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellclass.data.cache import (
    CACHE_DIR_ENV,
    CACHE_FOLDER,
    CachedImages,
    CacheSettings,
    find_cache,
    images_for_training,
    iter_images,
    prepare_cache,
    resolve_cache_dir,
)
from cellclass.data.io import write_tiff
from cellclass.data.presets import bps, folder
from cellclass.data.resize import load_images
from cellclass.errors import CacheError, ImageReadError


@pytest.fixture
def data(bps_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the simulated BPS set (68 uint16 TIFFs of 96 x 96)."""
    out = tmp_path / "bps"
    shutil.copytree(bps_dir, out)
    return out


def _store_mtime(cache) -> int:
    return (cache.path / "images.npy").stat().st_mtime_ns


def test_prepare_writes_the_fitted_images_in_their_dtype_and_an_index(data: Path) -> None:
    spec = bps(data)
    cache = prepare_cache(spec, CacheSettings(64))
    assert cache.built and cache.path.parent == data / CACHE_FOLDER
    images = cache.images
    assert images.shape == (68, 1, 64, 64) and images.dtype == np.uint16
    reference = load_images(spec, spec.load_manifest(), size=64)
    # Resized in float, rounded back to uint16: within half a grey level of the float path.
    assert np.abs(np.asarray(images).astype(np.float32) - reference).max() <= 0.5
    index = cache.index
    assert list(index.columns) == ["position", "_row", "image_id", "source_shape", "source_dtype"]
    assert index["image_id"].tolist() == pd.read_csv(data / "meta.csv")["filename"].tolist()
    assert set(index["source_shape"]) == {"1x96x96"} and set(index["source_dtype"]) == {"uint16"}
    assert cache.meta["settings"] == {"image_size": 64, "fit": "pad", "channels": None, "dtype": "keep"}
    assert cache.meta["n_files"] == 68 and cache.key == cache.path.name
    as_float = prepare_cache(spec, CacheSettings(64, dtype="float32")).images
    np.testing.assert_array_equal(np.asarray(as_float), reference)
    native = prepare_cache(spec, CacheSettings(96, fit="crop")).images
    from cellclass.data.io import read_image

    np.testing.assert_array_equal(native[5], read_image(data / index["image_id"][5]))


def test_same_settings_reuse_the_cache_without_rebuilding(data: Path) -> None:
    spec = bps(data)
    first = prepare_cache(spec, CacheSettings(32))
    stamp = _store_mtime(first)
    time.sleep(0.01)
    again = prepare_cache(spec, CacheSettings(32))
    assert not again.built and again.path == first.path and _store_mtime(again) == stamp
    assert find_cache(spec, CacheSettings(32)).path == first.path


def test_a_touched_or_modified_source_image_rebuilds(data: Path) -> None:
    spec = bps(data)
    first = prepare_cache(spec, CacheSettings(32))
    name = pd.read_csv(data / "meta.csv")["filename"][3]
    st = (data / name).stat()
    os.utime(data / name, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert find_cache(spec, CacheSettings(32)) is None  # stale: never used
    touched = prepare_cache(spec, CacheSettings(32))
    assert touched.built and touched.path != first.path and not first.path.exists()
    write_tiff(data / name, np.full((1, 96, 96), 1234, dtype=np.uint16))
    modified = prepare_cache(spec, CacheSettings(32))
    assert modified.built and modified.path != touched.path
    assert (modified.images[3] == 1234).all()


def test_a_changed_setting_or_row_selection_gets_its_own_cache(data: Path) -> None:
    spec = bps(data)
    paths = {prepare_cache(spec, s).path for s in (
        CacheSettings(32), CacheSettings(48), CacheSettings(32, fit="resize"), CacheSettings(32, dtype="float32"),
        CacheSettings(32, channels=(0,)))}
    assert len(paths) == 5
    spec.where = ["dose_Gy > 0"]
    filtered = prepare_cache(spec, CacheSettings(32))
    assert filtered.path not in paths and filtered.images.shape[0] == len(spec.load_manifest()) < 68


def test_content_hash_ignores_a_touch_but_not_an_edit(data: Path) -> None:
    spec = bps(data)
    settings = CacheSettings(32, hash="content")
    first = prepare_cache(spec, settings)
    assert first.meta["hash"] == "content"
    name = pd.read_csv(data / "meta.csv")["filename"][0]
    os.utime(data / name, ns=(0, 1_000_000_000))
    assert not prepare_cache(spec, settings).built
    write_tiff(data / name, np.zeros((1, 96, 96), dtype=np.uint16))
    assert find_cache(spec, settings) is None
    assert prepare_cache(spec, settings).built


def test_an_interrupted_build_leaves_no_cache_and_resumes(data: Path) -> None:
    spec = bps(data)

    class Stop(Exception):
        pass

    def stop_after_two_chunks(stage: str, done: int, total: int) -> None:
        if done >= 20:
            raise Stop

    with pytest.raises(Stop):
        prepare_cache(spec, CacheSettings(32), chunk_rows=10, progress=stop_after_two_chunks)
    assert find_cache(spec, CacheSettings(32)) is None
    assert images_for_training(spec, spec.load_manifest(), size=32).__class__ is np.ndarray
    resumed = prepare_cache(spec, CacheSettings(32), chunk_rows=10)
    assert resumed.built and resumed.resumed_from == 20
    assert not list((data / CACHE_FOLDER).glob(".partial-*"))
    fresh = prepare_cache(spec, CacheSettings(32), rebuild=True)
    assert fresh.resumed_from == 0
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(fresh.images))
    assert len(resumed.index) == 68


_KILL_SCRIPT = """
import sys, time
from cellclass.data.cache import CacheSettings, prepare_cache
from cellclass.data.presets import bps
prepare_cache(bps(sys.argv[1]), CacheSettings(32), chunk_rows=4, workers=1,
              progress=lambda stage, done, total: time.sleep(0.3))
"""


@pytest.mark.slow
def test_a_killed_prepare_process_leaves_no_half_valid_cache(data: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(data)])
    progress = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list((data / CACHE_FOLDER).glob(".partial-*/progress.json"))
        if found and json.loads(found[0].read_text())["done"] >= 8:
            progress = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress is not None, "the subprocess never wrote its progress"
    spec = bps(data)
    assert find_cache(spec, CacheSettings(32)) is None
    resumed = prepare_cache(spec, CacheSettings(32))
    assert resumed.resumed_from >= 8
    reference = load_images(spec, spec.load_manifest(), size=32)
    assert np.abs(np.asarray(resumed.images).astype(np.float32) - reference).max() <= 0.5


def test_cached_images_index_like_an_array_and_pickle_by_path(data: Path) -> None:
    images = prepare_cache(bps(data), CacheSettings(32)).images
    full = np.asarray(CachedImages(images.path, release=False))
    np.testing.assert_array_equal(images[3], full[3])
    np.testing.assert_array_equal(images[2:7], full[2:7])
    np.testing.assert_array_equal(images[np.array([9, 1, 4])], full[[9, 1, 4]])
    mask = np.zeros(68, dtype=bool)
    mask[[0, 67]] = True
    np.testing.assert_array_equal(images[mask], full[mask])
    clone = pickle.loads(pickle.dumps(images))
    assert len(pickle.dumps(images)) < 1000 and clone.shape == images.shape
    np.testing.assert_array_equal(clone[5], full[5])
    assert [a.shape for a in iter_images(images, [4, 0, 9], chunk=2)] == [(1, 32, 32)] * 3
    assert images.memmap().shape == full.shape and images.nbytes == full.nbytes
    with pytest.raises(CacheError, match=r"takes a row index, got the tuple \(0, 0\)"):
        images[0, 0]


def test_cached_images_refuse_a_file_that_is_not_a_cache(tmp_path: Path) -> None:
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(CacheError, match="cannot read cache array"):
        CachedImages(bad)
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    with pytest.raises(CacheError, match=r"has shape \(3, 4\); valid: \(N, C, S, S\)"):
        CachedImages(tmp_path / "flat.npy")


def test_cache_location_argument_environment_and_defaults(data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec = bps(data)
    assert resolve_cache_dir(spec) == data / CACHE_FOLDER
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir(spec) == tmp_path / "env"
    assert prepare_cache(spec, CacheSettings(16)).path.parent == tmp_path / "env"
    assert resolve_cache_dir(spec, tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CACHE_DIR_ENV)
    classes = tmp_path / "classes"
    for label in ("a", "b"):
        for i in range(2):
            write_tiff(classes / label / f"{i}.tif", np.full((1, 8, 8), i, dtype=np.uint8))
    spec = folder(classes)
    cache = prepare_cache(spec, CacheSettings(8))
    assert cache.path.parent == tmp_path / CACHE_FOLDER  # beside, not inside, the class folders
    assert len(spec.load_manifest()) == 4 and cache.images.dtype == np.uint8


@pytest.mark.slow
def test_training_builds_then_reads_the_cache(data: Path, tmp_path: Path) -> None:
    from cellclass.data.cache import CachedImages as Reader
    from cellclass.data.prepared import prepare_data
    from cellclass.training.config import TrainConfig
    from cellclass.training.loop import train

    cfg = TrainConfig(model="lenet5", tasks=["particle_type"], image_size=32, epochs=1, batch_size=16,
                      tta=False, cache=True, loader_workers=1)
    result = train(bps(data), cfg, tmp_path / "run")
    assert 0 <= result["tasks"]["particle_type"]["accuracy"] <= 1
    assert len(list((data / CACHE_FOLDER).glob("*-s*"))) == 1
    again = prepare_data(bps(data), TrainConfig(image_size=32, tasks=["particle_type"]))
    assert isinstance(again.images, Reader)  # used without being asked, since it is valid
    other_size = prepare_data(bps(data), TrainConfig(image_size=24, tasks=["particle_type"]))
    assert isinstance(other_size.images, np.ndarray)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(CacheError, match="cache fit mode 'squash' is invalid; valid: pad, resize, crop"):
        CacheSettings(32, fit="squash")
    with pytest.raises(CacheError, match="cache dtype 'uint8' is invalid; valid: keep, float32"):
        CacheSettings(32, dtype="uint8")
    with pytest.raises(CacheError, match="cache hash 'md5' is invalid; valid: stat, content"):
        CacheSettings(32, hash="md5")
    with pytest.raises(CacheError, match="cache image_size 0 is invalid"):
        CacheSettings(0)
    with pytest.raises(CacheError, match=r"cache channels \[-1\] are invalid"):
        CacheSettings(32, channels=(-1,))


def test_build_errors_name_the_row_and_what_is_valid(data: Path) -> None:
    spec = bps(data)
    names = pd.read_csv(data / "meta.csv")["filename"]
    with pytest.raises(CacheError, match="chunk_rows 0 is invalid"):
        prepare_cache(spec, CacheSettings(32), chunk_rows=0)
    spec.where = ["dose_Gy > 100"]
    with pytest.raises(CacheError, match="has no row to prepare"):
        prepare_cache(spec, CacheSettings(32))
    spec.where = []
    write_tiff(data / names[1], np.full((1, 96, 96), 7, dtype=np.int32))
    with pytest.raises(CacheError, match=r"row 2: image dtype int32 cannot be stored in the cache's uint16.*--dtype float32"):
        prepare_cache(spec, CacheSettings(32))
    assert prepare_cache(spec, CacheSettings(32, dtype="float32")).images.dtype == np.float32
    write_tiff(data / names[1], np.full((2, 96, 96), 7, dtype=np.uint16))
    with pytest.raises(ImageReadError, match="row 2: image has 2 channel"):
        prepare_cache(spec, CacheSettings(32))
    (data / names[1]).unlink()
    with pytest.raises(ImageReadError, match=r"row 2: cannot read image .* \(run `cellclass validate`\)"):
        prepare_cache(spec, CacheSettings(32))


@pytest.mark.slow
def test_prepare_command_builds_then_reuses(data: Path, cli) -> None:
    first = cli("prepare", data, "--preset", "bps", "--image-size", "32")
    assert first.returncode == 0, first.stderr
    assert "cache built: 68x1x32x32 <u2" in first.stdout
    second = cli("prepare", data, "--preset", "bps", "--image-size", "32")
    assert second.returncode == 0 and "up to date, reused" in second.stdout
    bad = cli("prepare", data, "--preset", "bps", "--dtype", "int8")
    assert bad.returncode == 2 and "cache dtype 'int8' is invalid" in bad.stderr
