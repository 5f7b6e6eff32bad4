"""Serving commands: serve, keys, contributions, export."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cellclass.cli.app import app
from cellclass.cli.output import console

keys_app = typer.Typer(help="API keys of the prediction service (stored hashed).", no_args_is_help=True)
contributions_app = typer.Typer(help="Contributed labelled images: list, export for training.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(contributions_app, name="contributions")

StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Service state folder (default $CELLCLASS_STATE_DIR, else a per-user data folder)."),
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option("--database", help="Database URL: sqlite:///PATH or postgresql://USER@HOST/DB "
                                    "(default $CELLCLASS_DATABASE, else SQLite in the state folder)."),
]
FilesOpt = Annotated[
    str | None,
    typer.Option("--files", help="Contributed files: a folder or s3://BUCKET/PREFIX "
                                 "(default $CELLCLASS_FILES, else STATE_DIR/files)."),
]


@contextmanager
def _database(state_dir: Path | None, database: str | None) -> Iterator[tuple[Any, Any]]:
    """The service's database (closed after use) and the settings that name it."""
    from cellclass.serving.database import Database
    from cellclass.serving.settings import ServeSettings

    settings = ServeSettings.from_env(run=Path("."), state_dir=state_dir, database=database)
    db = Database(settings.database_url)
    try:
        yield db, settings
    finally:
        db.close()


@contextmanager
def _contributions(state_dir: Path | None, database: str | None, files: str | None) -> Iterator[Any]:
    """The contribution store of the service's database and files."""
    from cellclass.serving.contributions import ContributionStore
    from cellclass.serving.files import open_file_store

    with _database(state_dir, database) as (db, settings):
        yield ContributionStore(db, open_file_store(files or settings.files_url))


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="Run folder (or .ckpt file) to serve, or an MLflow model made by "
                                             "cellclass: models:/NAME/VERSION, runs:/RUN_ID/model.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    state_dir: StateDirOpt = None,
    database: DatabaseOpt = None,
    files: FilesOpt = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="Exported model to run with ONNX Runtime "
                                                             "(default: RUN/model.onnx when present and current).")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="auto, torch or onnx.")] = None,
    open_predict: Annotated[bool | None, typer.Option("--open-predict/--no-open-predict",
                                                      help="Allow predictions without a key.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="D4 test-time augmentation (default: the run's).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Inference threads (default: all cores).")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="Most images per batched forward pass.")] = None,
    max_wait_ms: Annotated[float | None, typer.Option("--max-wait-ms", min=0, help="Longest wait to fill a batch.")] = None,
    max_upload_mb: Annotated[float | None, typer.Option("--max-upload-mb", min=0.001, help="Largest image file, MiB.")] = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", min=1, help="Largest image, pixel values (H x W x C).")] = None,
    queue: Annotated[Path | None, typer.Option("--queue", help="Ranking CSV (from `cellclass rank`) to label "
                                                               "in the web page, one image at a time.")] = None,
    pool: Annotated[Path | None, typer.Option("--pool", help="Folder the ranking's relative image paths are under "
                                                             "(default: the CSV's folder).")] = None,
    max_field_objects: Annotated[int | None, typer.Option(
        "--max-field-objects", min=1, help="Most objects in a field sent to /v1/fields (default 1000).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")] = False,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow store holding a models:/ RUN "
                                                     "(default $MLFLOW_TRACKING_URI, else ./mlflow.db).")] = None,
) -> None:
    """Serve a trained run over HTTP: predictions, contributions, a labelling queue, a web page (/) and API docs (/docs)."""
    import uvicorn

    from cellclass.serving.app import create_app
    from cellclass.serving.settings import ServeSettings
    from cellclass.tracking.mlflow_model import is_model_uri

    source = str(run)
    if is_model_uri(source):
        run = _resolve_mlflow_model(source, state_dir, tracking_uri)

    settings = ServeSettings.from_env(
        run=run, state_dir=state_dir, database=database, files=files, onnx=onnx, backend=backend,
        open_predict=open_predict, tta=tta, threads=threads, max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_upload_bytes=None if max_upload_mb is None else int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
        queue=queue, pool=pool,
        max_field_objects=max_field_objects,
    )
    from cellclass.inference.checkpoint import Checkpoint
    from cellclass.serving.labelling import read_ranking

    # Clear errors now rather than a traceback from the server's start-up.
    checkpoint = Checkpoint.load(settings.run)
    if settings.queue is not None:
        items = read_ranking(settings.queue, settings.queue_pool, [e.to_dict() for e in checkpoint.encoders.values()])
        console.print(f"labelling queue: {len(items)} image(s) from {settings.queue} (pool {settings.queue_pool})",
                      highlight=False)
    console.print(f"serving {source} on http://{host}:{port} (web page /, API docs /docs); state in "
                  f"{settings.state_dir}", highlight=False)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=access_log,
                timeout_graceful_shutdown=10)


def _resolve_mlflow_model(uri: str, state_dir: Path | None, tracking_uri: str | None) -> Path:
    """The checkpoint of an MLflow model, downloaded into STATE_DIR/mlflow-models/."""
    from cellclass.serving.settings import ServeSettings
    from cellclass.tracking.mlflow_model import model_folder_name, resolve_model_uri

    state = ServeSettings.from_env(run=Path("."), state_dir=state_dir).state_dir
    checkpoint = resolve_model_uri(uri, state / "mlflow-models" / model_folder_name(uri), tracking_uri=tracking_uri)
    console.print(f"{uri} resolved to {checkpoint}", highlight=False)
    return checkpoint


@app.command()
def register(
    run: Annotated[Path, typer.Argument(help="Run folder trained with the MLflow tracker.")],
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow store (default: the one the run "
                                                     "was tracked in, from RUN/tracking.json).")] = None,
) -> None:
    """Register a run's MLflow model by name (a new version each time); prints its models:/ URI.

    A run trained with --no-log-model gets its model logged first.
    """
    from cellclass.tracking.mlflow_model import register_run

    done = register_run(run, name, tracking_uri=tracking_uri)
    console.print(f"registered {run} as {name} version {done.version}: {done.uri} in {done.store}", highlight=False)
    console.print(f"serve it with: cellclass serve {done.uri} --tracking-uri {done.store}", highlight=False)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option("--role", help="predict, contribute or curate.")],
    name: Annotated[str, typer.Option("--name", help="Who or what holds the key.")] = "",
    state_dir: StateDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Make an API key; the key is printed once, as the last line (only its hash is stored)."""
    from cellclass.serving.keys import KeyStore

    with _database(state_dir, database) as (db, settings):
        key, record = KeyStore(db).create(role, name)
    console.print(f"created {record.role} key {record.key_id}" + (f" ({name})" if name else "")
                  + f" in {settings.database_url}; it is shown once:", highlight=False)
    typer.echo(key)


@keys_app.command("list")
def keys_list(state_dir: StateDirOpt = None, database: DatabaseOpt = None) -> None:
    """List API keys (ids, roles, names, times; never the keys)."""
    from cellclass.serving.keys import KeyStore

    with _database(state_dir, database) as (db, _):
        keys = KeyStore(db).list()
    table = Table()
    for column in ("key id", "role", "name", "created", "revoked"):
        table.add_column(column)
    for k in keys:
        table.add_row(k.key_id, k.role, k.name, k.created_at, k.revoked_at or "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (8 hex digits) or the whole key.")],
    state_dir: StateDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Revoke an API key; it stops working at once."""
    from cellclass.serving.keys import KeyStore

    with _database(state_dir, database) as (db, _):
        record = KeyStore(db).revoke(key_id)
    console.print(f"revoked {record.role} key {record.key_id} at {record.revoked_at}", highlight=False)


@contributions_app.command("list")
def contributions_list(
    status: Annotated[str | None, typer.Option("--status", help="pending, accepted or rejected.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    state_dir: StateDirOpt = None,
    database: DatabaseOpt = None,
    files: FilesOpt = None,
) -> None:
    """List contributions, oldest first."""
    with _contributions(state_dir, database, files) as store:
        items, total = store.list(status=status, limit=limit)
    table = Table(title=f"{total} contribution(s)" + (f" {status}" if status else ""))
    for column in ("id", "status", "labels", "file", "contributor", "created"):
        table.add_column(column)
    for r in items:
        table.add_row(r["id"], r["status"], ", ".join(f"{k}={v}" for k, v in r["labels"].items()), r["filename"],
                      r["contributor"], r["created_at"])
    console.print(table)


@contributions_app.command("export")
def contributions_export(
    out: Annotated[Path, typer.Option("--out", help="Folder for images/, manifest.csv and dataset.yaml.")],
    status: Annotated[str, typer.Option("--status", help="Which contributions: accepted, pending or rejected.")] = "accepted",
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset id, when several models collected contributions.")] = None,
    state_dir: StateDirOpt = None,
    database: DatabaseOpt = None,
    files: FilesOpt = None,
) -> None:
    """Write contributions as a dataset `cellclass train` reads (accepted ones by default)."""
    with _contributions(state_dir, database, files) as store:
        result = store.export(out, status=status, dataset=dataset)
    console.print(f"{result.n_rows} {status} contribution(s), {result.n_images} image(s) written to {result.out}: "
                  f"{result.manifest.name}, {result.spec.name}", highlight=False)
    console.print(f"train on them with: cellclass train {result.spec} --out RUN", highlight=False)


@app.command("export")
def export_model(
    run: Annotated[Path, typer.Argument(help="Run folder (or .ckpt file).")],
    format_: Annotated[str, typer.Option("--format", help="Export format: onnx or bioimageio.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="Output: an .onnx file (default RUN/model.onnx), or the "
                                                           "package folder (default RUN/bioimageio; its zip goes "
                                                           "beside it).")] = None,
    opset: Annotated[int, typer.Option("--opset", min=7, help="ONNX opset.")] = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="ONNX exporter: auto, dynamo or legacy.")] = "auto",
    license_: Annotated[str | None, typer.Option("--license", help="bioimageio: SPDX licence of the model "
                                                                  "(required), e.g. CC-BY-4.0, MIT.")] = None,
    author: Annotated[list[str] | None, typer.Option("--author", help="bioimageio: an author's name (at least one; "
                                                                      "repeatable).")] = None,
    cite: Annotated[list[str] | None, typer.Option("--cite", help="bioimageio: a citation, 'TEXT DOI' or 'TEXT "
                                                                  "URL' (repeatable).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="bioimageio: model name (default: cellclass MODEL "
                                                            "DATASET).")] = None,
    description: Annotated[str | None, typer.Option("--description", help="bioimageio: description (default: "
                                                                          "made from the run's metrics).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="bioimageio: a tag to add (repeatable).")] = None,
    test_image: Annotated[Path | None, typer.Option("--test-image", help="bioimageio: image for the test tensors "
                                                                        "(default: one of the run's test split).")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="bioimageio: D4 test-time augmentation in the "
                                                                    "graph (default: the run's).")] = None,
    zip_: Annotated[bool, typer.Option("--zip/--no-zip", help="bioimageio: also write OUT.zip.")] = True,
    check: Annotated[bool, typer.Option("--check/--no-check", help="bioimageio: run bioimageio.core's model test "
                                                                   "on the package.")] = True,
) -> None:
    """Export a run's network for use elsewhere: onnx or a bioimage.io model package.

    onnx: normalized (N, C, S, S) in, logits per task out, for `cellclass serve --onnx`.

    bioimageio: a model package in the bioimage.io format (spec 0.5: rdf.yaml, TorchScript and
    ONNX weights, test tensors from a real test image, probabilities per task), written as a
    folder and a zip and tested with bioimageio.core; needs pip install 'cellclass\\[bioimageio]'.
    See docs/export.md for what bioimageio.core, ilastik, deepImageJ and QuPath do with it.
    """
    from cellclass.errors import ExportError
    from cellclass.inference.onnx import export_onnx

    if format_ == "bioimageio":
        _export_bioimageio(run, out, license_, author or [], cite or [], name, description, tag or [], test_image,
                           tta, opset, exporter, zip_, check)
        return
    if format_ != "onnx":
        raise ExportError(f"unknown export format {format_!r}; valid: onnx, bioimageio")

    path = export_onnx(run, out, opset=opset, exporter=exporter)
    console.print(f"exported {run} to {path} ({path.stat().st_size:,} bytes); serve it with "
                  f"`cellclass serve {run} --onnx {path}`", highlight=False)


def _export_bioimageio(run: Path, out: Path | None, license_: str | None, authors: list[str], cite: list[str],
                       name: str | None, description: str | None, tags: list[str], test_image: Path | None,
                       tta: bool | None, opset: int, exporter: str, zip_: bool, check: bool) -> None:
    """Write a bioimage.io package and, when asked, test it with bioimageio.core."""
    from cellclass.errors import ModelPackageError
    from cellclass.serving.bioimageio import (
        PackageInfo,
        check_package,
        export_bioimageio,
        failed_checks,
    )

    info = PackageInfo(license=license_, authors=authors, cite=cite, name=name, description=description, tags=tags)
    package = export_bioimageio(run, out, info, test_image=test_image, tta=tta, opset=opset, exporter=exporter,
                                zip_package=zip_)
    console.print(f"bioimage.io package of {run} written to {package.folder}"
                  + (f" and {package.zip} ({package.zip.stat().st_size:,} bytes)" if package.zip else "")
                  + f"; outputs {', '.join(package.outputs)}; preprocessing "
                  + (", ".join(package.preprocessing) or "none"), highlight=False)
    if not check:
        return
    summary = check_package(package.folder)
    if summary.status != "passed":
        raise ModelPackageError(f"the package at {package.folder} failed bioimageio.core's model test: "
                                + (" | ".join(failed_checks(summary)) or summary.status))
    console.print(f"bioimageio.core's model test passed (weights: {', '.join(package.weights)})", highlight=False)
