"""Labelling commands: embed (what a network has learned) and rank (which images to label next)."""

from __future__ import annotations

import dataclasses
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
    typer.Argument(help="Pool of images to rank, in any dataset form (a YAML spec, a manifest CSV with "
                        "--image-col, a folder with --preset); labels are not needed.", show_default=False),
]


def pool_spec(dataset: DatasetOptions, source: Path, run: Path) -> DatasetSpec:
    """The spec of a dataset whose labels may be absent.

    A manifest given without ``--task`` is read with the run's tasks, on columns named after
    them: labels where such a column exists, none where it does not.
    """
    is_manifest = source.is_file() and source.suffix.lower() not in (".yaml", ".yml")
    if dataset.task or dataset.preset or not is_manifest:
        return dataset.to_spec(source)
    from cellclass.inference.checkpoint import Checkpoint

    encoders = Checkpoint.load(run).encoders
    return dataclasses.replace(dataset, task=[f"{name}:{e.type}" for name, e in encoders.items()]).to_spec(source)


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

    summary = embed_run(run, run_config(run), pool_spec(dataset, spec, run), out, tta=tta, map_method=map_,
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
    from cellclass.evaluation.selection import Member, ensemble_runs, rank_run
    from cellclass.training.config import run_config

    check_strategy(strategy)
    check_budget(budget)
    check_output_file(out, "--out", inputs=[run, pool], input_folders=[run])
    members = [Member(m, run_config(m)) for m in ensemble_runs(ensemble or [])]
    summary = rank_run(run, run_config(run), pool_spec(dataset, pool, run), out, strategy=strategy, budget=budget,
                       task=score_task, tta=tta, exclude_groups_of=exclude_groups_of, keep_test=include_test,
                       members=members, top_factor=top_factor, seed=seed)
    left = summary["left_out"]
    console.print(f"{summary['n_ranked']} of {summary['n_pool']} pool image(s) ranked by {strategy} "
                  f"(task {summary['task']}) into {out}")
    console.print(f"left out: {left['test']} image(s) of the test ({left['how']}); {left['labelled']} the run "
                  "was trained or validated on")
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
