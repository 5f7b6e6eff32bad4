"""Serving parts on their own: settings, uploads, labels, keys, stores (SQLite, S3), batching, Grad-CAM."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from serve_helpers import MULTI_DEFINITION, MULTI_TASKS, exercise_store, npy_bytes, tiff_bytes, upload_of

from cellclass.errors import (
    AuthenticationError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServiceError,
    StoreError,
    UnsupportedMediaError,
    UploadError,
)
from cellclass.serving.contributions import ContributionStore, readable_metadata, validate_labels
from cellclass.serving.database import Database
from cellclass.serving.files import LocalFileStore, S3FileStore, open_file_store
from cellclass.serving.keys import KeyStore
from cellclass.serving.uploads import check_filename, decode_upload


# -- settings -------------------------------------------------------------------------------
def test_settings_precedence_and_errors(tmp_path: Path) -> None:
    from cellclass.serving.settings import ServeSettings, default_state_dir

    env = {"CELLCLASS_MAX_BATCH": "7", "CELLCLASS_OPEN_PREDICT": "true", "CELLCLASS_STATE_DIR": str(tmp_path)}
    settings = ServeSettings.from_env(env, run=tmp_path, max_batch=None)
    assert settings.max_batch == 7 and settings.open_predict is True and settings.state_dir == tmp_path
    assert settings.database_url == f"sqlite:///{tmp_path.as_posix()}/cellclass.db"
    assert settings.files_url == str(tmp_path / "files")
    assert ServeSettings.from_env(env, run=tmp_path, max_batch=9).max_batch == 9
    with pytest.raises(ServiceError, match=r"max_batch \(env CELLCLASS_MAX_BATCH\): .* got 'zero'"):
        ServeSettings.from_env({"CELLCLASS_MAX_BATCH": "zero"}, run=tmp_path)
    with pytest.raises(ServiceError, match=r"backend \(env CELLCLASS_BACKEND\)"):
        ServeSettings.from_env({}, run=tmp_path, backend="tensorrt")
    assert default_state_dir({"CELLCLASS_STATE_DIR": "/srv/cc"}) == Path("/srv/cc")
    assert default_state_dir({"XDG_DATA_HOME": "/data"}) == Path("/data/cellclass")
    assert default_state_dir({}).name == "cellclass"


# -- uploads --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "error", "message"), [
    (None, UploadError, "has no file name"),
    ("../../etc/passwd.tif", UploadError, "is not a plain file name"),
    ("C:evil.tif", UploadError, "is not a plain file name"),
    ("a\x00b.tif", UploadError, "is not a plain file name"),
    ("x" * 300 + ".tif", UploadError, "over 255 characters"),
    ("photo.jpg", UnsupportedMediaError, "has extension '.jpg'"),
    ("noextension", UnsupportedMediaError, "has extension '(none)'"),
])
def test_check_filename_errors(name: str | None, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_filename(name)


def test_decode_upload_keeps_dtype_and_enforces_limits() -> None:
    array = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200
    upload = decode_upload(bytes(imagecodecs.png_encode(array)), "cell.PNG", max_bytes=10_000, max_pixels=256)
    assert upload.image.dtype == np.uint16 and upload.image.shape == (1, 16, 16) and upload.extension == ".png"
    np.testing.assert_array_equal(upload.image[0], array)
    with pytest.raises(PayloadTooLargeError, match="declares 256 pixel values .* the limit is 255"):
        decode_upload(bytes(imagecodecs.png_encode(array)), "cell.png", max_bytes=10_000, max_pixels=255)
    with pytest.raises(PayloadTooLargeError, match=r"has [\d,]+ bytes; the limit is 100 bytes"):
        decode_upload(tiff_bytes(array), "cell.tif", max_bytes=100, max_pixels=10**6)
    with pytest.raises(PayloadTooLargeError, match="declares 1,000,000 pixel values"):
        decode_upload(npy_bytes(np.zeros((1000, 1000), np.uint8)), "big.npy", max_bytes=10**7, max_pixels=10**5)
    with pytest.raises(UploadError, match="holds NaN or infinite values"):
        decode_upload(npy_bytes(np.array([[1.0, np.inf]], np.float32)), "x.npy", max_bytes=10**6, max_pixels=10**6)
    with pytest.raises(UploadError, match=r"cannot decode image .x.tif.: file is truncated"):
        decode_upload(b"II*\x00\xff\xff\xff\x7f", "x.tif", max_bytes=10**6, max_pixels=10**6)


# -- labels ---------------------------------------------------------------------------------
def test_validate_labels_multilabel_and_binary() -> None:
    labels = validate_labels({"loc": ["Rods & rings", "Nucleoli", "Nucleoli"], "bin": True}, MULTI_TASKS)
    assert labels == {"loc": ["Nucleoli", "Rods & rings"], "bin": "1"}
    assert validate_labels({"loc": [], "bin": 0}, MULTI_TASKS) == {"loc": [], "bin": "0"}
    assert validate_labels({"loc": "Nucleoli", "bin": "1"}, MULTI_TASKS)["loc"] == ["Nucleoli"]


@pytest.mark.parametrize(("labels", "message"), [
    ({"loc": ["Golgi"], "bin": "1"}, r"task 'loc' got unknown label\(s\) \['Golgi'\]; valid: Nucleoli, Golgi apparatus"),
    ({"loc": {"a": 1}, "bin": "1"}, "task 'loc' is multi-label and takes a list of class names"),
    ({"loc": [], "bin": "yes"}, "task 'bin' got unknown label 'yes'; valid: 0, 1"),
    ({"loc": [], "bin": None}, "task 'bin' takes one class name, got None"),
    ({"loc": []}, r"labels lack task\(s\) \['bin'\]"),
    (["loc"], "labels must be a non-empty JSON object"),
])
def test_validate_labels_errors(labels: object, message: str) -> None:
    with pytest.raises(UploadError, match=message):
        validate_labels(labels, MULTI_TASKS)


# -- keys and database ----------------------------------------------------------------------
def test_keys_are_hashed_and_roles_ordered(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = KeyStore(db)
    key, record = store.create("contribute", "lab")
    stored = db.query("SELECT * FROM api_keys")[0]
    assert key.split("_", 2)[2] not in json.dumps(stored) and len(stored["digest"]) == 64 and len(stored["salt"]) == 32
    assert store.verify(key, "predict").key_id == record.key_id
    assert store.verify(key, "contribute").role == "contribute"
    with pytest.raises(PermissionDeniedError, match="has role 'contribute', which may not do this; valid roles: curate"):
        store.verify(key, "curate")
    with pytest.raises(AuthenticationError, match="needs an API key with role 'predict' or above, got none"):
        store.verify(None, "predict")
    with pytest.raises(AuthenticationError, match="unknown API key"):
        store.verify(key[:-4] + "AAAA", "predict")
    with pytest.raises(ServiceError, match="unknown key role 'root'; valid: predict, contribute, curate"):
        store.create("root")
    assert store.revoke(key).revoked_at is not None  # the whole key works as well as its id
    with pytest.raises(NotFoundError, match="no API key with id 'ffffffff'; known ids: "):
        store.revoke("ffffffff")
    db.close()


def test_database_url_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h/db'; valid: sqlite:///PATH"):
        Database("mysql://u:secret@h/db")
    with pytest.raises(StoreError, match="unsupported file store 'ftp://x'; valid: a folder or s3://BUCKET/PREFIX"):
        open_file_store("ftp://x")
    with pytest.raises(StoreError, match="invalid S3 URL 's3:/x'"):
        S3FileStore("s3:/x", client=object())
    with pytest.raises(StoreError, match="invalid content address"):
        LocalFileStore(tmp_path).put("../../x", ".tif", b"")


def test_sqlite_store_round_trip(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert db.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    exercise_store(ContributionStore(db, LocalFileStore(tmp_path / "files")), tmp_path)
    db.close()


def test_failed_insert_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    files = LocalFileStore(tmp_path / "files")
    store = ContributionStore(db, files)
    dataset = store.register_dataset(MULTI_DEFINITION)
    with pytest.raises(Exception, match="FOREIGN KEY constraint failed"):  # an unknown dataset id
        store.add(upload_of(1), {"loc": [], "bin": "0"}, None, contributor="k", dataset="missing", model={})
    assert not [p for p in files.root.rglob("*") if p.is_file()]
    assert store.list()[1] == 0
    record, _ = store.add(upload_of(1), {"loc": [], "bin": "0"}, None, contributor="k", dataset=dataset, model={})
    assert files.path(record["sha256"], ".npy").is_file()
    db.close()


def test_export_refuses_mixed_datasets(tmp_path: Path) -> None:
    from cellclass.errors import ExportError

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = ContributionStore(db, LocalFileStore(tmp_path / "files"))
    for i, definition in enumerate([MULTI_DEFINITION, {**MULTI_DEFINITION, "name": "other"}]):
        ident = store.register_dataset(definition)
        record, _ = store.add(upload_of(i), {"loc": [], "bin": "0"}, None, contributor="k", dataset=ident, model={})
        store.review(record["id"], "accepted", reviewer="c")
    with pytest.raises(ExportError, match="belong to 2 datasets .*pass --dataset ID to export one"):
        store.export(tmp_path / "out")
    assert store.export(tmp_path / "out", dataset=ident).n_rows == 1
    db.close()


def test_s3_file_store_with_moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="lab")
        files = S3FileStore("s3://lab/contributions/", client=client)
        sha = "ab" * 32
        assert files.put(sha, ".tif", b"data") is True and files.put(sha, ".tif", b"data") is False
        assert files.key(sha, ".tif") == f"contributions/ab/ab/{sha}.tif"
        assert files.get(sha, ".tif") == b"data"
        files.delete(sha, ".tif")
        with pytest.raises(NotFoundError, match="is missing"):
            files.get(sha, ".tif")
        db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
        exercise_store(ContributionStore(db, files), tmp_path)
        db.close()


# -- batching -------------------------------------------------------------------------------
def test_micro_batcher_batches_concurrent_requests() -> None:
    from cellclass.serving.batching import MicroBatcher

    sizes: list[int] = []

    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        sizes.append(len(x))
        time.sleep(0.02)
        return {"sum": x.reshape(len(x), -1).sum(axis=1)}

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = MicroBatcher(infer, max_batch=8, max_wait_ms=5)
        await batcher.start()
        requests = [np.full((1 + i % 2, 1, 2, 2), i, np.float32) for i in range(20)] + [np.ones((12, 1, 2, 2), np.float32)]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in requests))
        assert batcher.stats.as_dict()["requests"] == 21
        await batcher.stop()
        return outputs

    outputs = asyncio.run(main())
    for i, out in enumerate(outputs[:20]):
        np.testing.assert_array_equal(out["sum"], np.full(1 + i % 2, 4.0 * i))
    assert outputs[20]["sum"].shape == (12,)
    assert sum(sizes) == 30 + 12 and len(sizes) < 21 and 12 in sizes  # the big request ran alone
    assert max(s for s in sizes if s != 12) <= 8


def test_micro_batcher_errors() -> None:
    from cellclass.serving.batching import MicroBatcher

    def broken(x: np.ndarray) -> dict[str, np.ndarray]:
        raise ValueError("model exploded")

    async def main() -> None:
        batcher = MicroBatcher(broken)
        with pytest.raises(RuntimeError, match="the micro-batcher is not running; call start\\(\\) first"):
            await batcher.submit(np.zeros((1, 1, 2, 2), np.float32))
        await batcher.start()
        with pytest.raises(ValueError, match="model exploded"):
            await batcher.submit(np.zeros((1, 1, 2, 2), np.float32))
        assert batcher.running
        await batcher.stop()

    asyncio.run(main())


# -- Grad-CAM -------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "size", "layer"), [("lenet5", 32, "features.4"), ("resnet18", 64, "backbone.layer4")])
def test_grad_cam_on_lenet_and_timm(name: str, size: int, layer: str) -> None:
    from cellclass.models import create_model
    from cellclass.serving.saliency import grad_cam, overlay_png, target_layer

    model = create_model(name, 2, {"a": 3}, image_size=size).eval()
    assert target_layer(model)[0] == layer
    x = np.random.default_rng(0).random((2, size, size), dtype=np.float32)
    result = grad_cam(model, x, "a")
    assert result.cam.shape == (size, size) and result.layer == layer
    assert 0.0 <= result.cam.min() and result.cam.max() <= 1.0
    assert 0.0 < result.probability < 1.0 and result.class_index in (0, 1, 2)
    assert grad_cam(model, x, "a", class_index=2).class_index == 2
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    png = imagecodecs.png_decode(overlay_png(x, result.cam))
    assert png.shape[2] == 3 and png.shape[0] >= size


def test_grad_cam_needs_a_convolution() -> None:
    import torch

    from cellclass.serving.saliency import target_layer

    with pytest.raises(UploadError, match="Grad-CAM needs a convolutional network; Sequential has no Conv2d layer"):
        target_layer(torch.nn.Sequential(torch.nn.Linear(4, 2)))


def test_sqlite_concurrent_writers(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = ContributionStore(db, LocalFileStore(tmp_path / "files"))
    dataset = store.register_dataset(MULTI_DEFINITION)
    barrier = threading.Barrier(8)

    def add(i: int) -> bool:
        if i < 8:
            barrier.wait()
        return store.add(upload_of(100 + i), {"loc": [], "bin": "1"}, None, contributor="k", dataset=dataset,
                         model={})[1]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(add, range(64)))
    assert store.list()[1] == 64
    db.close()


# -- what a fuzzer sends: values, JSON fields, durable private files -------------------------
@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((0, 8), np.float32), r"holds no pixel values \(shape \(1, 0, 8\)\); valid: an image of at least 1 x 1"),
    (np.full((4, 4), np.nan), "holds NaN or infinite values"),
    (np.full((4, 4), 1e39), r"holds float64 values up to 1e\+39 in magnitude, beyond float32's range"),
])
def test_decode_upload_refuses_images_the_model_cannot_read(array: np.ndarray, message: str) -> None:
    with pytest.raises(UploadError, match=message):
        decode_upload(npy_bytes(array), "x.npy", max_bytes=10**6, max_pixels=10**6)
    assert decode_upload(npy_bytes(np.full((4, 4), 3e38)), "x.npy", max_bytes=10**6, max_pixels=10**6).image.max() == 3e38


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 17 + "]" * 17, "the form field 'f' nests arrays and objects 17 levels deep; the limit is 16"),
    ('{"a": NaN}', "the form field 'f' holds NaN, which is not a JSON number; valid: standard JSON"),
    ('{"a": 1e400}', "holds 1e400, which overflows to infinity"),
    ('{"a": ' + "1" * 4301 + "}", "holds an integer of 4,301 digits"),
    ('{"a": "\\udc80"}', "holds a string that is not valid Unicode"),
    ('{"a": 1', r"is not valid JSON \(Expecting ',' delimiter at position 7\)"),
    ("x" * 5001, "the form field 'f' has 5,001 bytes; the limit is 5,000"),
])
def test_parse_json_field_errors(text: str, message: str) -> None:
    from cellclass.serving.contributions import parse_json_field

    with pytest.raises(UploadError, match=message):
        parse_json_field(text, "f", max_bytes=5000, required=True)


def test_parse_json_field_reads_standard_json_and_counts_depth_outside_strings() -> None:
    from cellclass.serving.contributions import json_depth, parse_json_field

    text = '{"a": [[{"b": "[[[[{{{{\\" ]"}], -1.5e300, 12345678901234567890]}'
    assert json_depth(text) == 4
    assert parse_json_field(text, "f", max_bytes=1000, required=True, max_depth=4)["a"][1:] == [
        -1.5e300, 12345678901234567890]
    assert parse_json_field("  ", "f", max_bytes=10, required=False) is None


def test_readable_metadata_cuts_only_what_is_too_deep_and_ignores_brackets_in_strings() -> None:
    within = {"a": "[[{{\" ]", "b": [1, {"c": "}"}], "big": 10**40, "e": "\u00e9"}
    assert readable_metadata(json.dumps(within)) == within
    inner = '{"s": "]}[{\\"", "n": [1, 2]}'  # brackets and an escaped quote inside a string
    text = '{"k": ' + "[" * 15 + inner + "]" * 15 + "}"
    value = readable_metadata(text)
    for _ in range(15):
        (value,) = value if isinstance(value, list) else value["k"]
    assert value == inner and json.loads(value) == {"s": ']}[{"', "n": [1, 2]}
    assert readable_metadata('{"x": NaN, "y": Infinity, "z": "\\udfff", "w": ' + "7" * 5000 + "}") == {
        "x": "NaN", "y": "Infinity", "z": "\ufffd", "w": "7" * 5000}
    assert readable_metadata("not json") == {"unparsed": "not json"}
    assert readable_metadata("[1, 2]") == {"value": [1, 2]}


def test_content_files_are_on_disk_before_their_row_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import os

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file behind a descriptor")
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = ContributionStore(db, LocalFileStore(tmp_path / "files"))
    dataset = store.register_dataset(MULTI_DEFINITION)
    real_transaction = db.transaction

    @contextlib.contextmanager
    def recording_transaction():
        with real_transaction() as tx:
            yield tx
        events.append(("commit", ""))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(db, "transaction", recording_transaction)
    upload = upload_of(11)
    store.add(upload, {"loc": [], "bin": "1"}, None, contributor="k", dataset=dataset, model={})
    path = store.files.path(upload.sha256, ".npy")
    before_commit = [name for kind, name in events[:events.index(("commit", ""))] if kind == "fsync"]
    written = [Path(name) for name in before_commit if Path(name).name.startswith(f".{path.name}.")]
    assert written and written[0].parent == path.parent  # the content, flushed under its temporary name
    folders = {Path(name) for name in before_commit}
    assert {path.parent, path.parent.parent, path.parent.parent.parent} <= folders  # the rename and new folders
    db.close()


def test_leftovers_are_removed_only_when_no_other_process_uses_the_folder(tmp_path: Path) -> None:
    import stat

    root = tmp_path / "files"
    serving = LocalFileStore(root)
    kept_sha = "a1" * 32
    assert serving.put(kept_sha, ".tif", b"II*\x00kept")
    assert serving.remove_unreferenced(lambda: {(kept_sha, ".tif")}) == []  # now held shared, as a server does
    orphan = root / "b2" / "b2" / f"{'b2' * 32}.png"
    temporary = root / "b2" / "b2" / f".{'b2' * 32}.png.x8k1.tmp"
    stray = root / "b2" / "b2" / "notes.txt"
    misplaced = root / "00" / "00" / f"{'b2' * 32}.png"  # not where this store puts that hash
    for path in (orphan, temporary, stray, misplaced):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    starting = LocalFileStore(root)
    assert starting.remove_unreferenced(lambda: {(kept_sha, ".tif")}) is None  # another server holds it
    assert orphan.exists() and temporary.exists()
    serving.close()
    starting.close()
    removed = LocalFileStore(root).remove_unreferenced(lambda: {(kept_sha, ".tif")})
    assert sorted(removed) == sorted([orphan, temporary])
    assert stray.exists() and misplaced.exists() and serving.path(kept_sha, ".tif").exists()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(serving.path(kept_sha, ".tif").stat().st_mode) == 0o600


def test_sqlite_database_is_created_private_and_an_existing_one_tightened(tmp_path: Path) -> None:
    import os
    import stat

    folder = tmp_path / "new" / "state"
    Database(f"sqlite:///{folder / 'cellclass.db'}").close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "cellclass.db").stat().st_mode) == 0o600
    os.chmod(folder / "cellclass.db", 0o644)
    db = Database(f"sqlite:///{folder / 'cellclass.db'}")
    KeyStore(db).create("predict")  # writes, so the -wal and -shm files exist
    for name in ("cellclass.db", "cellclass.db-wal", "cellclass.db-shm"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    db.close()
