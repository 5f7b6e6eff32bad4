"""Labelling commands: embed (what a network has learned) and rank (which images to label next)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cellclass.cli.app import app
from cellclass.cli.options import DatasetOptions, SpecArg, takes_options
from cellclass.cli.output import check_output_file, console, metric_text

if TYPE_CHECKING:
    from cellclass.data.spec import DatasetSpec

RunArg = Annotated[Path, typer.Argument(help="Run folder made by `cellclass train`.", show_default=False)]
PoolArg = Annotated[
    Path,
    typer.Argument(help="Pool of images to rank: a folder of images, or any dataset form (a YAML spec, a "
                        "manifest CSV with --image-col, a folder with --preset); labels are not needed.",
                   show_default=False),
]


@contextlib.contextmanager
def pool_spec(dataset: DatasetOptions, source: Path, run: Path) -> Iterator[DatasetSpec]:
    """The spec of a dataset whose labels may be absent, for the duration of a command.

    A manifest given without ``--task`` is read with the run's tasks, on columns named after
    them: labels where such a column exists, none where it does not. A folder holding no
    spec file, given without ``--preset``, is a pool of every image file under it (listed
    in a temporary manifest; paths stay relative to the folder).
    """
    import pandas as pd

    from cellclass.data.io import IMAGE_EXTENSIONS
    from cellclass.data.presets import SPEC_FILE_NAMES
    from cellclass.errors import SpecError
    from cellclass.evaluation.evaluate import run_spec
    from cellclass.inference.checkpoint import Checkpoint

    is_manifest = source.is_file() and source.suffix.lower() not in (".yaml", ".yml")
    is_image_folder = source.is_dir() and not dataset.preset and not any((source / n).is_file()
                                                                         for n in SPEC_FILE_NAMES)
    if dataset.task or dataset.preset or not (is_manifest or is_image_folder):
        yield dataset.to_spec(source)
        return
    tasks = [f"{name}:{e.type}" for name, e in Checkpoint.load(run).encoders.items()]
    if is_manifest:
        yield dataclasses.replace(dataset, task=tasks).to_spec(source)
        return
    files = sorted(f.relative_to(source).as_posix() for f in source.rglob("*")
                   if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
    if not files:
        raise SpecError(f"folder {str(source)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)}) and no spec "
                        f"({' / '.join(SPEC_FILE_NAMES)}); valid: a folder of images, a YAML spec, a manifest CSV "
                        "with --image-col, or a dataset folder with --preset")
    # the run's columns derived from file names (plate, well) are derived here too, so test plates are known
    own = run_spec(run)
    column = own.image.column or "filename"
    derived = {name: rule for name, rule in own.derive.items() if rule.source == column}
    with tempfile.TemporaryDirectory(prefix="cellclass-pool-") as folder:
        manifest = Path(folder) / "pool.csv"
        pd.DataFrame({column: files}).to_csv(manifest, index=False)
        spec = dataclasses.replace(dataset, image_col=column, task=tasks).to_spec(manifest)
        spec.name, spec.derive = source.resolve().name, derived
        spec.groups = spec.groups or [g for g in own.groups if g in derived]
        spec.image = dataclasses.replace(spec.image, root=str(source.resolve()))
        yield spec


@app.command()
@takes_options
def embed(
    run: RunArg,
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder (features.npy, embeddings.csv, plots/, "
                                                    "embed.json).")],
    dataset: DatasetOptions,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Average features over the 8 D4 views.")] = False,
    map_: Annotated[str, typer.Option("--map", help="2-D map of the features: umap, pca or none.")] = "umap",
    profile_by: Annotated[list[str] | None, typer.Option(
        "--profile-by", help="Aggregate the features per value of this column (well, treatment) into "
                             "profiles.csv. Repeatable (profiles per combination).")] = None,
    profile_stat: Annotated[str, typer.Option("--profile-stat", help="mean or median.")] = "mean",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the map.")] = 0,
) -> None:
    """A network's penultimate features for every image of a dataset, a 2-D map coloured by class,
    prediction and group, well or treatment profiles, and kNN / logistic-regression probes."""
    from cellclass.evaluation.embedding import embed_run
    from cellclass.training.config import run_config

    with pool_spec(dataset, spec, run) as data:
        summary = embed_run(run, run_config(run), data, out, tta=tta, map_method=map_,
                            profile_by=profile_by or [], profile_stat=profile_stat, seed=seed)
    console.print(f"{summary['n_images']} image(s) embedded by {summary['model']}: {summary['feature_dim']} features"
                  f" each{' (D4 views averaged)' if summary['tta'] else ''}; map: {summary['map']}")
    _print_probe(summary)
    if "profiles" in summary:
        p = summary["profiles"]
        console.print(f"{p['n_profiles']} profile(s) by {', '.join(p['by'])} ({p['stat']}) in profiles.csv")
    console.print(f"written to {out}: {', '.join(summary['files'])}, embed.json")


def _print_probe(summary: dict[str, Any]) -> None:
    """The probe's table: classifiers on the features against the network, test macro F1."""
    if summary["probe"] is None:
        console.print(summary["probe_note"])
        return
    table = Table(title="test macro F1: classifiers fitted on the features of the run's training images")
    for col in ("task", "kNN", "logistic regression", "network", "train / test images"):
        table.add_column(col, justify="right")
    for task, p in summary["probe"].items():
        if "note" in p:
            table.add_row(task, "", "", "", p["note"])
        else:
            table.add_row(task, metric_text(p["knn_macro_f1"]), metric_text(p["logreg_macro_f1"]),
                          metric_text(p["network_macro_f1"]), f"{p['n_train']} / {p['n_test']}")
    console.print(table)


@app.command()
@takes_options
def rank(
    run: RunArg,
    pool: PoolArg,
    dataset: DatasetOptions,
    budget: Annotated[int, typer.Option("--budget", help="How many images to choose.")],
    strategy: Annotated[str, typer.Option(
        "--strategy", help="least-confidence, margin, entropy, tta-bald (disagreement of the D4 views), "
                           "ensemble-bald (of --ensemble models), k-center (diversity), hybrid (uncertain, "
                           "then diverse) or random.")] = "hybrid",
    out: Annotated[Path, typer.Option("--out", help="Ranked CSV (rank.json beside it).")] = Path("rank.csv"),
    exclude_groups_of: Annotated[Path | None, typer.Option(
        "--exclude-groups-of", help="Leave out the test groups of this run (default: RUN's).")] = None,
    include_test: Annotated[bool, typer.Option(
        "--include-test", help="Keep the test groups in the pool (the test is then no longer untouched).")] = False,
    score_task: Annotated[str | None, typer.Option(
        "--score-task", help="Task to score (default: the run's first).")] = None,
    ensemble: Annotated[list[Path] | None, typer.Option(
        "--ensemble", help="ensemble-bald: a `cellclass cv` folder or a run folder. Repeatable.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="D4 test-time augmentation "
                                             "(default: the run's setting; tta-bald always).")] = None,
    top_factor: Annotated[int, typer.Option(
        "--top-factor", help="hybrid: diversify among this many times --budget most uncertain images.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random strategy.")] = 0,
) -> None:
    """Rank a pool of unlabelled images for labelling: the images that would teach the model most first."""
    from cellclass.evaluation.ranking import check_budget, check_strategy
    from cellclass.evaluation.selection import Member, rank_run
    from cellclass.inference.ensemble import ensemble_runs
    from cellclass.training.config import run_config

    check_strategy(strategy)
    check_budget(budget)
    check_output_file(out, "--out", inputs=[run, pool], input_folders=[run])
    members = [Member(m, run_config(m)) for m in ensemble_runs(ensemble or [])]
    with pool_spec(dataset, pool, run) as images:
        summary = rank_run(run, run_config(run), images, out, strategy=strategy, budget=budget, task=score_task,
                           tta=tta, exclude_groups_of=exclude_groups_of, keep_test=include_test, members=members,
                           top_factor=top_factor, seed=seed)
    left = summary["left_out"]
    console.print(f"{summary['n_ranked']} of {summary['n_pool']} pool image(s) ranked by {strategy} "
                  f"(task {summary['task']}) into {out}")
    console.print(f"left out: {left['test']} image(s) of the test, by {left['how']}; {left['labelled']} the "
                  "run was trained or validated on")
    _print_top(out, summary["task"])


def _print_top(out: Path, task: str, n: int = 10) -> None:
    """The first rows of rank.csv."""
    import pandas as pd

    frame = pd.read_csv(out, dtype=str, keep_default_na=False, nrows=n)
    table = Table(title=f"first {len(frame)} to label")
    for col in ("rank", "image", "score", f"pred_{task}"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for row in frame.to_dict("records"):
        table.add_row(row["rank"], row["image"], row["score"], row[f"pred_{task}"])
    console.print(table)
