"""The training loop, read top to bottom: data, split, normalization, model, epochs,
selection of the best epoch, thresholds, test evaluation, run folder.

Networks train on Lightning Fabric, which brings devices, mixed precision and DDP
(``--devices 2 --strategy ddp`` on CPU runs two gloo processes). Baselines from
scikit-learn go through the same data, split, normalization and evaluation, so their
numbers are comparable with the networks'.

A run folder holds ``config.yaml`` (resolved configuration, dataset spec, split),
``encoders.json``, ``split.json``, ``metrics.csv`` (one row per epoch), ``metrics.json``
(final, with how the split was made), ``predictions.csv``, ``checkpoints/{best,last}.ckpt``,
``plots/`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import yaml

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.labels import save_encoders
from cellclass.data.prepared import PreparedData, prepare_data, read_split, write_split
from cellclass.data.spec import DatasetSpec
from cellclass.errors import TrainingError
from cellclass.evaluation.metrics import task_metrics
from cellclass.evaluation.results import write_evaluation
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.predictor import Predictor
from cellclass.inference.probabilities import probabilities
from cellclass.progress import ProgressFn
from cellclass.training.config import TrainConfig

log = logging.getLogger(__name__)

EPOCH_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "map", "roc_auc")

AUTO_BATCH_MAX = 64
"""Largest batch ``batch_size: auto`` picks (every set with 1,024 training images or more)."""
AUTO_BATCH_MIN = 8
"""Smallest batch ``batch_size: auto`` picks, however small the training set."""
AUTO_MIN_STEPS = 16
"""Optimizer steps an epoch should have under ``batch_size: auto``."""
MIN_WARMUP_STEPS = 2
"""Fewest warm-up steps of a one-cycle schedule: with fewer the rate cannot rise (and
torch's ``OneCycleLR`` divides by zero at exactly one)."""
RESUMABLE = {"epochs", "workers", "loader_workers", "loader_memory_mb", "cache", "cache_dir", "accelerator",
             "precision", "channels_last"}
"""Settings a resumed run may change: the epochs, and how this machine runs the same steps."""


class Tracker(Protocol):
    """What the loop tells an experiment tracker (see :mod:`cellclass.tracking`)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifacts(self, folder: Path) -> None: ...


def auto_batch_size(n_train: int) -> int:
    """The batch size of ``batch_size: auto`` for ``n_train`` training images.

    The largest power of two from :data:`AUTO_BATCH_MAX` (64) down to :data:`AUTO_BATCH_MIN`
    (8) that gives an epoch at least :data:`AUTO_MIN_STEPS` (16) optimizer steps: a set of
    1,024 training images or more trains at 64, one of 206 at 8, so that a small set gets
    enough updates to learn from instead of a handful per epoch.
    """
    batch = AUTO_BATCH_MAX
    while batch > AUTO_BATCH_MIN and n_train // batch < AUTO_MIN_STEPS:
        batch //= 2
    return batch


@dataclass
class StepPlan:
    """How a run steps through its epochs: batch size, steps and the learning-rate schedule.

    Attributes:
        batch_size: Global batch size used.
        batch_size_from: ``auto`` (chosen by :func:`auto_batch_size`) or ``config``.
        train_images: Training images per epoch.
        steps_per_epoch: Optimizer steps per epoch (a last partial batch is dropped).
        total_steps: Optimizer steps of the whole run.
        schedule: Schedule used (``onecycle``, ``cosine`` or ``none``).
        schedule_note: Why it is not the configured one (``None`` when it is).
    """

    batch_size: int
    batch_size_from: str
    train_images: int
    steps_per_epoch: int
    total_steps: int
    schedule: str
    schedule_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (recorded in config.yaml, metrics.json and the checkpoints)."""
        return dataclasses.asdict(self)


def plan_steps(config: TrainConfig, n_train: int, world: int = 1) -> StepPlan:
    """Resolve the batch size (``auto`` or the configured one) and the schedule that fits.

    One-cycle needs :data:`MIN_WARMUP_STEPS` warm-up steps; a run with fewer (a small set,
    few epochs) decays the rate by cosine from its peak instead.
    """
    batch = config.batch_size if config.batch_size is not None else auto_batch_size(n_train)
    per_rank = max(1, batch // world)
    steps = max(1, (n_train // world) // per_rank)
    total = steps * config.epochs
    schedule, note = config.schedule, None
    warmup = config.warmup_fraction * total
    if schedule == "onecycle" and warmup < MIN_WARMUP_STEPS:
        schedule = "cosine"
        note = (f"onecycle needs at least {MIN_WARMUP_STEPS} warm-up steps, and {total} step(s) x "
                f"warmup_fraction {config.warmup_fraction:g} give {warmup:.3g}: training with cosine decay from "
                "the peak rate (no warm-up) instead")
    return StepPlan(batch_size=batch, batch_size_from="config" if config.batch_size is not None else "auto",
                    train_images=n_train, steps_per_epoch=steps, total_steps=total, schedule=schedule,
                    schedule_note=note)


def resumed_config(config: TrainConfig, saved: Mapping[str, Any], done_epochs: int, out: Path) -> TrainConfig:
    """The configuration a resumed run continues with: ``config``, checked against the run's.

    ``batch_size: auto`` takes the run's batch size. More epochs than are done extend the
    run; the settings in :data:`RESUMABLE` may differ (how this machine runs); any other
    difference is refused, as continuing would mix two configurations in one run.

    Raises:
        TrainingError: Naming each changed setting with the run's and the new value.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    before = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known}).to_dict()
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=before["batch_size"])
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
            settings other than the run's (see :func:`resumed_config`).
    """
    from cellclass.models import create_model, is_baseline

    out = Path(out)
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise TrainingError(f"nothing to resume in {str(out)!r}: no checkpoints/last.ckpt")
    if not resume and (last.is_file() or (out / "metrics.json").is_file()):
        raise TrainingError(
            f"run folder {str(out)!r} already holds a run; pass --resume to continue it or choose another --out"
        )
    state = None
    if resume:
        state = Checkpoint.load(out, "last")
        config = resumed_config(config, state.config, state.epoch, out)
    if not (config.monitor == "val_loss" or config.monitor.startswith("val/")):
        raise TrainingError(
            f"monitor {config.monitor!r} is not a validation metric; the best epoch is chosen on validation "
            "data: use val_loss, val/<metric> or val/<task>/<metric> (e.g. val/macro_f1)"
        )
    spec = spec.select_tasks(config.tasks)
    fabric = None
    if not is_baseline(config.model):
        fabric = _fabric(config)
    is_main = fabric is None or fabric.is_global_zero

    split_override = read_split(out / "split.json") if resume else None
    if data is None:
        data = prepare_data(spec, config, split_override=split_override, progress=progress)
    split = data.split
    if data.split_warning and is_main:
        log.warning(data.split_warning)
    if len(split.train) == 0 or len(split.val) == 0:
        raise TrainingError(f"the split left {len(split.train)} training and {len(split.val)} validation rows; "
                            "use more data or other fractions")
    plan = None
    if fabric is not None:  # networks: the batch size used is recorded in the config of the run
        plan = plan_steps(config, len(split.train), fabric.world_size)
        config = dataclasses.replace(config, batch_size=plan.batch_size)
        chosen = (state.steps if state is not None else None) or {}
        if chosen.get("batch_size") == plan.batch_size:  # resumed: as the run chose it
            plan.batch_size_from = chosen.get("batch_size_from", plan.batch_size_from)
        if is_main and plan.batch_size_from == "auto":
            log.info("batch size auto: %d (%d training images, %d optimizer steps per epoch)",
                     plan.batch_size, plan.train_images, plan.steps_per_epoch)
        if is_main and plan.schedule_note:
            log.warning("schedule: %s", plan.schedule_note)

    from cellclass.data.normalize import Normalizer

    norm = Normalizer(mode=config.normalize, low=config.norm_low, high=config.norm_high)
    train_groups = None if data.groups is None else data.groups[split.train]
    from cellclass.data.cache import iter_images

    # One training image at a time: a cache larger than memory is never read whole.
    norm.fit(iter_images(data.images, split.train), groups=train_groups, seed=config.seed)
    x = normalized_images(data, norm, config)

    heads = {t: e.n_outputs for t, e in data.encoders.items()}
    task_types = {t: e.type for t, e in data.encoders.items()}
    model_kwargs: dict[str, Any] = {"task_types": task_types}
    if is_baseline(config.model):
        model_kwargs["pixels"] = config.pixels
    elif config.drop_rate:
        model_kwargs["drop_rate"] = config.drop_rate
    import torch

    torch.manual_seed(config.seed)  # weights are initialised in create_model: seed first
    model = create_model(config.model, in_chans=x.shape[1], heads=heads, image_size=config.image_size,
                         pretrained=config.pretrained, **model_kwargs)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_run_header(out, spec, config, data, plan)
        if tracker is not None:
            steps = {} if plan is None else {"batch_size_from": plan.batch_size_from,
                                             "steps_per_epoch": plan.steps_per_epoch, "schedule_used": plan.schedule}
            tracker.log_params({**config.to_dict(), **steps, "dataset": spec.name, "split": split.method})

    common = Checkpoint(
        kind="baseline" if fabric is None else "network",
        model_config=model.config,
        encoders=dict(data.encoders),
        channels=_channel_names(spec, x.shape[1], config.channels),
        channel_indices=list(config.channels),
        image_size=config.image_size,
        fit=config.fit,
        normalizer=norm,
        config=config.to_dict(),
        steps=None if plan is None else plan.to_dict(),
        spec=spec.to_dict(),
        run=str(out),
    )
    started = time.perf_counter()
    if fabric is None:
        best_epoch = _fit_baseline(model, x, data, out, common, progress, tracker)
    else:
        from cellclass.allocator import steady_allocator

        with steady_allocator():  # freed buffers stay in the process: no page faults per step
            best_epoch = _fit_network(fabric, model, x, data, config, plan, out, common, state, progress, tracker)
    seconds = time.perf_counter() - started
    if not is_main:
        return {}
    return finish_run(out, data, x, config, best_epoch=best_epoch, train_seconds=seconds, tracker=tracker,
                      steps=plan)


# -- set-up --------------------------------------------------------------------------
def normalized_images(data: PreparedData, normalizer: Any, config: TrainConfig) -> Any:
    """The images as the network reads them: normalized with ``normalizer``.

    Within ``loader_memory_mb`` they are normalized once, into memory (a batch is then one
    gather, as in a plain loop over tensors in memory); otherwise a
    :class:`~cellclass.data.loading.NormalizedView` normalizes each read.
    """
    from cellclass.data.loading import NormalizedView

    view = NormalizedView(data.images, normalizer, data.groups)
    return view.materialize() if view.nbytes <= config.loader_memory_mb * 2**20 else view


def resolve_precision(config: TrainConfig) -> str:
    """The Fabric precision a network trains in: ``config.precision``, or for ``auto``:

    ``bf16-mixed`` on a GPU, and on a CPU with native bfloat16 instructions (``avx512_bf16``
    or ``amx_bf16``), where it trains faster than float32 at the same test accuracy
    (``benchmarks/train_step.py``, figures in docs/benchmarks.md); ``32-true`` on other
    CPUs, which would only emulate bfloat16.
    """
    if config.precision != "auto":
        return config.precision
    import torch

    if config.accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bfloat16 arithmetic natively (Linux ``/proc/cpuinfo`` flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _fabric(config: TrainConfig) -> Any:
    import torch
    from lightning_fabric import Fabric

    precision = resolve_precision(config)
    if config.precision == "auto":
        log.info("precision auto: training in %s", precision)
    strategy = config.strategy
    if strategy == "ddp" and config.accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        strategy = "ddp"  # gloo on CPU; Fabric picks the backend
    fabric = Fabric(accelerator=config.accelerator, devices=config.devices, strategy=strategy,
                    precision=precision)
    fabric.launch()
    return fabric


def _channel_names(spec: DatasetSpec, n: int, indices: list[int]) -> list[str]:
    names = spec.image.channel_names or [f"ch{i}" for i in range(n if not indices else max(indices) + 1)]
    if indices:
        names = [names[i] if i < len(names) else f"ch{i}" for i in indices]
    return list(names)[:n] if len(names) >= n else [f"ch{i}" for i in range(n)]


def _write_run_header(out: Path, spec: DatasetSpec, config: TrainConfig, data: PreparedData,
                      plan: StepPlan | None) -> None:
    resolved = {
        "train": config.to_dict(),
        "runtime": {"precision": None if plan is None else resolve_precision(config),
                    "steps": None if plan is None else plan.to_dict()},
        "dataset": {**spec.to_dict(), "base_dir": str(spec.base_dir)},
        "split": data.describe_split(),
    }
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    save_encoders(out / "encoders.json", data.encoders)
    write_split(out / "split.json", data)


# -- baselines -----------------------------------------------------------------------
def _fit_baseline(model: Any, x: np.ndarray, data: PreparedData, out: Path, common: Checkpoint,
                  progress: ProgressFn | None, tracker: Tracker | None) -> int:
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
    fitted = common.replace(estimator=model, epoch=1)
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


# -- networks ------------------------------------------------------------------------
def _fit_network(fabric: Any, model: Any, x: np.ndarray, data: PreparedData, config: TrainConfig,
                 plan: StepPlan, out: Path, common: Checkpoint, state: Checkpoint | None,
                 progress: ProgressFn | None, tracker: Tracker | None) -> int:
    """Train epochs ``state["epoch"] + 1`` (or 1) to ``config.epochs``; return the best epoch."""
    import torch

    from cellclass.training.losses import build_loss, multitask_loss

    fabric.seed_everything(config.seed)
    split = data.split
    train_idx = split.train
    losses = {t: build_loss(e, config, data.targets[t][train_idx]) for t, e in data.encoders.items()}
    total_loss = multitask_loss(losses, config.task_weights)

    world = fabric.world_size
    per_rank = max(1, plan.batch_size // world)
    shard_len = len(train_idx) // world
    steps = plan.steps_per_epoch

    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    inner_optimizer = _optimizer(model, config, fabric.device)
    scheduler = _scheduler(inner_optimizer, config, plan.total_steps, plan.schedule)
    model, optimizer = fabric.setup(model, inner_optimizer)

    order = torch.Generator().manual_seed(config.seed)
    augment = augmenter(config, fabric.global_rank)

    from cellclass.data.loader import BatchLoader, default_workers

    workers = config.loader_workers if config.loader_workers is not None else default_workers(x, world)
    loader = BatchLoader(x, batch_size=per_rank, augment=augment, workers=workers,
                         max_memory_mb=config.loader_memory_mb, channels_last=config.channels_last)

    monitor, mode = config.monitor, ("min" if "loss" in config.monitor else "max")
    best_score, best_epoch, bad_epochs, start_epoch = -math.inf, 0, 0, 0
    if state is not None:
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(state.training_state["optimizer"])
        if state.training_state["epochs"] == config.epochs:
            scheduler.load_state_dict(state.training_state["scheduler"])
        else:  # more epochs: the schedule of the longer run, at the step reached
            scheduler = _extended_scheduler(inner_optimizer, config, plan, state.training_state["epoch"] * steps)
        order.set_state(state.training_state["order_rng"])
        if augment is not None and state.training_state.get("augment_rng") is not None:
            augment.generator.set_state(state.training_state["augment_rng"])
        best_score = state.training_state["best_score"]
        best_epoch = state.training_state["best_epoch"]
        bad_epochs = state.training_state["bad_epochs"]
        start_epoch = state.training_state["epoch"]
        log.info("resuming %s after epoch %d (best %s = %.4f at epoch %d)",
                 out, start_epoch, monitor, best_score, best_epoch)

    y_train = {t: torch.from_numpy(v[train_idx]) for t, v in data.targets.items()}
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        perm = torch.randperm(len(train_idx), generator=order)
        shard = perm[fabric.global_rank :: world][:shard_len]
        batches = loader.epoch([train_idx[shard[s * per_rank : (s + 1) * per_rank].numpy()] for s in range(steps)])
        running, seen = 0.0, 0
        for step in range(steps):
            idx = shard[step * per_rank : (step + 1) * per_rank]
            xb = next(batches)  # read, normalized and augmented by the loader (see data/loader.py)
            xb = fabric.to_device(xb.contiguous(memory_format=fmt))
            yb = {t: fabric.to_device(v[idx]) for t, v in y_train.items()}
            loss = train_step(fabric, model, optimizer, scheduler, total_loss, xb, yb)
            running += loss * len(idx)
            seen += len(idx)
            if progress and fabric.is_global_zero:
                progress(f"epoch {epoch}/{config.epochs}", step + 1, steps)
        train_loss = fabric.all_reduce(torch.tensor(running / max(seen, 1)), reduce_op="mean")
        val_loss, probs = _evaluate_val(fabric, model, x, data, total_loss)
        row = {"epoch": epoch, "train_loss": round(float(train_loss), 6), "val_loss": round(val_loss, 6),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3),
               **_val_metrics(data, split.val, probs)}
        if monitor not in row:
            raise TrainingError(f"monitor {monitor!r} is not a validation metric; valid: "
                                f"{', '.join(k for k in row if k.startswith('val'))}")
        if fabric.is_global_zero:
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s %.4f  (%.1f s)", epoch, config.epochs,
                     row["train_loss"], row["val_loss"], monitor, row[monitor], row["seconds"])
        score = row[monitor] if mode == "max" else -row[monitor]
        score = -math.inf if score is None or (isinstance(score, float) and math.isnan(score)) else score
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
        else:
            bad_epochs += 1
        unwrapped = _unwrap(model)
        weights = {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
        if fabric.is_global_zero:
            _append_metrics(out, row)
            if tracker is not None:
                tracker.log_metrics(_numeric(row), step=epoch)
            checkpoint = common.replace(state_dict=weights, epoch=epoch, metrics=_numeric(row))
            if improved:
                checkpoint.save(out / "checkpoints" / "best.ckpt")
            checkpoint.replace(training_state={
                "epoch": epoch, "epochs": config.epochs,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "order_rng": order.get_state(),
                "augment_rng": None if augment is None else augment.generator.get_state(),
                "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs}).save(
                out / "checkpoints" / "last.ckpt")
        fabric.barrier()
        if config.patience and bad_epochs >= config.patience:
            log.info("early stop at epoch %d: %s did not improve for %d epochs", epoch, monitor, bad_epochs)
            break
    loader.close()
    return best_epoch


def augmenter(config: TrainConfig, rank: int = 0) -> Any:
    """The training batches' :class:`~cellclass.data.augment.BatchAugment` (``None`` when off).

    Each rank of a distributed run draws from its own seed.
    """
    from cellclass.data.augment import AugmentConfig, BatchAugment

    if not config.augment:
        return None
    crop = tuple(config.crop_scale) if config.crop_scale else None
    return BatchAugment(AugmentConfig(dihedral=True, crop_scale=crop, intensity_scale=config.intensity_scale,
                                      intensity_shift=config.intensity_shift), seed=config.seed + 7919 * rank)


def train_step(fabric: Any, model: Any, optimizer: Any, scheduler: Any, total_loss: Any, xb: Any,
               yb: Mapping[str, Any]) -> float:
    """One optimization step on a ready batch; returns its loss."""
    loss = total_loss(model(xb), yb)
    optimizer.zero_grad(set_to_none=True)
    fabric.backward(loss)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _unwrap(model: Any) -> Any:
    inner = getattr(model, "module", model)
    return getattr(inner, "module", inner) if hasattr(inner, "module") else inner


def _optimizer(model: Any, config: TrainConfig, device: Any = None) -> Any:
    """AdamW (or SGD) with weight decay on weights only; ``device``: where training runs."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    # The fused kernel makes the same update in one pass over all parameters instead of
    # torch's default per-tensor loop on a CPU, which shows in a small network's step.
    where = {torch.device(device).type} if device is not None else {p.device.type for p in decay + no_decay}
    fused = where <= {"cpu", "cuda"} and all(p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


def _scheduler(optimizer: Any, config: TrainConfig, total_steps: int, schedule: str | None = None) -> Any:
    """The learning-rate schedule over ``total_steps`` (``schedule``: one that fits, from
    :func:`plan_steps`; ``config.schedule`` when not given)."""
    import torch

    schedule = schedule or config.schedule
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                   pct_start=config.warmup_fraction)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _extended_scheduler(optimizer: Any, config: TrainConfig, plan: StepPlan, done: int) -> Any:
    """The schedule of a run resumed with more epochs: built for the longer run, at step ``done``.

    The loaded optimizer state carries the old schedule's values (rates, momenta); they are
    reset to the configured ones first, as when the run started.
    """
    for group in optimizer.param_groups:
        for key in ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"):
            group.pop(key, None)
        group["lr"] = config.lr
        for key in ("betas", "momentum"):
            if key in group and key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
    scheduler = _scheduler(optimizer, config, plan.total_steps, plan.schedule)
    with warnings.catch_warnings():  # no optimizer step between these scheduler steps, by design
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(done):
            scheduler.step()
    log.info("learning-rate schedule %s rebuilt for %d steps, continuing at step %d", plan.schedule,
             plan.total_steps, done)
    return scheduler


def _evaluate_val(fabric: Any, model: Any, x: np.ndarray, data: PreparedData,
                  total_loss: Callable[..., Any], batch_size: int = 256) -> tuple[float, dict[str, np.ndarray]]:
    """Validation loss and probabilities over the whole validation set.

    Every process evaluates the full set, so all ranks agree on the best epoch.
    """
    import torch

    model.eval()
    idx = data.split.val
    logits: dict[str, list[torch.Tensor]] = {t: [] for t in data.encoders}
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            xb = fabric.to_device(torch.from_numpy(x[idx[start : start + batch_size]]))
            for t, v in model(xb).items():
                logits[t].append(v.float().cpu())
    joined = {t: torch.cat(v) for t, v in logits.items()}
    targets = {t: torch.from_numpy(v[idx]) for t, v in data.targets.items()}
    loss = float(total_loss(joined, targets))
    probs = {t: probabilities(v, data.encoders[t].type).numpy() for t, v in joined.items()}
    return loss, probs


# -- metrics -------------------------------------------------------------------------
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


# -- final evaluation ----------------------------------------------------------------
def finish_run(out: Path, data: PreparedData, x: np.ndarray, config: TrainConfig, *, best_epoch: int,
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
