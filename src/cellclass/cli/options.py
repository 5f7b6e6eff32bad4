"""The options several commands share, each defined once as a typed object.

A command names a group in its signature (``data: DatasetOptions``) and is decorated with
:func:`takes_options`: the group's fields become the command's options, listed in
``--help`` with their help text, and the command receives them as one object. So every
command that reads a dataset takes the same dataset options, and ``train``, ``cv`` and
``sweep`` the same training and tracking options.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self, TypeVar

import typer

from cellclass.errors import ConfigError
from cellclass.textfiles import load_yaml
from cellclass.training.config import TrainConfig, parse_set_options

if TYPE_CHECKING:
    from cellclass.data.spec import DatasetSpec
    from cellclass.tracking import Tracker

Command = TypeVar("Command", bound=Callable[..., Any])

SpecArg = Annotated[
    Path,
    typer.Argument(help="Dataset: a YAML spec, a manifest CSV (with --image-col and --task), "
                        "or a folder (with --preset).", show_default=False),
]


class OptionGroup:
    """A set of options several commands share: a dataclass whose fields are typer options,
    each named as its option (field ``image_col`` is ``--image-col``, ``set_`` is ``--set``)."""

    panel: ClassVar[str]
    """Title of the group's panel in ``--help``."""

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The group's fields as keyword parameters of a command, in their order."""
        hints = typing.get_type_hints(cls, include_extras=True)
        parameters = []
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind, info = typing.get_args(hints[field.name])
            info = copy.copy(info)
            info.rich_help_panel = cls.panel
            parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                                annotation=Annotated[kind, info], default=field.default))
        return parameters

    @classmethod
    def pop_from(cls, values: dict[str, Any]) -> Self:
        """The group built from (and taken out of) a command's parsed ``values``."""
        return cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]

    def given(self) -> list[str]:
        """The options given a value other than their default, as typed (``--where``)."""
        return [option_name(f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) != f.default]


def option_name(field: str) -> str:
    """The option of a group's field: ``image_col`` is ``--image-col``, ``set_`` is ``--set``."""
    return "--" + field.rstrip("_").replace("_", "-")


def takes_options(command: Command) -> Command:
    """Give ``command`` the options of each :class:`OptionGroup` its signature names.

    Each parameter annotated with a group stands, in the command line and its ``--help``,
    for that group's options (at its place); the command is called with the group's object.

    Raises:
        TypeError: When a group's option has the name of another parameter of the command.
    """
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, type[OptionGroup]] = {}
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        annotation = parameter.annotation
        if isinstance(annotation, type) and issubclass(annotation, OptionGroup):
            groups[parameter.name] = annotation
            parameters += annotation.parameters()
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in parameters]
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise TypeError(f"{command.__name__}: option names {repeated} are given twice")

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.pop_from(values)
        return command(**values)

    del run.__wrapped__  # typer reads the signature below, not the command's
    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run  # type: ignore[return-value]


# -- the dataset -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetOptions(OptionGroup):
    """How to read the dataset a command is given (a YAML spec, a manifest or a folder)."""

    panel: ClassVar[str] = "Dataset"

    preset: Annotated[str | None, typer.Option(
        "--preset", help="Preset for a dataset folder: bps, hpa, rxrx1, folder, csv, plate.")] = None
    image_col: Annotated[str | None, typer.Option(
        "--image-col", help="Manifest column of image paths (relative to the manifest's folder).")] = None
    task: Annotated[list[str] | None, typer.Option(
        "--task", help="With a manifest: a label column, COLUMN[:TYPE] or NAME=COLUMN[:TYPE] (TYPE: single, "
                       "multilabel, binary). With a YAML or preset: a task to keep. Repeatable.")] = None
    group: Annotated[list[str] | None, typer.Option(
        "--group", help="Group column (plate, well, experiment). Repeatable.")] = None
    delimiter: Annotated[str | None, typer.Option(
        "--delimiter", help="Separator of delimited multi-label columns (default: space).")] = None
    drop_unlabeled: Annotated[bool, typer.Option(
        "--drop-unlabeled", help="Drop rows whose labels are all empty.")] = False
    where: Annotated[list[str] | None, typer.Option(
        "--where", help="Keep rows where COLUMN OP VALUE holds, e.g. 'dose_Gy > 0'. Repeatable.")] = None
    z: Annotated[str | None, typer.Option(
        "--z", help="Z stacks: max, mean, sum or min projection, middle, or slice N (0-based). "
                    "Without it, a file with Z > 1 is refused.")] = None
    t: Annotated[str | None, typer.Option(
        "--t", help="Time series: frame N (0-based), max, mean (or sum, min, middle). "
                    "Without it, a file with T > 1 is refused.")] = None
    series: Annotated[int | None, typer.Option(
        "--series", min=0, help="Series (OME image, position) to read of files holding several.")] = None

    def to_spec(self, source: Path) -> DatasetSpec:
        """The spec of ``source`` read with these options.

        Raises:
            SpecError: When the source cannot be resolved or an option is invalid.
        """
        from cellclass.data.presets import load_spec

        return load_spec(source, preset_name=self.preset, image_col=self.image_col, tasks=self.task or [],
                         groups=self.group or [], delimiter=self.delimiter, drop_unlabeled=self.drop_unlabeled,
                         where=self.where, z=self.z, t=self.t, series=self.series)


# -- training --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainOptions(OptionGroup):
    """The training configuration: defaults, a ``--config`` file, options and ``--set``."""

    panel: ClassVar[str] = "Training"

    model: Annotated[str | None, typer.Option("--model", help="Model name (see `cellclass models`).")] = None
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, help="Maximum epochs (default: auto, enough for about 1,200 optimizer steps, "
                                "20 to 60).")] = None
    image_size: Annotated[int | None, typer.Option(
        "--image-size", min=8, help="Side of the square model input.")] = None
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Global batch size.")] = None
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None
    split_by: Annotated[str | None, typer.Option(
        "--split-by", help="Keep each value of this column on one side (default: the spec's first group).")] = None
    split: Annotated[str | None, typer.Option(
        "--split", help="group, random (warns on grouped data) or predefined.")] = None
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file (keys of TrainConfig).")] = None
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key: --set lr=1e-3. Repeatable.")] = None
    devices: Annotated[int | None, typer.Option(
        "--devices", min=1, help="Processes/devices (DDP when > 1).")] = None
    strategy: Annotated[str | None, typer.Option("--strategy", help="Fabric strategy: auto, ddp, ddp_spawn.")] = None
    precision: Annotated[str | None, typer.Option(
        "--precision", help="32-true, bf16-mixed, 16-mixed or auto (the default: on a CPU the fastest of "
                            "float32, float32 channels-last and bf16-mixed, timed on the first batches and "
                            "cached per machine and model shape; bf16-mixed on a GPU). The choice is recorded "
                            "under runtime in config.yaml.")] = None
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of split, weights and augmentation.")] = None
    pretrained: Annotated[str | None, typer.Option("--pretrained", help="Path to local weights (or 'hub').")] = None
    cache: Annotated[bool | None, typer.Option(
        "--cache", help="Build the prepared image cache when no valid one exists (a valid one is always "
                        "used; see `cellclass prepare`).")] = None

    def to_config(self, base: TrainConfig | None = None) -> TrainConfig:
        """The configuration: the defaults (or ``base``, a resumed run's own), then the
        ``--config`` file, then the options given, then each ``--set key=value``.

        Raises:
            ConfigError: When the file, a value or a ``--set`` is invalid.
        """
        config = base if base is not None else TrainConfig()
        if self.config is not None:
            from_file = TrainConfig.from_yaml(self.config)  # checks the file and its keys
            given = load_yaml(self.config, "config file", ConfigError) or {}
            config = config.override({key: getattr(from_file, key) for key in given})
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("config", "set_")}
        if options["pretrained"] == "hub":
            options["pretrained"] = True
        explicit = {key: value for key, value in options.items() if value is not None}
        return config.override({**explicit, **parse_set_options(self.set_ or [])})


# -- tracking --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrackerOptions(OptionGroup):
    """Where a training command tracks its runs."""

    panel: ClassVar[str] = "Tracking"

    tracker: Annotated[str, typer.Option(
        "--tracker", help="Experiment tracker: mlflow (a local store RUNS/mlflow.db beside the run folder "
                          "unless --tracking-uri), wandb (pip install 'cellclass\\[wandb]') or none.")] = "mlflow"
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow server or database URL (http://host:5000, sqlite:///x.db); "
                               "W&B: server URL.")] = None
    experiment: Annotated[str | None, typer.Option(
        "--experiment", help="MLflow experiment / W&B project (default: cellclass).")] = None
    log_model: Annotated[bool | None, typer.Option(
        "--log-model/--no-log-model", help="MLflow: log the trained network as an MLflow model (default: on for "
                                           "train, off for sweep trials).")] = None

    def open(self, out: Path, job_type: str) -> Tracker:
        """The tracker of the run folder ``out``: its default local store sits beside it."""
        from cellclass.tracking import make_tracker

        return make_tracker(self.tracker, self.tracking_uri, self.experiment, run_name=out.name, root=out.parent,
                            job_type=job_type, record=None if self.tracker == "none" else out / "tracking.json",
                            log_model=self.log_model is not False)
