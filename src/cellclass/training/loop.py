"""The training loop, read top to bottom: :func:`train` checks the run folder and the
monitored metric, prepares data, split and normalization, builds the model, trains it
(:func:`train_one_epoch`, :func:`validate` and a :class:`~cellclass.training.saver.CheckpointSaver`
per epoch), then tunes thresholds and evaluates the best epoch on test.

Networks train on Lightning Fabric, which brings devices, mixed precision and DDP
(``--devices 2 --strategy ddp`` on CPU runs two gloo processes), in the precision and
memory format that ``precision: auto`` finds fastest by timing the first batches
(:mod:`cellclass.training.precision`), or as configured. Baselines from
scikit-learn go through the same data, split, normalization and evaluation, so their
numbers are comparable with the networks'. An interrupted run resumes from ``last.ckpt``:
the weights, and the :class:`Trainer`'s state dict (optimizer, schedule, random
generators, best epoch).

A run folder holds ``config.yaml`` (resolved configuration, dataset spec, split),
``encoders.json``, ``split.json``, ``metrics.csv`` (one row per epoch), ``metrics.json``
(final, with how the split was made), ``predictions.csv``, ``checkpoints/{best,last}.ckpt``,
``plots/`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import yaml
from lightning_fabric import Fabric
from torch.optim.swa_utils import AveragedModel

from cellclass.allocator import steady_allocator
from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.augment import AugmentConfig, BatchAugment
from cellclass.data.cache import iter_images
from cellclass.data.crops import crop_settings
from cellclass.data.labels import save_encoders
from cellclass.data.batches import BatchLoader, default_workers
from cellclass.data.normalize import NormalizedView
from cellclass.data.normalize import Normalizer
from cellclass.data.prepared import PreparedData, prepare_data, read_split, write_split
from cellclass.data.spec import DatasetSpec
from cellclass.errors import TrainingError
from cellclass.evaluation.metrics import task_metrics
from cellclass.evaluation.results import write_evaluation
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.predictor import Predictor
from cellclass.inference.probabilities import probabilities
from cellclass.models import create_model, is_baseline, model_info
from cellclass.progress import ProgressFn
from cellclass.training.config import TrainConfig
from cellclass.training.losses import build_loss, multitask_loss
from cellclass.training.mixing import batch_mix
from cellclass.training.optim import StepPlan, build_optimizer, build_scheduler, extended_scheduler, plan_steps
from cellclass.training.precision import choose_precision, resumed_choice
from cellclass.training.saver import CheckpointSaver

log = logging.getLogger(__name__)

EPOCH_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "map", "roc_auc")
"""Validation metrics every epoch records, per task (``val/<task>/<metric>``) and over tasks
(``val/<metric>``), for the task types that have them (see :data:`EPOCH_METRICS_BY_TYPE`)."""
EPOCH_METRICS_BY_TYPE = {"single": EPOCH_METRICS, "binary": EPOCH_METRICS,
                         "multilabel": ("macro_f1", "micro_f1", "map")}
RESUMABLE = {"epochs", "workers", "loader_workers", "loader_memory_mb", "cache", "cache_dir", "accelerator",
             "precision", "channels_last"}
"""Settings a resumed run may change: the epochs, and how this machine runs the same steps."""


class Tracker(Protocol):
    """What the loop tells an experiment tracker (see :mod:`cellclass.tracking`)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifacts(self, folder: Path) -> None: ...


def train(
    spec: DatasetSpec,
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    tracker: Tracker | None = None,
    data: PreparedData | None = None,
) -> dict[str, Any]:
    """Train one model and evaluate it; return the final ``metrics.json`` content.

    Args:
        spec: Dataset (restricted to ``config.tasks`` when given).
        config: Resolved configuration.
        out: Run folder.
        resume: Continue from ``out/checkpoints/last.ckpt``.
        progress: Progress callback.
        tracker: Experiment tracker told about params, per-epoch metrics and artifacts.
        data: Already prepared data (cross-validation reuses it across folds).

    Raises:
        TrainingError: When the run folder holds a finished or interrupted run and
            ``resume`` was not asked, ``resume`` was asked with nothing to resume, or with
            settings other than the run's (see :func:`resumed_config`), or when the
            monitored metric is not one the run records (checked before anything is read).
    """
    out = Path(out)
    previous = _previous_run(out, resume)
    if previous is not None:
        config = resumed_config(config, previous.config, previous.epoch, out)
    spec = spec.select_tasks(config.tasks)
    check_monitor(config.monitor, {t.name: t.type for t in spec.tasks})
    fabric = None if is_baseline(config.model) else _fabric(config, _launch_precision(config))
    is_main = fabric is None or fabric.is_global_zero

    # data, split and normalization
    if data is None:
        saved = read_split(out / "split.json") if resume else None
        data = prepare_data(spec, config, split_override=saved, progress=progress)
    _check_split(data, warn=is_main)
    plan = None if fabric is None else _step_plan(config, data, fabric.world_size, previous, log_it=is_main)
    if plan is not None:  # networks: the batch size used is recorded in the config of the run
        config = dataclasses.replace(config, batch_size=plan.batch_size, epochs=plan.epochs)
    norm = _fit_normalizer(data, config)
    x = normalized_images(data, norm, config)

    # model, the precision it trains in, and the run folder
    model = _create_model(config, data, in_chans=x.shape[1])
    loss_fn = _loss_fn(config, data)
    if fabric is not None and plan is not None:  # a network: timed on its first batches under auto
        fabric = _settle_precision(fabric, config, plan, model, x, data, loss_fn, previous)
    if is_main:
        _start_run_folder(out, spec, config, data, plan, tracker)
    template = _checkpoint_template(model, spec, data, config, norm, plan, out, in_chans=x.shape[1])

    # fit, then evaluate the best epoch
    started = time.perf_counter()
    if fabric is None:
        best_epoch = _fit_baseline(model, x, data, out, template, progress, tracker)
    else:
        with steady_allocator():  # freed buffers stay in the process: no page faults per step
            best_epoch = _fit_network(fabric, model, loss_fn, x, data, config, plan, out, template, previous,
                                      progress, tracker)
    seconds = time.perf_counter() - started
    if not is_main:
        return {}
    return finish_run(out, data, x, config, best_epoch=best_epoch, train_seconds=seconds, tracker=tracker,
                      steps=plan)


# -- before anything is read -----------------------------------------------------------
def _previous_run(out: Path, resume: bool) -> Checkpoint | None:
    """The last checkpoint of the run to resume (``None`` for a new run).

    Raises:
        TrainingError: When ``resume`` finds no run, or a new run would overwrite one.
    """
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise TrainingError(f"nothing to resume in {str(out)!r}: no checkpoints/last.ckpt")
    if not resume and (last.is_file() or (out / "metrics.json").is_file()):
        raise TrainingError(
            f"run folder {str(out)!r} already holds a run; pass --resume to continue it or choose another --out"
        )
    return Checkpoint.load(last) if resume else None


def resumed_config(config: TrainConfig, saved: Mapping[str, Any], done_epochs: int, out: Path) -> TrainConfig:
    """The configuration a resumed run continues with: ``config``, checked against the run's.

    ``batch_size: auto`` and ``epochs: auto`` take the run's. More epochs than are done extend the
    run; the settings in :data:`RESUMABLE` may differ (how this machine runs); any other
    difference is refused, as continuing would mix two configurations in one run.

    Raises:
        TrainingError: Naming each changed setting with the run's and the new value.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    before = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known}).to_dict()
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=before["batch_size"])
    if config.epochs is None:
        config = dataclasses.replace(config, epochs=before["epochs"])
    now = config.to_dict()
    changed = [k for k in now if k not in RESUMABLE and now[k] != before[k]]
    if changed:
        raise TrainingError(
            f"cannot resume {str(out)!r} with changed settings: "
            + "; ".join(f"{k} {before[k]!r} in the run, {now[k]!r} now" for k in changed)
            + f"; valid: the run's settings, more epochs than the {done_epochs} done, or a new --out for a new run"
        )
    if config.epochs <= done_epochs and config.epochs != before["epochs"]:
        runs = f", or the run's {before['epochs']}" if before["epochs"] > done_epochs else ""
        raise TrainingError(f"epochs = {config.epochs} is invalid to resume {str(out)!r}: {done_epochs} epoch(s) "
                            f"are done; valid: more than {done_epochs}{runs}")
    if config.epochs != before["epochs"]:
        log.info("resuming %s with epochs %d (was %d)", out, config.epochs, before["epochs"])
    return config


def monitor_names(task_types: Mapping[str, str]) -> list[str]:
    """Every metric a run of these tasks records per epoch and can pick its best epoch by.

    Args:
        task_types: Task name to type (``single``, ``binary``, ``multilabel``).
    """
    per_task = {task: EPOCH_METRICS_BY_TYPE[kind] for task, kind in task_types.items()}
    overall = [m for m in EPOCH_METRICS if any(m in metrics for metrics in per_task.values())]
    return (["val_loss"] + [f"val/{m}" for m in overall]
            + [f"val/{task}/{m}" for task, metrics in per_task.items() for m in metrics])


def check_monitor(monitor: str, task_types: Mapping[str, str]) -> None:
    """Refuse a monitored metric the run would not record, before any data is read.

    Raises:
        TrainingError: Naming the valid metrics.
    """
    valid = monitor_names(task_types)
    if monitor not in valid:
        raise TrainingError(f"monitor {monitor!r} is not a validation metric of this run (the best epoch is "
                            f"chosen on validation data); valid: {', '.join(valid)}")


def _fabric(config: TrainConfig, precision: str) -> Fabric:
    """The launched Fabric of a network's run (on CPU, DDP runs gloo processes; Fabric picks the backend)."""
    fabric = Fabric(accelerator=config.accelerator, devices=config.devices, strategy=config.strategy,
                    precision=precision)
    fabric.launch()
    return fabric


def _launch_precision(config: TrainConfig) -> str:
    """The precision the run's Fabric starts in: the configured one; under ``auto``, float32
    until the choice is made (:func:`_settle_precision` relaunches when it is another)."""
    return "32-true" if config.precision == "auto" else config.precision


# -- data, split and normalization ------------------------------------------------------
def _check_split(data: PreparedData, *, warn: bool) -> None:
    """Refuse a split without training or validation rows; log why the split is weaker than asked."""
    split = data.split
    note = data.split_note()
    if note and warn:
        log.warning(note)
    if len(split.train) == 0 or len(split.val) == 0:
        raise TrainingError(f"the split left {len(split.train)} training and {len(split.val)} validation rows; "
                            "use more data or other fractions")


def _step_plan(config: TrainConfig, data: PreparedData, world: int, previous: Checkpoint | None, *,
               log_it: bool) -> StepPlan:
    """A network's batch size, epochs and schedule; a resumed run keeps how they were chosen."""
    plan = plan_steps(config, len(data.split.train), world)
    chosen = (previous.steps if previous is not None else None) or {}
    if chosen.get("batch_size") == plan.batch_size:
        plan.batch_size_from = chosen.get("batch_size_from", plan.batch_size_from)
    if chosen.get("epochs") == plan.epochs:
        plan.epochs_from = chosen.get("epochs_from", plan.epochs_from)
    if log_it and plan.batch_size_from == "auto":
        log.info("batch size auto: %d (%d training images, %d optimizer steps per epoch)",
                 plan.batch_size, plan.train_images, plan.steps_per_epoch)
    if log_it and plan.epochs_from == "auto" and previous is None:
        log.info("epochs auto: %d (%d optimizer steps)", plan.epochs, plan.total_steps)
    if log_it and plan.schedule_note:
        log.warning("schedule: %s", plan.schedule_note)
    return plan


def _fit_normalizer(data: PreparedData, config: TrainConfig) -> Normalizer:
    """The normalization fitted on the training images, one image at a time (a cache larger
    than memory is never read whole)."""
    norm = Normalizer(mode=config.normalize, low=config.norm_low, high=config.norm_high)
    train_groups = None if data.groups is None else data.groups[data.split.train]
    norm.fit(iter_images(data.images, data.split.train), groups=train_groups, seed=config.seed)
    return norm


def normalized_images(data: PreparedData, normalizer: Normalizer, config: TrainConfig) -> Any:
    """The images as the network reads them: normalized with ``normalizer``.

    Within ``loader_memory_mb`` they are normalized once, into memory (a batch is then one
    gather, as in a plain loop over tensors in memory); otherwise a
    :class:`~cellclass.data.normalize.NormalizedView` normalizes each read.
    """
    view = NormalizedView(data.images, normalizer, data.groups)
    return view.materialize() if view.nbytes <= config.loader_memory_mb * 2**20 else view


# -- model and run folder ----------------------------------------------------------------
def _create_model(config: TrainConfig, data: PreparedData, *, in_chans: int) -> Any:
    """The network or baseline, one head per task, its weights drawn from ``config.seed``."""
    heads = {t: e.n_outputs for t, e in data.encoders.items()}
    kwargs: dict[str, Any] = {"task_types": {t: e.type for t, e in data.encoders.items()}}
    if is_baseline(config.model):
        kwargs["pixels"] = config.pixels
    else:
        kwargs.update(_network_kwargs(config))
    torch.manual_seed(config.seed)  # weights are initialised in create_model: seed first
    return create_model(config.model, in_chans=in_chans, heads=heads, image_size=config.image_size,
                        pretrained=config.pretrained, **kwargs)


def _network_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The network arguments the configuration sets (only those away from the networks' own
    defaults, so a model that lacks one is refused only when it is asked for;
    ``zero_init_last: false``, the training default, goes to timm backbones only)."""
    kwargs: dict[str, Any] = {}
    if config.drop_rate:
        kwargs["drop_rate"] = config.drop_rate
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    if not config.stem_pool:
        kwargs["stem_pool"] = False
    if not config.zero_init_last and model_info(config.model).source == "timm":
        kwargs["zero_init_last"] = False  # cellclass's own networks have no residual blocks
    if config.head != "linear":
        kwargs["head"] = config.head
    return kwargs


def _loss_fn(config: TrainConfig, data: PreparedData) -> Callable[..., torch.Tensor]:
    """The run's loss of ``(logits per task, targets per task)``, weighted from the training side."""
    return multitask_loss({t: build_loss(e, config, data.targets[t][data.split.train])
                           for t, e in data.encoders.items()}, config.task_weights)


def _settle_precision(fabric: Fabric, config: TrainConfig, plan: StepPlan, model: Any, x: Any, data: PreparedData,
                      loss_fn: Callable[..., torch.Tensor], previous: Checkpoint | None) -> Fabric:
    """Record in ``plan`` the precision and memory format the network trains in; return the
    Fabric that runs them (relaunched in the chosen precision when it is not the one started).

    As configured; for ``auto``, a resumed run's own choice, else the fastest on this machine
    (:func:`~cellclass.training.precision.choose_precision`, timed on the run's first batches),
    chosen by the main process and sent to the others, so every rank trains alike.
    """
    choice = resumed_choice(config, previous.steps if previous is not None else None)
    if choice is None:
        chosen = None
        if fabric.is_global_zero:
            per_rank = max(1, plan.batch_size // fabric.world_size)
            with steady_allocator():  # as training runs
                chosen = choose_precision(config, model, functools.partial(_first_batches, x, data, per_rank),
                                          loss_fn, device=fabric.device, batch_size=per_rank,
                                          total_steps=plan.total_steps)
        choice = fabric.broadcast(chosen, src=0)
    for key, value in choice.to_steps().items():
        setattr(plan, key, value)
    if fabric.is_global_zero and choice.source != "set":
        log.info("precision %s: training in %s, %s", choice.source, choice.precision, choice.memory_format)
    return fabric if choice.precision == _launch_precision(config) else _fabric(config, choice.precision)


def _first_batches(x: Any, data: PreparedData, batch_size: int, n: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The run's first ``n`` training batches, in split order (repeated where the side is short)."""
    idx = np.resize(data.split.train, batch_size * n)
    batches = []
    for k in range(n):
        rows = idx[k * batch_size : (k + 1) * batch_size]
        batches.append((torch.from_numpy(np.ascontiguousarray(x[rows])),
                        {t: torch.from_numpy(v[rows]) for t, v in data.targets.items()}))
    return batches


def _start_run_folder(out: Path, spec: DatasetSpec, config: TrainConfig, data: PreparedData,
                      plan: StepPlan | None, tracker: Tracker | None) -> None:
    """Write ``config.yaml``, ``encoders.json`` and ``split.json``; tell the tracker the parameters."""
    out.mkdir(parents=True, exist_ok=True)
    resolved = {
        "train": config.to_dict(),
        "runtime": {"precision": None if plan is None else plan.precision,
                    "steps": None if plan is None else plan.to_dict()},
        "dataset": {**spec.to_dict(), "base_dir": str(spec.base_dir)},
        "split": data.describe_split(),
    }
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    save_encoders(out / "encoders.json", data.encoders)
    write_split(out / "split.json", data)
    if tracker is not None:
        steps = {} if plan is None else {"batch_size_from": plan.batch_size_from,
                                         "steps_per_epoch": plan.steps_per_epoch, "schedule_used": plan.schedule,
                                         "precision_used": plan.precision, "memory_format": plan.memory_format,
                                         "precision_from": plan.precision_from,
                                         "precision_timings": plan.precision_timings or {}}
        tracker.log_params({**config.to_dict(), **steps, "dataset": spec.name, "split": data.split.method})


def _checkpoint_template(model: Any, spec: DatasetSpec, data: PreparedData, config: TrainConfig,
                         norm: Normalizer, plan: StepPlan | None, out: Path, *, in_chans: int) -> Checkpoint:
    """What every checkpoint of the run holds; each epoch adds its weights, epoch and metrics."""
    return Checkpoint(
        kind="baseline" if is_baseline(config.model) else "network",
        model_config=model.config,
        encoders=dict(data.encoders),
        normalizer=norm,
        image_size=config.image_size,
        fit=config.fit,
        channels=_channel_names(spec, in_chans, config.channels),
        channel_indices=list(config.channels),
        config=config.to_dict(),
        spec=spec.to_dict(),
        crops=crop_settings(spec),
        steps=None if plan is None else plan.to_dict(),
        run=str(out),
    )


def _channel_names(spec: DatasetSpec, n: int, indices: list[int]) -> list[str]:
    names = spec.image.channel_names or [f"ch{i}" for i in range(n if not indices else max(indices) + 1)]
    if indices:
        names = [names[i] if i < len(names) else f"ch{i}" for i in indices]
    return list(names)[:n] if len(names) >= n else [f"ch{i}" for i in range(n)]


# -- baselines -----------------------------------------------------------------------------
def _fit_baseline(model: Any, x: Any, data: PreparedData, out: Path, template: Checkpoint,
                  progress: ProgressFn | None, tracker: Tracker | None) -> int:
    """Fit a baseline once (its one "epoch"), record its validation metrics, save it; return 1."""
    train_idx = _labeled(data, data.split.train)
    if progress:
        progress("fitting baseline", 0, 1)
    started = time.perf_counter()
    model.fit(x[train_idx], {t: v[train_idx] for t, v in data.targets.items()})
    probs = {t: np.asarray(p) for t, p in model.predict_proba(x[data.split.val]).items()}
    row = {"epoch": 1, "seconds": round(time.perf_counter() - started, 3),
           **_val_metrics(data, data.split.val, probs)}
    _append_metrics(out, row)
    if tracker is not None:
        tracker.log_metrics(_numeric(row), step=1)
    fitted = template.replace(estimator=model, epoch=1)
    fitted.save(out / "checkpoints" / "best.ckpt")
    fitted.save(out / "checkpoints" / "last.ckpt")
    if progress:
        progress("fitting baseline", 1, 1)
    return 1


def _labeled(data: PreparedData, idx: np.ndarray) -> np.ndarray:
    """Rows of ``idx`` labeled in every single-label task (baselines cannot skip labels)."""
    keep = np.ones(len(idx), dtype=bool)
    for task, enc in data.encoders.items():
        if enc.type != "multilabel":
            keep &= data.targets[task][idx] >= 0
    return idx[keep]


# -- networks ------------------------------------------------------------------------------
def _fit_network(fabric: Fabric, model: Any, loss_fn: Callable[..., torch.Tensor], x: Any, data: PreparedData,
                 config: TrainConfig, plan: StepPlan, out: Path, template: Checkpoint, previous: Checkpoint | None,
                 progress: ProgressFn | None, tracker: Tracker | None) -> int:
    """Train the epochs after ``previous``'s (from the first for a new run) up to
    ``config.epochs``, or until patience is spent; return the best epoch."""
    fabric.seed_everything(config.seed)
    saver = CheckpointSaver(out / "checkpoints", config.monitor, config.patience,
                            first_candidate=first_candidate(config))
    if saver.first_candidate > 1 and fabric.is_global_zero:
        log.info("best epoch by %s chosen among epochs %d-%d (best_after %s)", config.monitor,
                 saver.first_candidate, config.epochs, config.best_after)
    trainer = Trainer(fabric, model, config, plan, loss_fn, saver)
    workers = config.loader_workers if config.loader_workers is not None else default_workers(x, fabric.world_size)
    loader = BatchLoader(x, batch_size=trainer.per_rank, augment=trainer.augment, workers=workers,
                         max_memory_mb=config.loader_memory_mb, channels_last=plan.channels_last)
    if previous is not None:
        trainer.model.load_state_dict(previous.state_dict)
        trainer.load_state_dict(previous.training_state)
        log.info("resuming %s after epoch %d (best %s = %.4f at epoch %d)", out, trainer.epoch, config.monitor,
                 saver.best_score, saver.best_epoch)
    try:
        for epoch in range(trainer.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            train_loss = train_one_epoch(trainer, loader, data, epoch, progress)
            val_loss, probs = validate(trainer, x, data)
            trainer.epoch = epoch
            row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                   "lr": trainer.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3),
                   **_val_metrics(data, data.split.val, probs)}
            improved = saver.update(epoch, _monitored(row, config.monitor, epoch))
            if fabric.is_global_zero:
                log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s %.4f  (%.1f s)", epoch, config.epochs,
                         row["train_loss"], row["val_loss"], config.monitor, row[config.monitor], row["seconds"])
                _append_metrics(out, row)
                if tracker is not None:
                    tracker.log_metrics(_numeric(row), step=epoch)
                checkpoint = template.replace(state_dict=_weights(trainer.evaluated), epoch=epoch, metrics=_numeric(row))
                saver.save(checkpoint, improved, trainer.state_dict())
            fabric.barrier()
            if saver.patience_spent:
                log.info("early stop at epoch %d: %s did not improve for %d epochs", epoch, config.monitor,
                         saver.bad_epochs)
                break
    finally:
        loader.close()
    return saver.best_epoch


class Trainer:
    """A network in training: the Fabric-wrapped model and optimizer, the learning-rate
    schedule, the generators of data order and augmentation, and the checkpoint saver.

    :meth:`state_dict` is what ``last.ckpt`` keeps beside the weights, and
    :meth:`load_state_dict` continues from it.

    Args:
        fabric: The launched Fabric.
        model: The network (set up for Fabric here).
        config: The run's configuration.
        plan: Its batch size, schedule and memory format.
        loss_fn: Loss of ``(logits per task, targets per task)``.
        saver: Best epoch, patience and checkpoint files.
    """

    def __init__(self, fabric: Fabric, model: Any, config: TrainConfig, plan: StepPlan,
                 loss_fn: Callable[..., torch.Tensor], saver: CheckpointSaver) -> None:
        if plan.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.fabric, self.config, self.plan, self.loss_fn, self.saver = fabric, config, plan, loss_fn, saver
        self.inner_optimizer = build_optimizer(model, config, fabric.device)
        self.scheduler = build_scheduler(self.inner_optimizer, config, plan.total_steps, plan.schedule)
        self.ema = weight_average(model, plan.ema_decay, fabric.device)
        self.model, self.optimizer = fabric.setup(model, self.inner_optimizer)
        self.order = torch.Generator().manual_seed(config.seed)
        self.augment = augmenter(config, fabric.global_rank)
        self.mix = batch_mix(config.mixup, config.cutmix, config.seed + 104729 + 7919 * fabric.global_rank)
        self.per_rank = max(1, plan.batch_size // fabric.world_size)
        self.epoch = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that training needs to continue after :attr:`epoch`."""
        return {"epoch": self.epoch, "epochs": self.config.epochs,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "order_rng": self.order.get_state(),
                "augment_rng": None if self.augment is None else self.augment.generator.get_state(),
                "mix_rng": None if self.mix is None else self.mix.state_dict(),
                **({} if self.ema is None else {"raw_weights": _weights(self.model),
                                                "ema_updates": int(self.ema.n_averaged)}),
                **self.saver.state_dict()}

    @property
    def evaluated(self) -> Any:
        """The network that is validated and saved: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; a run now planned for more epochs follows the
        longer run's schedule from the step reached."""
        self.optimizer.load_state_dict(state["optimizer"])
        if state["epochs"] == self.config.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            done = state["epoch"] * self.plan.steps_per_epoch
            self.scheduler = extended_scheduler(self.inner_optimizer, self.config, self.plan, done)
        self.order.set_state(state["order_rng"])
        if self.augment is not None and state.get("augment_rng") is not None:
            self.augment.generator.set_state(state["augment_rng"])
        if self.mix is not None and state.get("mix_rng") is not None:
            self.mix.load_state_dict(state["mix_rng"])
        self.saver.load_state_dict(state)
        self.epoch = state["epoch"]
        if self.ema is not None and "raw_weights" in state:  # the saved weights are the average
            self.ema.module.load_state_dict(_weights(self.model))
            self.ema.n_averaged.fill_(state["ema_updates"])
            _inner(self.model).load_state_dict(state["raw_weights"])


def train_one_epoch(trainer: Trainer, loader: BatchLoader, data: PreparedData, epoch: int,
                    progress: ProgressFn | None = None) -> float:
    """One pass over this rank's share of the training side, in a fresh random order;
    returns the training loss averaged over the images and the ranks."""
    fabric, model, plan = trainer.fabric, trainer.model, trainer.plan
    train_idx, world, per_rank = data.split.train, fabric.world_size, trainer.per_rank
    model.train()
    perm = torch.randperm(len(train_idx), generator=trainer.order)
    shard = perm[fabric.global_rank :: world][: len(train_idx) // world]
    steps = plan.steps_per_epoch
    batches = loader.epoch([train_idx[shard[s * per_rank : (s + 1) * per_rank].numpy()] for s in range(steps)])
    targets = {t: torch.from_numpy(v[train_idx]) for t, v in data.targets.items()}
    fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
    running, seen = 0.0, 0
    for step in range(steps):
        idx = shard[step * per_rank : (step + 1) * per_rank]
        xb = next(batches)  # read, normalized and augmented by the loader (see data/batches.py)
        xb = fabric.to_device(xb.contiguous(memory_format=fmt))
        yb = {t: fabric.to_device(v[idx]) for t, v in targets.items()}
        xb, loss_fn = (xb, trainer.loss_fn) if trainer.mix is None else trainer.mix(xb, trainer.loss_fn)
        loss = train_step(fabric, model, trainer.optimizer, trainer.scheduler, loss_fn, xb, yb)
        if trainer.ema is not None:
            trainer.ema.update_parameters(_inner(model))
        running += loss * len(idx)
        seen += len(idx)
        if progress and fabric.is_global_zero:
            progress(f"epoch {epoch}/{trainer.config.epochs}", step + 1, steps)
    return float(fabric.all_reduce(torch.tensor(running / max(seen, 1)), reduce_op="mean"))


def train_step(fabric: Fabric, model: Any, optimizer: Any, scheduler: Any, loss_fn: Callable[..., torch.Tensor],
               xb: torch.Tensor, yb: Mapping[str, torch.Tensor]) -> float:
    """One optimization step on a ready batch; returns its loss."""
    loss = loss_fn(model(xb), yb)
    optimizer.zero_grad(set_to_none=True)
    fabric.backward(loss)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def validate(trainer: Trainer, x: Any, data: PreparedData, batch_size: int = 256) -> tuple[float, dict[str, Any]]:
    """Validation loss and probabilities per task over the whole validation side.

    Every process evaluates the full side, so all ranks agree on the best epoch.
    """
    model, idx = trainer.evaluated, data.split.val
    model.eval()
    logits: dict[str, list[torch.Tensor]] = {t: [] for t in data.encoders}
    with torch.inference_mode(), trainer.fabric.autocast():
        for start in range(0, len(idx), batch_size):
            xb = trainer.fabric.to_device(torch.from_numpy(x[idx[start : start + batch_size]]))
            for t, v in model(xb).items():
                logits[t].append(v.float().cpu())
    joined = {t: torch.cat(v) for t, v in logits.items()}
    targets = {t: torch.from_numpy(v[idx]) for t, v in data.targets.items()}
    loss = float(trainer.loss_fn(joined, targets))
    return loss, {t: probabilities(v, data.encoders[t].type).numpy() for t, v in joined.items()}


def first_candidate(config: TrainConfig) -> int:
    """The first epoch that can be the best under ``config.best_after`` (at most the last)."""
    return int(config.best_after * config.epochs) + 1 if config.epochs else 1


def augmenter(config: TrainConfig, rank: int = 0) -> BatchAugment | None:
    """The training batches' :class:`~cellclass.data.augment.BatchAugment` (``None`` when off).

    Each rank of a distributed run draws from its own seed.
    """
    if not config.augment:
        return None
    crop = tuple(config.crop_scale) if config.crop_scale else None
    return BatchAugment(AugmentConfig(dihedral=True, crop_scale=crop, intensity_scale=config.intensity_scale,
                                      intensity_shift=config.intensity_shift, rotate=config.rotate),
                        seed=config.seed + 7919 * rank)


def weight_average(model: torch.nn.Module, decay: float, device: Any = None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (``None`` for decay 0).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
    first steps' random weights fade quickly in a short run.
    """
    if not decay:
        return None

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # counters (BatchNorm's batches tracked) follow the model
            torch._foreach_copy_(averaged, current)
            return
        beta = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        torch._foreach_lerp_(averaged, current, 1.0 - beta)

    return AveragedModel(model, device=device, multi_avg_fn=update, use_buffers=True)


def _inner(model: Any) -> torch.nn.Module:
    """The network inside Fabric's wrapper (and DDP's)."""
    inner = getattr(model, "module", model)
    return getattr(inner, "module", inner)


def _weights(model: Any) -> dict[str, torch.Tensor]:
    """The network's weights on the CPU, unwrapped from Fabric (and DDP)."""
    return {k: v.detach().cpu().contiguous() for k, v in _inner(model).state_dict().items()}


# -- per-epoch metrics -----------------------------------------------------------------------
def _val_metrics(data: PreparedData, idx: np.ndarray, probs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-epoch validation metrics named ``val/<task>/<metric>`` and ``val/<metric>``.

    ``val/<metric>`` is the task's value for a single-task run and the mean over tasks
    otherwise.
    """
    row: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for task, enc in data.encoders.items():
        y = data.targets[task][idx]
        p = np.asarray(probs[task], dtype=np.float64)
        keep = np.ones(len(y), dtype=bool) if enc.type == "multilabel" else y >= 0
        result = task_metrics(enc.type, y[keep], p[keep], enc.classes)
        for name in EPOCH_METRICS:
            value = result.get(name)
            if isinstance(value, (int, float)) and value is not None:
                row[f"val/{task}/{name}"] = float(value)
                per_metric.setdefault(name, []).append(float(value))
    for name, values in per_metric.items():
        row[f"val/{name}"] = float(np.mean(values))
    return row


def _monitored(row: Mapping[str, Any], monitor: str, epoch: int) -> float:
    """The monitored metric's value of an epoch's row.

    Raises:
        TrainingError: When this epoch's validation side leaves it undefined.
    """
    if monitor not in row:
        raise TrainingError(f"monitor {monitor!r} is undefined at epoch {epoch} (the validation side lacks what "
                            f"it needs, e.g. both classes of a task); valid here: "
                            f"{', '.join(k for k in row if k.startswith('val'))}")
    return row[monitor]


def _numeric(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}


def _append_metrics(out: Path, row: Mapping[str, Any]) -> None:
    path = out / "metrics.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(frame) and "epoch" in frame:
        frame = frame[frame["epoch"] < row["epoch"]]
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


# -- final evaluation ------------------------------------------------------------------------
def finish_run(out: Path, data: PreparedData, x: Any, config: TrainConfig, *, best_epoch: int,
               train_seconds: float, tracker: Tracker | None = None, steps: StepPlan | None = None) -> dict[str, Any]:
    """Tune thresholds on validation, evaluate the best checkpoint on test, write results.

    ``steps``: a network's batch size and schedule, recorded in ``metrics.json``.
    """
    predictor = Predictor.from_checkpoint(out, tta=config.tta)
    extra: dict[str, Any] = {"model": config.model, "best_epoch": best_epoch, "monitor": config.monitor,
                             "train_seconds": round(train_seconds, 2), "epochs_run": _epochs_run(out)}
    if steps is not None:
        extra.update(batch_size=steps.batch_size, steps=steps.to_dict())
    result = write_evaluation(out, predictor, data, x, threshold_method=config.threshold_method, extra=extra)
    if tracker is not None:
        flat = {f"test/{t}/{k}": v for t, m in result["tasks"].items() for k, v in m.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log_metrics(flat, step=best_epoch)
        tracker.log_artifacts(out)
    return result


def _epochs_run(out: Path) -> int:
    path = out / "metrics.csv"
    return int(pd.read_csv(path)["epoch"].max()) if path.is_file() else 0
