"""Dataset inspection: what the labels, groups and pixels look like before any training.

:func:`inspect_dataset` counts classes per task (and label co-occurrence for multi-label
tasks), measures per-channel intensities, draws a sample grid per class and, most
importantly, builds a **confound table**: for every task x group pair, how far the group
alone predicts the label. In the NASA BPS benchmark every condition sits on one plate,
so particle type, dose and hours are each fully determined by plate and a classifier can
score by recognising plates. Declared negative controls (BPS's 0 Gy sham groups) are
checked too: labels that differ among control rows only by group measure batch effects.

It works without images (metadata only): it says so and still analyses labels and groups.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.io import describe_image, image_exists
from cellclass.data.labels import natural_key
from cellclass.data.spec import ROW_COLUMN, DatasetSpec
from cellclass.errors import ImageReadError
from cellclass.progress import ProgressFn

log = logging.getLogger(__name__)

DETERMINED_U = 0.999
"""Theil's U at or above which a label counts as fully determined by a group."""
NEARLY_U = 0.8
"""Theil's U (or Cramér's V) at or above which a label counts as nearly determined."""
ASSOCIATED_V = 0.3
"""Cramér's V (or Theil's U) at or above which a label counts as associated with a group."""

AXES_SAMPLE = 50
"""Files whose declared axes ``inspect`` describes (the first of the sampled rows)."""



@dataclass
class Confound:
    """Association between one task's labels and one group column.

    Attributes:
        task: Task name.
        group: Group column.
        n_groups: Distinct group values.
        cramers_v: Bias-corrected Cramér's V (0: independent, 1: one-to-one).
        theils_u: Uncertainty coefficient U(label | group): the fraction of the label's
            entropy that the group explains (1: the group determines the label).
        pure_group_fraction: Fraction of rows whose group holds a single class.
        single_group_classes: Classes whose rows all sit in one group.
        level: ``determined``, ``nearly``, ``associated`` or ``ok``.
        message: Plain-language warning (empty when ``ok``).
    """

    task: str
    group: str
    n_groups: int
    cramers_v: float
    theils_u: float
    pure_group_fraction: float
    single_group_classes: list[str]
    level: str
    message: str = ""
    detail: str = ""


@dataclass
class ControlCheck:
    """A task whose labels vary among negative-control rows only with the group."""

    control: str
    task: str
    group: str
    groups_by_label: dict[str, list[str]]
    disjoint: bool
    message: str


@dataclass
class LeftOut:
    """Images that the pixel statistics do not include, for one reason.

    Attributes:
        reason: Why (``no image file``, ``not sampled``, ``unreadable``).
        count: How many images.
        examples: A few of them (``row 3 (a.tif): ...``).
    """

    reason: str
    count: int
    examples: list[str] = field(default_factory=list)


@dataclass
class InspectionReport:
    """Result of :func:`inspect_dataset`; ``to_dict`` gives its JSON form."""

    dataset: str
    n_rows: int
    images_found: int
    images_checked: int
    metadata_only: bool
    class_counts: dict[str, dict[str, int]]
    cooccurrence: dict[str, pd.DataFrame] = field(default_factory=dict)
    channel_stats: pd.DataFrame | None = None
    confounds: list[Confound] = field(default_factory=list)
    control_checks: list[ControlCheck] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    left_out: list[LeftOut] = field(default_factory=list)
    axes: list[str] = field(default_factory=list)
    """How the sampled files' axes are read (pages as channels, Z stacks, OME channel
    names), one line per kind with its count."""

    @property
    def warnings(self) -> list[str]:
        """Confound warnings (one per task, naming every group that determines it) and
        control warnings."""
        out = []
        for task in dict.fromkeys(c.task for c in self.confounds):
            found = [c for c in self.confounds if c.task == task and c.level != "ok"]
            determined = [c for c in found if c.level == "determined"]
            nearly = [c for c in found if c.level in ("nearly", "associated")]
            if determined:
                first = determined[0]
                also = "".join(f", and by {c.group} ({c.n_groups} {c.group}s)" for c in determined[1:])
                out.append(
                    f"{task} is fully determined by {first.group} (each of the {first.n_groups} "
                    f"{first.group}s holds a single {task} class){also}. A model can score by "
                    f"recognising the {first.group}; keep each {first.group} on one side of every "
                    f"split (--split-by {first.group}).{first.detail}"
                )
            for c in nearly:
                out.append(c.message)
        return out + [c.message for c in self.control_checks]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "dataset": self.dataset,
            "n_rows": self.n_rows,
            "images_found": self.images_found,
            "images_checked": self.images_checked,
            "metadata_only": self.metadata_only,
            "class_counts": self.class_counts,
            "cooccurrence": {k: v.to_dict() for k, v in self.cooccurrence.items()},
            "channel_stats": None if self.channel_stats is None else self.channel_stats.to_dict("records"),
            "left_out": [dataclasses.asdict(x) for x in self.left_out],
            "confounds": [c.__dict__ for c in self.confounds],
            "control_checks": [c.__dict__ for c in self.control_checks],
            "axes": self.axes,
            "warnings": self.warnings,
            "outputs": self.outputs,
        }


def inspect_dataset(
    spec: DatasetSpec,
    out_dir: str | Path | None = None,
    *,
    max_images: int = 2000,
    samples_per_class: int = 8,
    max_grid_classes: int = 60,
    seed: int = 0,
    workers: int = 4,
    progress: ProgressFn | None = None,
) -> InspectionReport:
    """Inspect a dataset and, with ``out_dir``, write tables, plots and sample grids.

    Args:
        spec: Dataset to inspect.
        out_dir: Folder for ``inspection.json``, CSV tables, plots and sample grids.
        max_images: Images sampled (uniformly, by ``seed``) for intensity statistics.
        samples_per_class: Images per class in each sample grid.
        max_grid_classes: Sample grids are drawn for at most this many classes per task.
        seed: Sampling seed.
        workers: Decoding threads.
        progress: Called as ``progress("reading images", done, total)`` while images are read.
    """
    frame = spec.load_manifest()
    labels = {t.name: spec.labels(frame, t.name) for t in spec.tasks}
    class_counts = {name: _count(values) for name, values in labels.items()}
    cooccurrence = {
        t.name: _cooccurrence(labels[t.name]) for t in spec.tasks if t.type == "multilabel"
    }
    confounds = [
        _confound(t.name, g, _label_keys(labels[t.name]), frame[g].astype(str).to_numpy())
        for t in spec.tasks
        for g in spec.groups
    ]
    controls = _control_checks(spec, frame, labels)

    rng = np.random.default_rng(seed)
    records = frame.to_dict("records")
    exists = np.array([all(image_exists(p) for p in spec.image_paths(r)) for r in records], dtype=bool)
    report = InspectionReport(
        dataset=spec.name,
        n_rows=len(frame),
        images_found=int(exists.sum()),
        images_checked=0,
        metadata_only=not exists.any(),
        class_counts=class_counts,
        cooccurrence=cooccurrence,
        confounds=confounds,
        control_checks=controls,
    )
    if report.metadata_only:
        log.info("no image of %s was found: metadata-only inspection", spec.name)
    else:
        available = np.flatnonzero(exists)
        chosen = np.sort(rng.choice(available, size=min(max_images, len(available)), replace=False))
        report.axes = _axes_notes(spec, [records[i] for i in chosen[:AXES_SAMPLE]])
        unreadable: list[str] = []
        images = _read_many(spec, [records[i] for i in chosen], workers, progress, unreadable)
        report.images_checked = sum(a is not None for a in images)
        report.channel_stats = _channel_stats(spec, [a for a in images if a is not None])
        report.left_out = _left_out(spec, records, exists, len(chosen), max_images, unreadable)
    if out_dir is not None:
        _write_outputs(spec, report, labels, records, exists, Path(out_dir),
                       samples_per_class, max_grid_classes, rng, workers)
    return report


# -- labels and groups -----------------------------------------------------------------
def _count(values: list[Any]) -> dict[str, int]:
    counts: Counter = Counter()
    for v in values:
        if v is None:
            counts["<empty>"] += 1
        elif isinstance(v, list):
            counts.update(v)
            if not v:
                counts["<none>"] += 1
        else:
            counts[v] += 1
    return {k: int(counts[k]) for k in sorted(counts, key=natural_key)}


def _label_keys(values: list[Any]) -> np.ndarray:
    """One category per row: the class, or the sorted label set for multi-label rows."""
    return np.array(
        ["<empty>" if v is None else "|".join(sorted(v)) if isinstance(v, list) else v for v in values],
        dtype=object,
    )


def _cooccurrence(values: list[Any]) -> pd.DataFrame:
    classes = sorted({c for v in values if v for c in v})
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for v in values:
        ids = [index[c] for c in set(v or [])]
        for a in ids:
            for b in ids:
                matrix[a, b] += 1
    return pd.DataFrame(matrix, index=classes, columns=classes)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def cramers_v(table: np.ndarray) -> float:
    """Bias-corrected Cramér's V of a contingency table (Bergsma 2013)."""
    table = np.asarray(table, dtype=float)
    n = table.sum()
    r, k = table.shape
    if n <= 1 or r < 2 or k < 2:
        return 0.0
    expected = table.sum(1, keepdims=True) @ table.sum(0, keepdims=True) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.nansum(np.where(expected > 0, (table - expected) ** 2 / expected, 0.0))
    phi2 = chi2 / n
    phi2c = max(0.0, phi2 - (k - 1) * (r - 1) / (n - 1))
    rc = r - (r - 1) ** 2 / (n - 1)
    kc = k - (k - 1) ** 2 / (n - 1)
    denom = min(kc - 1, rc - 1)
    return float(math.sqrt(phi2c / denom)) if denom > 0 else 0.0


def theils_u(table: np.ndarray) -> float:
    """Uncertainty coefficient U(label | group) of a table with groups as rows."""
    table = np.asarray(table, dtype=float)
    h_label = _entropy(table.sum(0))
    if h_label == 0:
        return 1.0
    n = table.sum()
    h_cond = sum(row.sum() / n * _entropy(row) for row in table if row.sum() > 0)
    return float(max(0.0, (h_label - h_cond) / h_label))


def _confound(task: str, group: str, labels: np.ndarray, groups: np.ndarray) -> Confound:
    table = pd.crosstab(pd.Series(groups, name=group), pd.Series(labels, name=task))
    values = table.to_numpy()
    v = cramers_v(values)
    u = theils_u(values)
    pure_rows = values[(values > 0).sum(1) == 1].sum()
    pure = float(pure_rows / values.sum()) if values.sum() else 0.0
    single = sorted(str(c) for c in table.columns[(values > 0).sum(0) == 1])
    n_groups = table.shape[0]
    n_classes = table.shape[1]
    if n_classes < 2:
        level, message = "ok", ""
    elif u >= DETERMINED_U:
        level = "determined"
        message = (
            f"{task} is fully determined by {group}: each of the {n_groups} {group} values holds "
            f"a single {task} class (Theil's U = {u:.2f}, Cramér's V = {v:.2f}). A model can score "
            f"by recognising the {group}; keep each {group} on one side of every split "
            f"(--split-by {group})."
        )
    elif u >= NEARLY_U or v >= NEARLY_U:
        level = "nearly"
        message = (
            f"{task} is nearly determined by {group} (Theil's U = {u:.2f}, Cramér's V = {v:.2f}, "
            f"{pure:.0%} of rows sit in single-class {group}s): split by {group}."
        )
    elif max(u, v) >= ASSOCIATED_V:
        level = "associated"
        message = (
            f"{task} is associated with {group} (Cramér's V = {v:.2f}, Theil's U = {u:.2f}): "
            f"split by {group} so the score does not reward recognising the {group}."
        )
    else:
        level, message = "ok", ""
    detail = ""
    if level != "ok" and single:
        shown = ", ".join(single[:8]) + (" ..." if len(single) > 8 else "")
        detail = (
            f" {len(single)} class(es) sit in a single {group} ({shown}): a {group}-grouped split "
            "holds each of them wholly on one side."
        )
    return Confound(task, group, n_groups, round(v, 4), round(u, 4), round(pure, 4), single, level,
                    message + detail, detail)


def _control_checks(spec: DatasetSpec, frame: pd.DataFrame, labels: dict[str, list[Any]]) -> list[ControlCheck]:
    checks = []
    for control in spec.controls:
        mask = control.mask(frame)
        if not mask.any():
            continue
        for task in spec.tasks:
            if control.column in task.columns:
                continue
            keys = _label_keys(labels[task.name])[mask]
            distinct = sorted(set(keys), key=natural_key)
            if len(distinct) < 2:
                continue
            for group in spec.groups:
                groups = frame[group].astype(str).to_numpy()[mask]
                by_label = {k: sorted(set(groups[keys == k])) for k in distinct}
                seen: Counter = Counter(g for gs in by_label.values() for g in gs)
                disjoint = all(n == 1 for n in seen.values())
                if not disjoint or len(seen) == len(keys):
                    continue
                parts = "; ".join(f"{k} on {', '.join(v)}" for k, v in by_label.items())
                message = (
                    f"The {len(distinct)} {control.description} groups ({control.column} = "
                    f"{control.equals}) of {task.name} differ only by {group}: {parts}; no {group} "
                    f"is shared. These cells had the same treatment, so any accuracy at telling "
                    f"them apart measures {group} effects: report this {control.description}-vs-"
                    f"{control.description} score as the {group}-recognition floor."
                )
                checks.append(ControlCheck(control.description, task.name, group, by_label, disjoint, message))
                break
    return checks


# -- pixels ----------------------------------------------------------------------------
def _left_out(spec: DatasetSpec, records: list[dict[str, Any]], exists: np.ndarray, n_chosen: int,
              max_images: int, unreadable: list[str]) -> list[LeftOut]:
    """What the pixel statistics left out, by reason."""
    out = []
    missing = np.flatnonzero(~exists)
    if len(missing):
        out.append(LeftOut("no image file", len(missing),
                           [f"row {records[i][ROW_COLUMN]} ({spec.image_id(records[i])})" for i in missing[:3]]))
    not_sampled = int(exists.sum()) - n_chosen
    if not_sampled:
        out.append(LeftOut(f"not sampled (at most {max_images} images are read: --max-images)", not_sampled))
    if unreadable:
        out.append(LeftOut("unreadable (run `cellclass validate` for every problem)", len(unreadable), unreadable[:3]))
    return out


def _axes_notes(spec: DatasetSpec, records: list[dict[str, Any]]) -> list[str]:
    """One line per kind of axes among the rows' (first) files, with how many have it."""
    counts: Counter = Counter()
    for record in records:
        try:
            note = describe_image(spec.image_paths(record)[0]).note(spec.image.axes_policy(record))
        except ImageReadError as exc:  # reading problems are the pixel statistics' (and validate's)
            log.debug("cannot describe the axes of row %s: %s", record.get("_row"), exc)
            continue
        counts[note] += 1
    total = sum(counts.values())
    return [f"{note} ({n} of {total} files described)" for note, n in counts.most_common()]


def _read_many(spec: DatasetSpec, records: list[dict[str, Any]], workers: int,
               progress: ProgressFn | None, errors: list[str] | None = None) -> list[np.ndarray | None]:
    """Every row's image, ``None`` where it cannot be read (its reason appended to ``errors``)."""
    def read(record: dict[str, Any]) -> np.ndarray | None:
        try:
            return spec.read_image(record)
        except ImageReadError as exc:
            log.debug("skipping row %s: %s", record.get(ROW_COLUMN), exc)
            if errors is not None:
                errors.append(f"row {record.get(ROW_COLUMN)} ({spec.image_id(record)}): {exc}")
            return None

    out = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, array in enumerate(pool.map(read, records), start=1):
            out.append(array)
            if progress is not None:
                progress("reading images", done, len(records))
    return out


def _channel_stats(spec: DatasetSpec, images: list[np.ndarray]) -> pd.DataFrame:
    """Intensity statistics per channel, within each group of images sharing a dtype and a
    channel count: uint8 and uint16 pixels (or 1- and 3-channel images) are never pooled."""
    if not images:
        return pd.DataFrame()
    groups: dict[tuple[str, int], list[np.ndarray]] = {}
    for a in images:
        groups.setdefault((str(a.dtype), a.shape[0]), []).append(a)
    rows = []
    rng = np.random.default_rng(0)
    for (dtype, n_channels), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        names = spec.image.channel_names if spec.image.channel_names and len(spec.image.channel_names) == n_channels \
            else [f"ch{i}" for i in range(n_channels)]
        for c, name in enumerate(names):
            pixels = [a[c].ravel() for a in members]
            sample = np.concatenate([p if p.size <= 4096 else rng.choice(p, 4096, replace=False) for p in pixels])
            sample = sample.astype(np.float64)
            finite = sample[np.isfinite(sample)]
            if not finite.size:
                finite = np.array([np.nan])
            rows.append({
                "dtype": dtype,
                "channels": n_channels,
                "channel": name,
                "min": float(min(np.nanmin(p) if p.size else np.nan for p in pixels)),
                "p1": float(np.percentile(finite, 1)),
                "p50": float(np.percentile(finite, 50)),
                "p99": float(np.percentile(finite, 99)),
                "max": float(max(np.nanmax(p) if p.size else np.nan for p in pixels)),
                "mean": float(finite.mean()),
                "std": float(finite.std()),
                "images": len(members),
            })
    return pd.DataFrame(rows)


# -- outputs ---------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "class"


def _write_outputs(spec: DatasetSpec, report: InspectionReport, labels: dict[str, list[Any]],
                   records: list[dict[str, Any]], exists: np.ndarray, out: Path,
                   samples_per_class: int, max_grid_classes: int, rng: np.random.Generator,
                   workers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    counts = pd.DataFrame(
        [(t, c, n) for t, cc in report.class_counts.items() for c, n in cc.items()],
        columns=["task", "class", "count"],
    )
    outputs["class_counts"] = _write_csv(counts, out / "class_counts.csv")
    confounds = pd.DataFrame([c.__dict__ for c in report.confounds]) if report.confounds else \
        pd.DataFrame(columns=["task", "group"])
    if len(confounds):
        confounds["single_group_classes"] = confounds["single_group_classes"].map(lambda v: ";".join(v))
    outputs["confounds"] = _write_csv(confounds, out / "confounds.csv")
    for task, table in report.cooccurrence.items():
        outputs[f"cooccurrence_{task}"] = _write_csv(table, out / f"cooccurrence_{_slug(task)}.csv", index=True)
    if report.channel_stats is not None:
        outputs["channel_stats"] = _write_csv(report.channel_stats, out / "channel_stats.csv")
    for task, cc in report.class_counts.items():
        outputs[f"class_counts_plot_{task}"] = str(_plot_counts(task, cc, out / f"class_counts_{_slug(task)}.png"))
    if not report.metadata_only:
        for task in spec.tasks:
            keys = labels[task.name]
            classes = [c for c in report.class_counts[task.name] if not c.startswith("<")][:max_grid_classes]
            for cls in classes:
                members = [i for i, v in enumerate(keys)
                           if exists[i] and (cls in v if isinstance(v, list) else v == cls)]
                if not members:
                    continue
                pick = rng.choice(members, size=min(samples_per_class, len(members)), replace=False)
                images = [a for a in _read_many(spec, [records[i] for i in pick], workers, None) if a is not None]
                if images:
                    path = out / "samples" / _slug(task.name) / f"{_slug(cls)}.png"
                    _plot_grid(images, f"{task.name} = {cls}", path)
                    outputs[f"samples/{task.name}/{cls}"] = str(path)
    report.outputs = outputs
    atomic_write_text(out / "inspection.json", json.dumps(report.to_dict(), indent=2, default=str))
    report.outputs["json"] = str(out / "inspection.json")


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> str:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return str(path)


def _save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _plot_counts(task: str, counts: dict[str, int], path: Path) -> Path:
    names = list(counts)[:80]
    fig = Figure(figsize=(max(4.0, 0.3 * len(names) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), [counts[n] for n in names], color="#4477aa")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title(f"{task}: class counts" + (" (first 80)" if len(counts) > 80 else ""))
    return _save_figure(fig, path)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` float image in [0, 1] for display, stretched per channel (1-99.5%).

    One channel is shown in gray, two or more as a composite of the first three.
    """
    image = np.asarray(image, dtype=np.float32)
    chans = []
    for c in image[:3]:
        finite = c[np.isfinite(c)]
        lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0))
        chans.append(np.clip((np.nan_to_num(c) - lo) / max(hi - lo, 1e-6), 0, 1))
    if len(chans) == 1:
        return np.repeat(chans[0][..., None], 3, axis=2)
    while len(chans) < 3:
        chans.append(np.zeros_like(chans[0]))
    return np.stack(chans, axis=-1)


def _plot_grid(images: list[np.ndarray], title: str, path: Path) -> Path:
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(2.0 * cols, 2.0 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image in zip(axes, images, strict=False):
        ax.imshow(display_rgb(image), interpolation="nearest")
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)
