"""Dataset presets: specs for the layouts researchers already have on disk.

Each preset takes the dataset's folder and returns a :class:`DatasetSpec`:

- ``bps``: NASA BPS microscopy benchmark (``meta.csv`` with
  ``filename,dose_Gy,particle_type,hr_post_exposure``; plate and well parsed from names
  like ``P242_73665006707-A6_003_013_proj.tif``).
- ``hpa``: Human Protein Atlas (``train.csv`` with ``Id,Target``; four PNGs per image).
- ``rxrx1``: RxRx1 (``metadata.csv``; six PNGs per site).
- ``folder``: one sub-folder per class.
- ``csv``: a generic ``Image,Label`` manifest.
- ``plate``: OME-Zarr high-content-screening plates, one row per field, labels from a
  ``wells.csv`` keyed by well (see :mod:`cellclass.data.plate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from cellclass.data.omezarr import describe_zarr_image, plate_fields
from cellclass.data.plate import PLATE_COLUMNS, find_plates, plate_name
from cellclass.data.spec import (
    ControlSpec,
    DatasetSpec,
    DerivedColumn,
    ImageSpec,
    PlateSpec,
    TaskSpec,
    parse_where,
    spec_from_manifest,
)
from cellclass.errors import ImageReadError, SpecError

HPA_CLASSES: list[str] = [
    "Nucleoplasm", "Nuclear membrane", "Nucleoli", "Nucleoli fibrillar center",
    "Nuclear speckles", "Nuclear bodies", "Endoplasmic reticulum", "Golgi apparatus",
    "Peroxisomes", "Endosomes", "Lysosomes", "Intermediate filaments", "Actin filaments",
    "Focal adhesion sites", "Microtubules", "Microtubule ends", "Cytokinetic bridge",
    "Mitotic spindle", "Microtubule organizing center", "Centrosome", "Lipid droplets",
    "Plasma membrane", "Cell junctions", "Mitochondria", "Aggresome", "Cytosol",
    "Cytoplasmic bodies", "Rods & rings",
]
"""The 28 Human Protein Atlas localisation classes, in the index order of ``Target``."""

HPA_CHANNELS = ["red", "green", "blue", "yellow"]
RXRX1_CHANNELS = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]

BPS_PLATE_REGEX = r"^(P\d+)_"
# A well name such as A6 repeats on every plate: the well id keeps its plate and barcode.
BPS_WELL_REGEX = r"^(P\d+_\d+-[A-Z]{1,2}\d{1,2})_"


def bps(root: str | Path, *, manifest: str = "meta.csv") -> DatasetSpec:
    """NASA BPS microscopy benchmark: single-channel uint16 TIFF nuclei.

    Tasks: ``particle_type`` (Fe, X-ray), ``dose`` (Gy), ``particle_dose`` (both at
    once), ``hours`` (after exposure). Groups: ``plate`` and ``well`` from the file name.
    The 0 Gy rows are declared a sham control so ``inspect`` can show they differ only by
    plate.
    """
    return DatasetSpec(
        name="bps",
        preset="bps",
        manifest=manifest,
        image=ImageSpec(column="filename", channels=["53BP1"]),
        tasks=[
            TaskSpec("particle_type", ["particle_type"], classes=["Fe", "X-ray"]),
            TaskSpec("dose", ["dose_Gy"]),
            TaskSpec("particle_dose", ["particle_type", "dose_Gy"]),
            TaskSpec("hours", ["hr_post_exposure"]),
        ],
        derive={
            "plate": DerivedColumn("filename", BPS_PLATE_REGEX),
            "well": DerivedColumn("filename", BPS_WELL_REGEX),
        },
        groups=["plate", "well"],
        controls=[ControlSpec("dose_Gy", "0", "sham")],
        base_dir=Path(root),
    )


def hpa(root: str | Path, *, manifest: str = "train.csv", images: str = "train") -> DatasetSpec:
    """Human Protein Atlas: four 8-bit PNGs per image, 28 multi-label localisations."""
    return DatasetSpec(
        name="hpa",
        preset="hpa",
        manifest=manifest,
        image=ImageSpec(pattern="{Id}_{channel}.png", root=images, channels=list(HPA_CHANNELS)),
        tasks=[
            TaskSpec("localization", ["Target"], type="multilabel", delimiter=" ",
                     classes=list(HPA_CLASSES), values="indices")
        ],
        base_dir=Path(root),
    )


def rxrx1(root: str | Path, *, manifest: str = "metadata.csv", images: str = "images") -> DatasetSpec:
    """RxRx1: six-channel Cell Painting-like sites, 1,139 siRNAs, strong batch effects.

    Groups: ``experiment``, ``plate``, ``well``. The ``dataset`` column (train/test) is
    the predefined split.
    """
    return DatasetSpec(
        name="rxrx1",
        preset="rxrx1",
        manifest=manifest,
        image=ImageSpec(
            pattern="{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png",
            root=images,
            channels=list(RXRX1_CHANNELS),
            channel_keys=[str(i) for i in range(1, 7)],
        ),
        tasks=[TaskSpec("sirna", ["sirna"]), TaskSpec("cell_type", ["cell_type"])],
        groups=["experiment", "plate", "well"],
        split_column="dataset",
        base_dir=Path(root),
    )


def folder(root: str | Path) -> DatasetSpec:
    """One sub-folder per class under ``root``; the task is called ``label``."""
    return DatasetSpec(
        name=Path(root).resolve().name,
        preset="folder",
        layout="folder",
        image=ImageSpec(column="filename"),
        tasks=[TaskSpec("label", ["label"])],
        base_dir=Path(root),
    )


def csv(root: str | Path, *, manifest: str | None = None, image_col: str = "Image",
        label_col: str = "Label") -> DatasetSpec:
    """A generic manifest with an image column and a label column.

    ``root`` is the CSV itself or its folder (then the only ``*.csv`` in it, or
    ``manifest``).
    """
    root = Path(root)
    if root.is_dir():
        if manifest is None:
            found = sorted(root.glob("*.csv"))
            if len(found) != 1:
                raise SpecError(
                    f"preset 'csv' needs one manifest in {str(root)!r}, found "
                    f"{[p.name for p in found]}; pass the CSV path instead of the folder"
                )
            root = found[0]
        else:
            root = root / manifest
    spec = spec_from_manifest(root, image_col=image_col, tasks=[f"{label_col.lower()}={label_col}"])
    spec.preset = "csv"
    return spec


def plate(root: str | Path, *, manifest: str = "wells.csv", per: str = "field") -> DatasetSpec:
    """OME-Zarr plates: one row per field (``per="well"``: per well), labels by well.

    ``root`` is a plate folder (``plate.zarr``) with the labels CSV beside it, or a folder
    holding plate folders and the labels CSV. The CSV (``manifest``) has a ``well`` column
    (``A1``, ``A01``, ``A/1``), optionally a ``plate`` column, and one label column per
    task; every other column is a task. Groups: ``well`` (the default split group), then
    ``plate``. Channel names come from each field's ``omero`` metadata.

    Raises:
        SpecError: When there is no plate, no labels CSV or no label column in it.
        MissingDependencyError: When the ``zarr`` extra is not installed.
    """
    root = Path(root)
    plates = find_plates(root)
    _, first = plate_fields(plates[0], first_only=True)
    try:
        channels = list(describe_zarr_image(plates[0] / first[0].path).channel_names) if first else []
    except ImageReadError:  # a missing or broken field is validate's to report, row by row
        channels = []
    base = root.parent if plates == [root] else root
    labels = base / manifest
    if not labels.is_file():
        raise SpecError(
            f"preset 'plate' needs a labels CSV {str(labels)!r} keyed by well (columns well, and a "
            f"label column such as treatment); write one, or a spec with layout: plate"
        )
    try:
        header = [str(c).strip() for c in pd.read_csv(labels, dtype=str, nrows=0).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot parse labels CSV {str(labels)!r}: {exc}") from None
    tasks = [c for c in header if c not in PLATE_COLUMNS]
    if not tasks:
        raise SpecError(
            f"labels CSV {str(labels)!r} has no label column (columns: {', '.join(header)}); valid: "
            f"well, optionally plate, and one column per label task"
        )
    return DatasetSpec(
        name=_plates_name(plates),
        preset="plate",
        layout="plate",
        manifest=manifest,
        image=ImageSpec(column="image", root=Path(root.name).as_posix() if base != root else ".",
                        channels=channels or None),
        tasks=[TaskSpec(t, [t]) for t in tasks],
        groups=["well", "plate"],
        plate=PlateSpec(per=per),
        base_dir=base,
    )


def _plates_name(plates: list[Path]) -> str:
    """A dataset name for plates: the plate's name, or their folder's."""
    return plate_name(plates[0]) if len(plates) == 1 else plates[0].resolve().parent.name


PRESETS: dict[str, Callable[..., DatasetSpec]] = {
    "bps": bps,
    "hpa": hpa,
    "rxrx1": rxrx1,
    "folder": folder,
    "csv": csv,
    "plate": plate,
}


def preset(name: str, root: str | Path, **options: Any) -> DatasetSpec:
    """Build the spec of preset ``name`` for the dataset in ``root``.

    Raises:
        SpecError: When the preset is unknown.
    """
    try:
        factory = PRESETS[name]
    except KeyError:
        raise SpecError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
    return factory(root, **options)


SPEC_FILE_NAMES = ("cellclass.yaml", "dataset.yaml", "spec.yaml")


def load_spec(
    source: str | Path,
    *,
    preset_name: str | None = None,
    image_col: str | None = None,
    tasks: list[str] | None = None,
    groups: list[str] | None = None,
    delimiter: str | None = None,
    split_column: str | None = None,
    drop_unlabeled: bool = False,
    where: list[str] | None = None,
    z: str | int | None = None,
    t: str | int | None = None,
    series: int | None = None,
) -> DatasetSpec:
    """Resolve what a user names on the command line into a spec.

    ``source`` is a YAML spec, a manifest CSV (with ``image_col`` and ``tasks``), or a
    folder with ``preset_name`` (or holding a ``cellclass.yaml``). With a YAML spec or a
    preset, ``tasks`` selects declared tasks by name; with a manifest it declares them
    (``COLUMN[:TYPE]`` or ``NAME=COLUMN[:TYPE]``). ``groups`` replaces the declared groups.
    ``z``, ``t`` and ``series`` (``--z``, ``--t``, ``--series``) replace what the image
    section declares about stacks (see :mod:`cellclass.data.axes`).

    Raises:
        SpecError: When the source cannot be resolved or a stack option is invalid; the
            message says what to pass.
    """
    spec = _resolve_spec(source, preset_name=preset_name, image_col=image_col, tasks=tasks,
                         groups=groups, delimiter=delimiter, split_column=split_column,
                         drop_unlabeled=drop_unlabeled, where=where)
    stack = {k: v for k, v in (("z", z), ("t", t), ("series", series)) if v is not None}
    if stack:
        if series is not None:
            stack["series_column"] = None
        spec.image = dataclasses.replace(spec.image, **stack)
    return spec


def _resolve_spec(
    source: str | Path,
    *,
    preset_name: str | None,
    image_col: str | None,
    tasks: list[str] | None,
    groups: list[str] | None,
    delimiter: str | None,
    split_column: str | None,
    drop_unlabeled: bool,
    where: list[str] | None,
) -> DatasetSpec:
    path = Path(source)
    if not path.exists():
        raise SpecError(f"dataset source {str(path)!r} does not exist")
    if preset_name is not None:
        spec = preset(preset_name, path).select_tasks(tasks)
    elif path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        spec = DatasetSpec.from_yaml(path).select_tasks(tasks)
    elif path.is_file():
        if not image_col:
            raise SpecError(
                f"manifest {str(path)!r} given without --image-col; name the column of image paths"
            )
        spec = spec_from_manifest(
            path, image_col=image_col, tasks=tasks or [], groups=groups or [],
            delimiter=delimiter, split_column=split_column, drop_unlabeled=drop_unlabeled,
        )
        spec.where = list(where or [])
        return spec
    else:
        found = [path / n for n in SPEC_FILE_NAMES if (path / n).is_file()]
        if not found:
            raise SpecError(
                f"folder {str(path)!r} holds no {' / '.join(SPEC_FILE_NAMES)}; pass --preset "
                f"({', '.join(PRESETS)}), a YAML spec, or a manifest CSV with --image-col and --task"
            )
        spec = DatasetSpec.from_yaml(found[0]).select_tasks(tasks)
    if groups:
        spec.groups = list(groups)
    if split_column:
        spec.split_column = split_column
    if drop_unlabeled:
        spec.drop_unlabeled = True
    if where:
        for expression in where:
            parse_where(expression)
        spec.where = [*spec.where, *where]
    return spec
