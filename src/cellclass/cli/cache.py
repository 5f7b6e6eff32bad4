"""Data-path commands: prepare (the image cache) and fetch (public datasets from S3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cellclass.cli.app import app
from cellclass.cli.options import DatasetOptions, SpecArg, takes_options
from cellclass.cli.output import console, stage_progress
from cellclass.errors import CellclassError

fetch_app = typer.Typer(help="Download public datasets (anonymous S3) and write a ready spec.", no_args_is_help=True)
app.add_typer(fetch_app, name="fetch")


def _numbers(option: str, text: str | None, kind: type = float) -> list:
    """Parse a comma-separated option such as ``--doses 0.82,1.0``."""
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CellclassError(f"{option} {text!r} is invalid; valid: comma-separated numbers, e.g. 4,24") from None


@app.command()
@takes_options
def prepare(
    spec: SpecArg,
    dataset: DatasetOptions,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Side of the square images stored.")] = 64,
    fit: Annotated[str, typer.Option("--fit", help="pad, resize or crop.")] = "pad",
    channels: Annotated[str | None, typer.Option("--channels", help="Channel indices to keep, e.g. 0,2 (default: all).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="keep (the files' integer dtype) or float32.")] = "keep",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Cache folder (default: $CELLCLASS_CACHE_DIR, "
                                                                      "else .cellclass-cache/ beside the manifest).")] = None,
    hash_: Annotated[str, typer.Option("--hash", help="Fingerprint sources by stat (size + mtime) or content.")] = "stat",
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even when the cache is up to date.")] = False,
) -> None:
    """Decode every image once into a memory-mapped cache that train, evaluate and cv then read.

    The cache is keyed by the source files (path, size, mtime or content) and the settings:
    running the same command again reuses it, a changed image or setting rebuilds it. An
    interrupted prepare resumes where it stopped.
    """
    from cellclass.data.cache import CacheSettings, prepare_cache

    ds = dataset.to_spec(spec)
    chosen = tuple(int(c) for c in _numbers("--channels", channels, int)) or None
    settings = CacheSettings(image_size, fit, chosen, dtype, hash_)
    with stage_progress() as update:
        cache = prepare_cache(ds, settings, cache_dir=cache_dir, workers=workers, progress=update, rebuild=rebuild)
    meta = cache.meta
    shape = "x".join(map(str, meta["shape"]))
    verb = "built" if cache.built else "up to date, reused"
    if cache.resumed_from:
        verb += f" (resumed at row {cache.resumed_from})"
    size_mb = (cache.path / "images.npy").stat().st_size / 2**20
    console.print(f"cache {verb}: {shape} {meta['dtype']} ({size_mb:.1f} MB) in {cache.path}")
    console.print("train, evaluate and cv with the same --image-size, fit and channels read it automatically"
                  + ("" if cache_dir is None else f" (with --set cache_dir={cache_dir})"))


@fetch_app.command("bps")
def fetch_bps_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (TIFFs, meta.csv, cellclass.yaml).")],
    hours: Annotated[str | None, typer.Option("--hours", help="Hours after exposure to keep, e.g. 4 or 4,24.")] = None,
    doses: Annotated[str | None, typer.Option("--doses", help="Doses (Gy) to keep, e.g. 0.82,1.0.")] = None,
    particles: Annotated[str | None, typer.Option("--particles", help="Particle types to keep, e.g. Fe,X-ray.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N images, evenly spread over the selection.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel downloads.")] = 8,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="Another S3 endpoint (mirror, local server).")] = None,
    bucket: Annotated[str, typer.Option("--bucket", help="Bucket name.")] = "nasa-bps-training-data",
    prefix: Annotated[str, typer.Option("--prefix", help="Folder of meta.csv and the images.")] = "Microscopy/train",
    retries: Annotated[int, typer.Option("--retries", min=0, help="Further attempts after a transient failure.")] = 4,
) -> None:
    """Download the NASA BPS microscopy benchmark (anonymous S3) and write a ready bps spec.

    Files are checked (size against the listing, decodable TIFF) and written atomically;
    running the command again skips the files already complete, so an interrupted
    download resumes. Exits 1 when a file could not be retrieved intact.
    """
    from cellclass.data.fetch import fetch_bps

    chosen = [p.strip() for p in particles.split(",") if p.strip()] if particles else None
    with stage_progress() as update:
        result = fetch_bps(out, hours=_numbers("--hours", hours), doses=_numbers("--doses", doses),
                           particles=chosen, limit=limit, workers=workers, endpoint_url=endpoint_url,
                           bucket=bucket, prefix=prefix, retries=retries, progress=update)
    console.print(f"{result.selected} image(s) selected: {result.downloaded} downloaded "
                  f"({result.bytes_downloaded / 2**20:.1f} MB), {result.skipped} already complete")
    if result.problems:
        table = Table(title=f"{len(result.problems)} file(s) not retrieved intact (not kept)")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for p in result.problems:
            table.add_row(p.filename, p.reason)
        console.print(table)
    console.print(f"spec written to {result.spec}; next: cellclass validate {result.spec}")
    if not result.ok:
        raise typer.Exit(1)
