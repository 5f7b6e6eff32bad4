"""Field commands: segment (fields to label images), crops (fields to single cells),
simulate hpa-fields (fields with their true cells)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cellclass.cli.app import app, simulate_app
from cellclass.cli.options import DatasetOptions, SpecArg, option_name, takes_options
from cellclass.cli.output import console, stage_progress

_WEIGHTED_BACKENDS = {"cellpose": "a Cellpose model file", "stardist": "a StarDist model folder (config.json + weights)"}
_BACKENDS = ("skimage", *_WEIGHTED_BACKENDS)
_QC_SHOWN = 10  # flagged fields listed by name; fields_qc.csv holds them all


@simulate_app.command("hpa-fields")
def simulate_hpa_fields_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (train.csv, train/ PNGs, masks/, nuclei/, cells_truth.csv).")],
    n_fields: Annotated[int, typer.Option("--n-fields", min=1, help="Number of fields to write.")] = 20,
    size: Annotated[int, typer.Option("--size", min=128, help="Side of every field, in pixels.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Rendering processes (the output does not depend on it).")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write over a train.csv already in OUT.")] = False,
) -> None:
    """Simulate HPA fields of view (4 PNGs per field) whose cells each show a subset of the field's labels,
    with the true cell and nucleus masks and every cell's labels."""
    from cellclass.data.simulate_hpa_fields import simulate_hpa_fields

    with stage_progress() as update:
        manifest = simulate_hpa_fields(out, n_fields=n_fields, size=size, seed=seed, workers=workers,
                                       progress=update, overwrite=overwrite)
    with open(out / "cells_truth.csv") as handle:
        n_cells = sum(1 for _ in handle) - 1
    console.print(f"wrote {n_fields} fields of {size} x {size} ({n_cells} cells) and {manifest}; true cell masks "
                  f"in {out / 'masks'}, nuclei in {out / 'nuclei'}, per-cell labels in {out / 'cells_truth.csv'}")
    console.print(f"next: cellclass segment {_quote(out)} --preset hpa --cell-channel red --out SEG "
                  f"(or crops straight from the true masks: cellclass crops {_quote(out)} --preset hpa "
                  f"--masks {_quote(out)} --out CELLS)")


@app.command()
@takes_options
def segment(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder: masks/<field key>.tif per field, masks.csv, "
                                                    "segment.json.", show_default=False)],
    dataset: DatasetOptions,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="skimage (the default: threshold and watershed, no weights, no download), cellpose or "
                          "stardist (on --weights you have).", show_default=False)] = None,
    masks: Annotated[str | None, typer.Option(
        "--masks", help="Use masks you already have instead of a backend: the mask file of each field as a "
                        "pattern of {stem}, {name}, {suffix} and {parent} of the field's file (of a channel set: "
                        "its prefix, train/abc for train/abc_red.png), relative to the field's folder, e.g. "
                        "'../masks/{stem}.tif'.", show_default=False)] = None,
    nucleus_channel: Annotated[str | None, typer.Option(
        "--nucleus-channel", help="Channel of the nuclear stain, an index or a name (default: the channel named "
                                  "dapi, hoechst, dna, nuclei, nucleus, h2b or blue, else 0).",
        show_default=False)] = None,
    cell_channel: Annotated[str | None, typer.Option(
        "--cell-channel", help="A cytoplasm or membrane channel (index or name): whole cells are grown from the "
                               "nuclei on it and written to masks/, the nuclei to nuclei/.",
        show_default=False)] = None,
    membrane: Annotated[bool, typer.Option(
        "--membrane", help="The --cell-channel marks membranes (bright between cells), not cytoplasm.")] = False,
    max_distance: Annotated[float | None, typer.Option(
        "--max-distance", min=0.0, help="Cells reach at most this many pixels from their nucleus (default: as far "
                                        "as the cell channel's foreground).", show_default=False)] = None,
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="With --backend cellpose: a Cellpose model file; stardist: a StarDist model folder. It "
                          "must exist: cellclass never downloads weights.", show_default=False)] = None,
    diameter: Annotated[float | None, typer.Option(
        "--diameter", min=1.0, help="With --backend cellpose: the nucleus diameter in pixels (default: the "
                                    "model's).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Processes segmenting fields in parallel (cellpose and stardist run in one).")] = 1,
) -> None:
    """Write one uint16 label image per field (0 background, objects 1..N): nuclei, or whole cells with --cell-channel.

    Masks go to OUT/masks/<field key>.tif, the field key being the field's image path under
    the image root less its extension (a01.tif: masks/a01.tif; plate1/a01.tif:
    masks/plate1/a01.tif), and OUT/masks.csv lists every field with its object count.
    Running the same command again skips the fields already segmented with the same
    settings, so an interrupted run resumes. `cellclass crops DATA --masks OUT` reads OUT.
    """
    from cellclass.data.masks import resolve_channel, segment_fields
    from cellclass.data.segment import CellParams
    from cellclass.errors import SegmentationError

    name = _backend_name(backend, masks, weights, diameter)
    if cell_channel is None and (membrane or max_distance is not None):
        given = "--membrane" if membrane else "--max-distance"
        raise SegmentationError(f"{given} shapes the cells grown on --cell-channel, which was not given; valid: "
                                f"--cell-channel CHANNEL with it")
    if name == "masks" and nucleus_channel is not None:
        raise SegmentationError("--nucleus-channel chooses the channel a backend segments; --masks reads the masks "
                                "you have as they are; valid: --masks PATTERN without --nucleus-channel")
    ds = dataset.to_spec(spec)
    ds.load_manifest()  # a bad manifest fails before a model is loaded
    nucleus = resolve_channel(ds, nucleus_channel, "--nucleus-channel")
    cells = None if cell_channel is None else resolve_channel(ds, cell_channel, "--cell-channel")
    if cells is not None and cells == nucleus and masks is None:
        raise SegmentationError(f"--cell-channel {cell_channel!r} is the nucleus channel ({nucleus}); valid: a "
                                f"cytoplasm or membrane channel other than the nuclear stain")
    chosen = _make_backend(name, masks, weights, diameter, nucleus)
    params = None if cells is None else CellParams(membrane=membrane, max_distance=max_distance)
    with stage_progress() as update:
        result = segment_fields(ds, chosen, out, cell_channel=cells, cell_params=params, workers=workers,
                                progress=update)

    _print_segmentation(result, name, masks, nucleus, cells, ds.image.channel_names or [])
    console.print(f"masks in {out / 'masks'}" + (f", nuclei in {out / 'nuclei'}" if result.cells else "")
                  + f"; one row per field in {out / 'masks.csv'}")
    console.print(f"next: cellclass crops {_quote(spec)}{_dataset_args(dataset)} --masks {_quote(out)} --out CELLS")


@app.command()
@takes_options
def crops(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder: crops/, cells.csv, cells.yaml, fields_qc.csv.",
                                      show_default=False)],
    dataset: DatasetOptions,
    masks: Annotated[Path | None, typer.Option(
        "--masks", help="The output folder of `cellclass segment` (masks/<field key>.tif per field; its masks/ "
                        "folder itself is taken too).", show_default=False)] = None,
    size: Annotated[int | None, typer.Option(
        "--size", min=1, help="Side of the square crops, centred on each object (default: 64).",
        show_default=False)] = None,
    mask_neighbours: Annotated[bool, typer.Option(
        "--mask-neighbours", help="Set the pixels of other objects in a crop to 0.")] = False,
    mask_background: Annotated[bool, typer.Option(
        "--mask-background", help="Keep only the object's own pixels (neighbours and background become 0).")] = False,
    border: Annotated[str, typer.Option(
        "--border", help="Objects whose crop runs past the field's edge: skip, or pad.")] = "skip",
    pad: Annotated[str, typer.Option(
        "--pad", help="With --border pad: zero, or reflect (the field mirrored at its edge).")] = "zero",
    min_area: Annotated[int, typer.Option("--min-area", min=0, help="Skip objects of fewer pixels.")] = 1,
    max_area: Annotated[int | None, typer.Option(
        "--max-area", min=1, help="Skip objects of more pixels (default: no limit).", show_default=False)] = None,
    min_objects: Annotated[int, typer.Option(
        "--min-objects", min=0,
        help="QC: a field with fewer objects (or fewer than a quarter of the median field's) is flagged too_few.",
    )] = 1,
    max_objects: Annotated[int | None, typer.Option(
        "--max-objects", min=1, show_default=False,
        help="QC: a field with more objects (or more than 4 x the median field's) is flagged too_many.",
    )] = None,
    grid: Annotated[str | None, typer.Option(
        "--grid", help="Cut montages (imaging flow cytometry exports) into tiles of this side, or HxW (40, 40x32), "
                       "instead of cropping around masked objects.", show_default=False)] = None,
    order: Annotated[str, typer.Option(
        "--order", help="With --grid: tiles numbered along rows (row) or down columns (column).")] = "row",
    keep_empty: Annotated[bool, typer.Option(
        "--keep-empty", help="With --grid: keep the constant padding tiles.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Processes cutting fields in parallel.")] = 1,
) -> None:
    """Cut every field into single-cell crops and write their dataset (cells.yaml), which every command reads.

    Each row of cells.csv holds every column of its field's row (labels, plate, well ...),
    then the object id (its label value), centroid, area, bounding box, the field_id group,
    the crop's path and the field's QC flag. cells.yaml declares the field's tasks and, as
    groups, the field's groups then field_id: training on it keeps all cells of a field on
    one side. Crops keep the file's dtype. Running the same command again skips the fields
    already cut with the same settings, so an interrupted run resumes.
    """
    from cellclass.data.crops import QcThresholds, make_crops, make_grid_crops
    from cellclass.errors import CropError

    qc = QcThresholds(min_objects=min_objects, max_objects=max_objects)
    if grid is not None:
        _refuse_with_grid({"--masks": masks is not None, "--size": size is not None,
                           "--mask-neighbours": mask_neighbours, "--mask-background": mask_background,
                           "--border": border != "skip", "--pad": pad != "zero", "--min-area": min_area != 1,
                           "--max-area": max_area is not None})
        tile = _tile(grid)
        ds = dataset.to_spec(spec)
        with stage_progress() as update:
            result = make_grid_crops(ds, out, tile, skip_empty=not keep_empty, order=order, qc=qc, workers=workers,
                                     progress=update)
        console.print(_done_text(result, f"tiles of {tile[0]} x {tile[1]}", "montages"))
    else:
        if masks is None:
            raise CropError("no --masks given; valid: --masks SEG, the output folder of `cellclass segment`, or "
                            "--grid TILE to cut montages into tiles")
        folder = _mask_folder(masks)
        ds = dataset.to_spec(spec)
        size = 64 if size is None else size
        with stage_progress() as update:
            result = make_crops(ds, folder, out, size, mask_neighbours=mask_neighbours,
                                mask_background=mask_background, border=border, pad=pad, min_area=min_area,
                                max_area=max_area, qc=qc, workers=workers, progress=update)
        console.print(_done_text(result, f"crops of {size} x {size}", "fields"))
    _print_qc(result)
    side_of = size if grid is None else (tile[0] if tile[0] == tile[1] else None)
    _print_crops_next(result, out, grid is not None, side_of)


# -- helpers ---------------------------------------------------------------------------------


def _refuse_with_grid(cell_only: dict[str, bool]) -> None:
    """Refuse the options of crops around objects given with --grid."""
    from cellclass.errors import CropError

    given = [option for option, is_given in cell_only.items() if is_given]
    if given:
        raise CropError(f"--grid cuts montages into tiles and takes no {', '.join(given)}; valid: --grid with "
                        f"--order and --keep-empty, or crops around masked objects without --grid")


def _print_crops_next(result: Any, out: Path, grid: bool, side: int | None) -> None:
    """What cells.csv holds, and the commands that read it."""
    console.print(f"cells.csv: every field column, then {'tile' if grid else 'object'} id"
                  f"{'' if grid else ', centroid, area'} and field_id; its dataset: {out / 'cells.yaml'}")
    groups = _spec_groups(result.spec)
    split = f"split by {groups[0]}" + (": every cell of a field on one side" if groups[0] == "field_id" else
                                       ": every field of a group on one side")
    size_arg = "" if side is None else f" --image-size {side}"
    console.print(f"next: cellclass validate {_quote(out / 'cells.yaml')}")
    console.print(f"next: cellclass train {_quote(out / 'cells.yaml')} --model lenet5{size_arg} --out RUN ({split})")


def _make_backend(name: str, masks: str | None, weights: Path | None, diameter: float | None, nucleus: int) -> Any:
    """The segmentation backend of the checked options."""
    from cellclass.data.segment import make_backend

    if name == "masks":
        return make_backend("masks", pattern=masks)
    if name == "skimage":
        return make_backend("skimage", channel=nucleus)
    if name == "cellpose":
        return make_backend("cellpose", weights=weights, channel=nucleus, diameter=diameter)
    return make_backend("stardist", weights=weights, channel=nucleus)


def _print_segmentation(result: Any, name: str, masks: str | None, nucleus: int, cells: int | None,
                        channels: list[str]) -> None:
    """The table of objects per field, and where they came from."""
    what = "cells" if result.cells else ("objects" if name == "masks" else "nuclei")
    source = f"masks of the pattern {masks!r}" if name == "masks" else \
        f"nuclei by {name} on channel {_channel_text(nucleus, channels)}"
    if cells is not None:
        source += f", cells grown on channel {_channel_text(cells, channels)}"
    stats = result.stats()
    table = Table(title=f"{what} per field: {source}")
    for column in ("fields", "segmented now", "already done", what, "min", "median", "max", "empty fields"):
        table.add_column(column, justify="right")
    table.add_row(str(result.n_fields), str(result.n_processed), str(result.n_fields - result.n_processed),
                  str(result.total), *(f"{stats[k]:g}" for k in ("min", "median", "max")), str(result.n_empty))
    console.print(table)



def _backend_name(backend: str | None, masks: str | None, weights: Path | None, diameter: float | None) -> str:
    """The backend asked for, with the options that go with it checked."""
    from cellclass.errors import SegmentationError

    if backend is not None and backend not in _BACKENDS:
        raise SegmentationError(f"--backend {backend!r} is unknown; valid: {', '.join(_BACKENDS)} (or --masks "
                                f"PATTERN for masks you have)")
    if masks is not None:
        if backend is not None:
            raise SegmentationError(f"--masks and --backend {backend} both given; valid: one of them (--masks "
                                    f"reads masks you have, --backend makes them)")
        if weights is not None or diameter is not None:
            raise SegmentationError("--weights and --diameter apply to --backend cellpose or stardist, not to "
                                    "--masks; valid: --masks PATTERN alone")
        return "masks"
    name = backend or "skimage"
    if name in _WEIGHTED_BACKENDS and weights is None:
        raise SegmentationError(f"--backend {name} needs --weights: {_WEIGHTED_BACKENDS[name]} on disk (cellclass "
                                f"never downloads weights); valid: --backend {name} --weights PATH, or the default "
                                f"--backend skimage, which needs none")
    if name not in _WEIGHTED_BACKENDS and weights is not None:
        raise SegmentationError(f"--weights is given but --backend {name} takes none; valid: --weights with "
                                f"--backend cellpose or stardist")
    if name != "cellpose" and diameter is not None:
        raise SegmentationError(f"--diameter applies to --backend cellpose, not {name}; valid: --backend cellpose "
                                f"--weights PATH --diameter D")
    return name


def _mask_folder(path: Path) -> Path:
    """The segmentation output folder (holding masks/) that ``--masks`` names."""
    from cellclass.errors import CropError

    if (path / "masks").is_dir():
        return path
    if path.name == "masks" and path.is_dir():
        return path.parent
    valid = "valid: the output folder of `cellclass segment`, holding masks/<field key>.tif for every field"
    if not path.exists():
        raise CropError(f"--masks {str(path)!r} does not exist; {valid}")
    raise CropError(f"--masks {str(path)!r} holds no masks/ folder; {valid}")


def _tile(text: str) -> tuple[int, int]:
    """``--grid``: one side (``40``) or ``HxW`` (``40x32``)."""
    from cellclass.errors import CropError

    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) < 1:
        raise CropError(f"--grid {text!r} is invalid; valid: a tile side in pixels, or HEIGHTxWIDTH, e.g. 40 or 40x32")
    return (sides[0], sides[-1])


def _print_qc(result: Any) -> None:
    """The fields' QC flags: counts, and the flagged fields by name."""
    import pandas as pd

    qc = pd.read_csv(result.fields_qc, dtype={"field_id": str}, keep_default_na=False)
    counts = qc["qc"].value_counts()
    console.print("fields QC: " + ", ".join(f"{flag} {int(counts.get(flag, 0))}" for flag in ("ok", "too_few", "too_many"))
                  + " (per field counts in fields_qc.csv)")
    flagged = qc[qc["qc"] != "ok"]
    if not len(flagged):
        return
    table = Table(title=f"{len(flagged)} field(s) flagged" + (f", the first {_QC_SHOWN}" if len(flagged) > _QC_SHOWN
                                                              else ""))
    for column in ("field_id", "objects", "crops", "qc"):
        table.add_column(column, justify="left" if column == "field_id" else "right")
    for row in flagged.head(_QC_SHOWN).itertuples(index=False):
        table.add_row(escape(str(row.field_id)), str(row.n_objects), str(row.n_crops), str(row.qc))
    console.print(table)


def _done_text(result: Any, what: str, sources: str) -> str:
    """``N crops of S x S from M fields in OUT (K cut now, J already done)``."""
    done = result.n_fields - result.n_processed
    cut = f"{result.n_processed} cut now, {done} already done" if done else f"{result.n_processed} cut"
    return f"{result.n_cells} {what} from {result.n_fields} {sources} in {result.out} ({cut})"


def _spec_groups(path: Path) -> list[str]:
    from cellclass.data.spec import DatasetSpec

    return list(DatasetSpec.from_yaml(path).groups) or ["field_id"]


def _channel_text(index: int, names: list[str]) -> str:
    return f"{names[index]} (index {index})" if index < len(names) else str(index)


def _dataset_args(dataset: DatasetOptions) -> str:
    """The dataset options given, as they would be typed again (for a ``next:`` hint)."""
    import dataclasses

    words: list[str] = []
    for f in dataclasses.fields(dataset):
        value = getattr(dataset, f.name)
        if value == f.default:
            continue
        option = option_name(f.name)
        if value is True:
            words.append(option)
        elif isinstance(value, list):
            for item in value:
                words += [option, _quote(item)]
        else:
            words += [option, _quote(value)]
    return "".join(f" {w}" for w in words)


def _quote(value: object) -> str:
    return shlex.quote(str(value))

