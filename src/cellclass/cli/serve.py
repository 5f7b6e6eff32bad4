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
    run: Annotated[Path, typer.Argument(help="Run folder (or .ckpt file) to serve.")],
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
    max_field_objects: Annotated[int | None, typer.Option(
        "--max-field-objects", min=1, help="Most objects in a field sent to /v1/fields (default 1000).")] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")] = False,
) -> None:
    """Serve a trained run over HTTP: predictions, contributions, a web page (/) and API docs (/docs)."""
    import uvicorn

    from cellclass.serving.app import create_app
    from cellclass.serving.settings import ServeSettings

    settings = ServeSettings.from_env(
        run=run, state_dir=state_dir, database=database, files=files, onnx=onnx, backend=backend,
        open_predict=open_predict, tta=tta, threads=threads, max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_upload_bytes=None if max_upload_mb is None else int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
        max_field_objects=max_field_objects,
    )
    from cellclass.inference.checkpoint import Checkpoint

    Checkpoint.load(settings.run)  # a clear error now rather than a traceback from the server's start-up
    console.print(f"serving {run} on http://{host}:{port} (web page /, API docs /docs); state in {settings.state_dir}",
                  highlight=False)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=access_log,
                timeout_graceful_shutdown=10)


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
    format_: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default RUN/model.onnx).")] = None,
    opset: Annotated[int, typer.Option("--opset", min=7, help="ONNX opset.")] = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="auto, dynamo or legacy.")] = "auto",
) -> None:
    """Export a run's network for serving elsewhere (ONNX: normalized (N, C, S, S) in, logits per task out)."""
    from cellclass.errors import ExportError
    from cellclass.inference.onnx import export_onnx

    if format_ != "onnx":
        raise ExportError(f"unknown export format {format_!r}; valid: onnx")
    path = export_onnx(run, out, opset=opset, exporter=exporter)
    console.print(f"exported {run} to {path} ({path.stat().st_size:,} bytes); serve it with "
                  f"`cellclass serve {run} --onnx {path}`", highlight=False)
