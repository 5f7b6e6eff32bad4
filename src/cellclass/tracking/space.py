"""Sweep files: search method, the metric to optimise, and the parameters' search space.

The format is the W&B sweep format, so the seed's files are read unchanged::

    method: bayes                  # grid | random | bayes (TPE; ``tpe`` also accepted)
    metric:
      name: val/macro_f1           # a validation metric, never a training one
      goal: maximize               # default: minimize for losses, maximize otherwise
    parameters:
      lr:
        min: 0.0001
        max: 0.01
        distribution: log_uniform_values   # or ``log: true``
      batch_size:
        values: [16, 32, 64]
      epochs:
        value: 3                   # a constant
    early_terminate:               # optional; W&B's hyperband, or ``pruner: median|none``
      type: hyperband
      min_iter: 2

Parameter names are :class:`~cellclass.training.config.TrainConfig` fields; their values
override the ``train`` options by name. A range's type follows the field's: ``batch_size``
ranges are integers, ``lr`` ranges are floats. Distributions: ``constant``, ``categorical``,
``uniform``, ``int_uniform``, ``q_uniform`` (``q``: step), ``log_uniform_values`` and
``log_uniform`` (W&B's meaning: ``min``/``max`` are natural-log exponents).
W&B keys that only concern W&B's own agent (``program``, ``command``, ``project`` ...) are
ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from cellclass.errors import ConfigError, SweepError
from cellclass.textfiles import load_yaml
from cellclass.training.config import TrainConfig

log = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform_values",
                 "log_uniform", "q_log_uniform_values")
PRUNERS = ("median", "hyperband", "none")
EPOCH_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "map", "roc_auc")
"""Validation metrics every epoch records (see :mod:`cellclass.training.loop`)."""

# Keys of a W&B sweep file that only W&B's agent uses.
_WANDB_ONLY = {"program", "command", "project", "entity", "name", "description", "controller", "job",
               "image_uri", "run_cap_per_agent", "settings", "apiVersion"}
# Names W&B training scripts commonly give TrainConfig fields; a seed file using them runs
# unchanged.
ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
           "batch": "batch_size", "dropout": "drop_rate", "img_size": "image_size", "input_size": "image_size",
           "optim": "optimizer", "wd": "weight_decay", "architecture": "model", "arch": "model"}
# Set by the sweep itself or meaningless per trial.
_NOT_SWEEPABLE = {"monitor": "the sweep's metric sets it", "devices": "a trial is one process; use --n-jobs"}


def _number(value: Any, what: str) -> float:
    """YAML 1.1 reads ``1e-4`` as text: accept numbers given as text."""
    if isinstance(value, bool):
        raise SweepError(f"{what} = {value!r} is invalid; valid: a number")
    if isinstance(value, (int, float)):
        return value
    try:
        text = str(value).strip()
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise SweepError(f"{what} = {value!r} is invalid; valid: a number") from None


def _field_types() -> dict[str, str]:
    # An optional setting (``batch_size: int | None``, None meaning auto) takes the type's ranges.
    return {f.name: str(f.type).removesuffix(" | None") for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class Parameter:
    """One swept :class:`~cellclass.training.config.TrainConfig` field.

    Attributes:
        name: Config field.
        kind: ``categorical``, ``int`` or ``float`` (constants are categorical with one value).
        values: Choices of a categorical parameter.
        low: Lower bound of a range.
        high: Upper bound of a range.
        log: Sample the range on a log scale.
        step: Quantization step of a range.
    """

    name: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_constant(self) -> bool:
        """A single value: not searched, applied to every trial."""
        return self.kind == "categorical" and len(self.values) == 1

    def grid_values(self) -> list[Any] | None:
        """Every value a grid visits, or ``None`` for a continuous range."""
        if self.kind == "categorical":
            return [self.encode(v) for v in self.values]
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = math.floor((self.high - self.low) / self.step + 1e-9)
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None

    def distribution(self) -> Any:
        """The Optuna distribution of the parameter."""
        if self.kind == "categorical":
            return CategoricalDistribution([self.encode(v) for v in self.values])
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    @staticmethod
    def encode(value: Any) -> Any:
        """Optuna choices are scalars: lists and mappings travel as JSON text."""
        return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value

    def decode(self, value: Any) -> Any:
        """The config value of an Optuna parameter value."""
        if self.kind == "categorical":
            for v in self.values:
                if self.encode(v) == value:
                    return v
        if self.kind == "int":
            return int(value)
        return value

    def describe(self) -> str:
        """Short text, e.g. ``lr: log-uniform [0.0001, 0.01]``."""
        if self.kind == "categorical":
            return f"{self.name}: {list(self.values)}"
        scale = "log-uniform" if self.log else "uniform"
        kind = "integer " if self.kind == "int" else ""
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.name}: {kind}{scale} [{self.low:g}, {self.high:g}]{step}"


@dataclass(frozen=True)
class SweepSpace:
    """A parsed sweep file.

    Attributes:
        method: ``grid``, ``random`` or ``bayes`` (TPE).
        metric: Validation metric to optimise.
        goal: ``minimize`` or ``maximize``.
        parameters: Searched parameters.
        constants: Parameters with one value, applied to every trial.
        pruner: ``{"type": "median" | "hyperband" | "none", ...}``.
        run_cap: The file's ``run_cap`` (trials when ``--n-trials`` is not given).
    """

    method: str
    metric: str
    goal: str
    parameters: tuple[Parameter, ...]
    constants: Mapping[str, Any] = field(default_factory=dict)
    pruner: Mapping[str, Any] = field(default_factory=lambda: {"type": "median"})
    run_cap: int | None = None

    # -- reading -----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SweepSpace:
        """Read a sweep file (YAML)."""
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"sweep file {str(path)!r} does not exist; valid: a YAML file with method, "
                             "metric and parameters")
        return cls.from_dict(load_yaml(path, "sweep file", SweepError), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "sweep") -> SweepSpace:
        """Build from the file's mapping; every problem names the key and what is valid."""
        if not isinstance(data, Mapping):
            raise SweepError(f"{source} must hold a mapping with method, metric and parameters; got "
                             f"{type(data).__name__}")
        known = {"method", "metric", "parameters", "early_terminate", "pruner", "run_cap"}
        ignored = sorted(k for k in data if k in _WANDB_ONLY)
        if ignored:
            log.info("%s: ignoring W&B agent keys %s", source, ", ".join(ignored))
        unknown = sorted(str(k) for k in data if k not in known and k not in _WANDB_ONLY)
        if unknown:
            raise SweepError(f"{source}: unknown key(s) {unknown}; valid: {', '.join(sorted(known))}")
        method = str(data.get("method", "")).lower()
        method = {"tpe": "bayes", "bayesian": "bayes"}.get(method, method)
        if method not in METHODS:
            raise SweepError(f"{source}: method = {data.get('method')!r} is invalid; valid: {', '.join(METHODS)} "
                             "(bayes is Optuna's TPE)")
        metric, goal = _metric(data.get("metric"), source)
        raw = data.get("parameters")
        if not isinstance(raw, Mapping) or not raw:
            raise SweepError(f"{source}: parameters must be a non-empty mapping of TrainConfig fields; got {raw!r}")
        params = [_parameter(_alias(str(name), source), spec, source) for name, spec in raw.items()]
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise SweepError(f"{source}: parameters name a setting twice ({', '.join(map(str, raw))}); "
                             "valid: each TrainConfig field once")
        searched = tuple(p for p in params if not p.is_constant)
        constants = {p.name: p.values[0] for p in params if p.is_constant}
        run_cap = data.get("run_cap")
        if run_cap is not None:
            run_cap = int(_number(run_cap, f"{source}: run_cap"))
            if run_cap < 1:
                raise SweepError(f"{source}: run_cap = {run_cap} is invalid; valid: an integer >= 1")
        space = cls(method=method, metric=metric, goal=goal, parameters=searched, constants=constants,
                    pruner=_pruner(data.get("pruner"), data.get("early_terminate"), source), run_cap=run_cap)
        if not searched:
            raise SweepError(f"{source}: every parameter has a single value, so there is nothing to search; "
                             "valid: at least one parameter with several values or a min/max range")
        return space

    # -- use ---------------------------------------------------------------------------
    def grid_size(self) -> int | None:
        """Number of grid points over the discrete parameters (``None`` unless ``grid``)."""
        if self.method != "grid":
            return None
        size = 1
        for p in self.parameters:
            values = p.grid_values()
            if values is not None:
                size *= len(values)
        return size

    def grid(self) -> dict[str, list[Any]]:
        """The discrete parameters' values (a grid samples continuous ranges at random)."""
        return {p.name: v for p in self.parameters if (v := p.grid_values()) is not None}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for every parameter; return config values."""
        values: dict[str, Any] = {}
        for p in self.parameters:
            if p.kind == "categorical":
                raw = trial.suggest_categorical(p.name, [p.encode(v) for v in p.values])
            elif p.kind == "int":
                raw = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                raw = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
            values[p.name] = p.decode(raw)
        return values

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Config values of an Optuna trial's ``params``."""
        by_name = {p.name: p for p in self.parameters}
        return {k: by_name[k].decode(v) if k in by_name else v for k, v in params.items()}

    def fingerprint(self) -> dict[str, Any]:
        """What defines the search (a study holds trials of one search only)."""
        return {"method": self.method, "metric": self.metric, "goal": self.goal,
                "parameters": [dataclasses.asdict(p) | {"values": list(p.values)} for p in self.parameters],
                "constants": dict(self.constants)}

    def check_metric(self, tasks: Sequence[str]) -> None:
        """Refuse a metric that is not a validation metric of these tasks.

        Raises:
            SweepError: Naming the valid validation metrics.
        """
        valid = valid_metrics(tasks)
        if self.metric in valid:
            return
        listing = ", ".join(valid)
        if self.metric.startswith(("train", "loss")) or self.metric in ("epoch", "lr", "seconds"):
            raise SweepError(
                f"sweep metric {self.metric!r} is a training metric: optimising it rewards overfitting, and "
                f"trials must be compared on held-out data; valid (validation metrics): {listing}")
        if self.metric.startswith("test"):
            raise SweepError(
                f"sweep metric {self.metric!r} is a test metric: choosing hyperparameters on the test split leaks "
                f"it into the result it should judge; valid (validation metrics): {listing}")
        close = difflib.get_close_matches(self.metric, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SweepError(f"sweep metric {self.metric!r} is not a validation metric of this dataset{hint}; "
                         f"valid: {listing}")

    def describe(self) -> str:
        """One line per parameter."""
        lines = [p.describe() for p in self.parameters]
        lines += [f"{k}: {v!r} (constant)" for k, v in self.constants.items()]
        return "\n".join(lines)


def valid_metrics(tasks: Sequence[str]) -> list[str]:
    """Validation metrics a sweep may optimise: ``val_loss``, ``val/<metric>`` and
    ``val/<task>/<metric>`` (``val/<metric>`` is the mean over tasks, the task's own value
    when there is one task)."""
    names = ["val_loss"] + [f"val/{m}" for m in EPOCH_METRICS]
    names += [f"val/{t}/{m}" for t in tasks for m in EPOCH_METRICS]
    return names


def _metric(raw: Any, source: str) -> tuple[str, str]:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or not raw.get("name"):
        raise SweepError(f"{source}: metric must be a mapping with name (and goal), e.g. "
                         "{name: val/macro_f1, goal: maximize}; got " + repr(raw))
    name = str(raw["name"])
    default = "minimize" if "loss" in name else "maximize"
    goal = str(raw.get("goal", default)).lower()
    if goal not in GOALS:
        raise SweepError(f"{source}: metric goal = {raw.get('goal')!r} is invalid; valid: {', '.join(GOALS)}")
    if goal != default:
        raise SweepError(f"{source}: metric {name!r} with goal {goal!r} is contradictory: the best epoch of each "
                         f"trial is chosen by {default.replace('ize', 'izing')} it; valid: goal {default}")
    return name, goal


def _pruner(pruner: Any, early: Any, source: str) -> dict[str, Any]:
    if pruner is not None and early is not None:
        raise SweepError(f"{source}: give pruner or early_terminate, not both")
    if early is not None:
        if not isinstance(early, Mapping) or str(early.get("type", "")).lower() != "hyperband":
            raise SweepError(f"{source}: early_terminate = {early!r} is invalid; valid: {{type: hyperband, "
                             "min_iter: N}} (or pruner: median|hyperband|none)")
        out: dict[str, Any] = {"type": "hyperband", "min_resource": int(_number(early.get("min_iter", 1),
                                                                                  "min_iter"))}
        if early.get("max_iter") is not None:
            out["max_resource"] = int(_number(early["max_iter"], "max_iter"))
        if early.get("eta") is not None:
            out["reduction_factor"] = int(_number(early["eta"], "eta"))
        return out
    if pruner is None:
        return {"type": "median"}
    if isinstance(pruner, str) or pruner is False:
        pruner = {"type": "none" if pruner is False else pruner}
    if not isinstance(pruner, Mapping) or str(pruner.get("type", "")).lower() not in PRUNERS:
        raise SweepError(f"{source}: pruner = {pruner!r} is invalid; valid: {', '.join(PRUNERS)}")
    kind = str(pruner["type"]).lower()
    options = {"median": ("startup_trials", "warmup_epochs"), "none": (),
               "hyperband": ("min_resource", "max_resource", "reduction_factor")}[kind]
    unknown = sorted(str(k) for k in pruner if k != "type" and k not in options)
    if unknown:
        raise SweepError(f"{source}: pruner {kind} has unknown option(s) {unknown}; valid: "
                         f"{', '.join(options) or 'none'}")
    return {"type": kind, **{k: int(_number(pruner[k], f"pruner {k}")) for k in options if k in pruner}}


def _alias(name: str, source: str) -> str:
    if name in ALIASES and name not in _field_types():
        log.info("%s: parameter %r is read as the setting %r", source, name, ALIASES[name])
        return ALIASES[name]
    return name


def _parameter(name: str, spec: Any, source: str) -> Parameter:
    """The parameter ``name`` of a sweep file, from its entry ``spec`` (checked)."""
    where = f"{source}: parameter {name!r}"
    types = _field_types()
    if name not in types:
        close = difflib.get_close_matches(name, list(types), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SweepError(f"{where} is not a training setting{hint}; valid: {', '.join(sorted(types))}")
    if name in _NOT_SWEEPABLE:
        raise SweepError(f"{where} cannot be swept: {_NOT_SWEEPABLE[name]}; valid: any other TrainConfig field")
    if not isinstance(spec, Mapping):  # shorthand: a list of values or one value
        spec = {"values": list(spec)} if isinstance(spec, list) else {"value": spec}
    allowed = {"values", "value", "min", "max", "distribution", "log", "q", "step", "probabilities"}
    unknown = sorted(str(k) for k in spec if k not in allowed)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(sorted(allowed))}")
    dist = _distribution(spec, where)
    if dist == "constant":
        if "value" not in spec:
            raise SweepError(f"{where}: a constant needs value: X")
        return Parameter(name, "categorical", values=(_checked(name, spec["value"], where),))
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: values must be a non-empty list; got {values!r}")
        checked = tuple(_checked(name, v, where) for v in values)
        if len({Parameter.encode(v) for v in checked}) != len(checked):
            raise SweepError(f"{where}: values {values!r} repeat a value; valid: distinct values")
        return Parameter(name, "categorical", values=checked)
    return _range(name, spec, dist, where, types[name])


def _distribution(spec: Mapping[str, Any], where: str) -> str:
    """A parameter's distribution: the one named, else what its keys imply."""
    dist = spec.get("distribution")
    if dist is None:
        dist = "categorical" if "values" in spec else "constant" if "value" in spec else None
        if dist is None and "min" in spec and "max" in spec:
            dist = "log_uniform_values" if spec.get("log") else "uniform"
    if dist not in DISTRIBUTIONS:
        raise SweepError(f"{where}: distribution = {spec.get('distribution')!r} is not supported; valid: "
                         f"{', '.join(DISTRIBUTIONS)} (or values: [...], value: X, min/max with log: true)")
    return dist


def _checked(name: str, value: Any, where: str) -> Any:
    """``value`` as the setting ``name`` takes it (``TrainConfig``'s own checks)."""
    try:
        return getattr(TrainConfig().override({name: value}), name)
    except (ConfigError, TypeError, ValueError) as exc:
        raise SweepError(f"{where}: value {value!r} is invalid: {exc}") from None


def _range(name: str, spec: Mapping[str, Any], dist: str, where: str, kind: str) -> Parameter:
    """A range parameter (``min``/``max``) of the setting ``name`` of type ``kind``; a range
    that holds one value is a constant."""
    if "min" not in spec or "max" not in spec:
        raise SweepError(f"{where}: distribution {dist} needs min and max")
    low, high = _number(spec["min"], f"{where} min"), _number(spec["max"], f"{where} max")
    step = spec.get("q", spec.get("step"))
    step = None if step is None else _number(step, f"{where} q")
    log_scale = dist in ("log_uniform_values", "log_uniform", "q_log_uniform_values") or bool(spec.get("log"))
    if dist == "log_uniform":  # W&B: exp(uniform(min, max))
        low, high = math.exp(low), math.exp(high)
    if dist == "int_uniform" and kind != "int":
        raise SweepError(f"{where}: int_uniform needs an integer setting; {name} is {kind}; valid: uniform")
    if dist in ("q_uniform", "q_log_uniform_values") and step is None:
        step = 1
    if low > high:
        raise SweepError(f"{where}: min {low!r} is above max {high!r}; valid: min <= max")
    if log_scale and low <= 0:
        raise SweepError(f"{where}: a log scale needs min > 0; got min = {low!r}")
    if step is not None and step <= 0:
        raise SweepError(f"{where}: q = {step!r} is invalid; valid: a number > 0")
    if kind == "int":
        return _int_range(name, low, high, step, log_scale, where)
    if kind != "float":
        raise SweepError(f"{where}: {name} is a {kind} setting, which takes values: [...], not a range")
    if log_scale and step is not None:
        raise SweepError(f"{where}: a log-scale range cannot be quantized (q = {step}); valid: drop q, or "
                         "list values: [...]")
    _checked(name, low, where), _checked(name, high, where)
    if low == high:
        return Parameter(name, "categorical", values=(float(low),))
    if step is not None:
        high = round(low + math.floor((high - low) / step + 1e-9) * step, 12)
    return Parameter(name, "float", low=float(low), high=float(high), log=log_scale,
                     step=None if step is None else float(step))


def _int_range(name: str, low: float, high: float, step: float | None, log_scale: bool, where: str) -> Parameter:
    """The integers of ``[low, high]`` as a parameter of the integer setting ``name``."""
    low_i, high_i = math.ceil(low), math.floor(high)
    if low_i > high_i:
        raise SweepError(f"{where}: no integer lies in [{low}, {high}]")
    step_i = int(step) if step else None
    if log_scale and step_i not in (None, 1):
        raise SweepError(f"{where}: a log-scale integer range cannot have q = {step}; valid: q = 1 or no q")
    _checked(name, low_i, where), _checked(name, high_i, where)
    if low_i == high_i:
        return Parameter(name, "categorical", values=(low_i,))
    return Parameter(name, "int", low=low_i, high=high_i, log=log_scale, step=step_i)
