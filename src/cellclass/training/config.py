"""The typed training configuration, its YAML form and ``--set key=value`` overrides.

The resolved configuration is saved in every run folder (``config.yaml``) and inside
every checkpoint, so a number can always be traced to the settings that made it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellclass.atomic import atomic_write_text
from cellclass.errors import ConfigError
from cellclass.textfiles import load_yaml

__all__ = ["ConfigError", "TrainConfig", "parse_set_options", "run_config"]


@dataclass
class TrainConfig:
    """Every setting of one training run.

    Attributes:
        model: Registry name (``cellclass models`` lists them).
        tasks: Tasks to train (all declared tasks when empty).
        image_size: Side of the square images the model sees.
        fit: How images become square: ``pad``, ``resize`` or ``crop``.
        channels: Channel indices to keep (all when empty).
        epochs: Maximum epochs, or ``None`` (``auto``, the default): enough epochs for
            about 1,200 optimizer steps, between 20 and 60 (40 for MitoCheck's 1,966 training
            images in batches of 64; 20, as before, from about 77,000 images up; see
            :func:`cellclass.training.optim.auto_epochs`). The number used is recorded in
            the run.
        batch_size: Global batch size (split across devices under DDP), or ``None``
            (``auto``, the default): the largest power of two from 64 down to 8 that gives
            an epoch at least 16 optimizer steps (see
            :func:`cellclass.training.optim.auto_batch_size`). The size used is recorded
            in the run.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: ``adamw`` or ``sgd``.
        schedule: ``onecycle``, ``cosine`` or ``none``.
        warmup_fraction: Fraction of steps spent warming up (one-cycle).
        label_smoothing: Cross-entropy label smoothing for single-label tasks.
        class_weights: Cross-entropy class weights for single-label tasks: ``none``,
            ``inverse`` (1/frequency) or ``sqrt`` (1/sqrt(frequency), the default: rare
            classes count more, as macro F1 asks, without letting a class of 15 images
            outweigh one of 1,800 a hundredfold). ``true``/``false`` mean inverse/none.
        multilabel_loss: ``bce``, ``focal`` or ``softf1``.
        pos_weight: Weight BCE positives by negatives/positives per class.
        task_weights: Loss weight per task (1 when absent).
        patience: Epochs without improvement before stopping (0: never stop early).
        monitor: Validation metric that picks the best epoch (``val/macro_f1`` is the
            mean over tasks; ``val/<task>/<metric>`` for one task).
        best_after: Fraction of the epochs before which no epoch can be the best: 0.5 (the
            default) chooses among the second half, 0 among all. While the learning rate is
            high, validation scores swing from epoch to epoch, and the highest of those
            swings is a lucky draw on the validation images more than a better model.
        augment: Train-time augmentation on batches.
        crop_scale: Random resized crop scale range, or ``None`` for no crop.
        intensity_scale: Per-channel multiplicative jitter.
        intensity_shift: Per-channel additive jitter.
        rotate: Largest angle (degrees) of a random rotation of each training image, on
            top of the D4 symmetries (0, the default: none; fastai's default is 10).
        normalize: ``percentile`` (per channel, fitted on train), ``image``, ``group``, ``none``.
        norm_low: Lower percentile mapped to 0.
        norm_high: Upper percentile mapped to 1.
        split: ``group``, ``random`` or ``predefined`` (default: group when groups exist).
        split_by: Group column to split by (default: the first declared group).
        val_fraction: Fraction of rows for validation.
        test_fraction: Fraction of rows for test.
        threshold_method: Per-class thresholds tuned on validation: ``f1``,
            ``prevalence`` or ``none`` (0.5).
        tta: D4 test-time augmentation at evaluation.
        seed: Seed of splits, weights, augmentation and data order.
        devices: Processes/devices (``--devices 2 --strategy ddp`` on CPU uses gloo).
        strategy: Fabric strategy (``auto``, ``ddp``, ``ddp_spawn``).
        accelerator: ``auto``, ``cpu``, ``gpu``.
        precision: Fabric precision (``32-true``, ``bf16-mixed``, ``16-mixed``), used as set,
            or ``auto``: on a CPU the fastest of float32, float32 channels-last and
            bf16-mixed, timed on the run's first batches and cached per machine and model
            shape (:mod:`cellclass.training.precision`; float32 for a run of under 10
            steps); on a GPU bf16-mixed where it supports bfloat16. What was used, how it
            was chosen and the timings are recorded under ``runtime`` in the run's
            config.yaml; a resumed run keeps its choice.
        channels_last: Use channels-last memory format for convolutional networks (under
            ``precision: auto``: allow it, the timing decides; ``false``: never).
        workers: Image decoding threads.
        pretrained: ``False``, ``True`` (hub, needs network) or a path to local weights.
        drop_rate: Dropout before the heads.
        head: What timm backbones' pooled features pass through before the task layers:
            ``linear`` (nothing) or ``mlp`` (fastai's head: average and max pooling
            concatenated, BatchNorm, dropout 0.25, linear to 512, ReLU, BatchNorm, dropout
            0.5).
        drop_path_rate: Stochastic depth of timm backbones (the chance a residual block
            is skipped, rising to this value in the last block; 0 is off).
        stem_pool: Keep the stem max-pool of ResNet-family backbones (``false``: feature
            maps twice as large on each side, for small single-cell crops).
        zero_init_last: Start the last BatchNorm of every residual block of timm's
            ResNet-family backbones at zero, so each block begins as the identity (timm's
            own default). ``false`` (the default) starts it at one, as torchvision and
            fastai do: higher test macro F1 on MitoCheck, Jurkat and AutoFoci
            (docs/results.md). cellclass's own networks have no residual blocks.
        ema_decay: Keep an exponential moving average of the weights with this decay per
            optimizer step; validation, checkpoints and evaluation then use the averaged
            weights. 0 (the default) is off; ``auto`` (``None``): ``1 - 6 / total steps``
            within [0.9, 0.9999], an average over about the last sixth of the run
            (:func:`~cellclass.training.optim.auto_ema_decay`). Off by default because it
            did not help on every real set (docs/results.md).
        mixup: Mixup of training batches (images blended in pairs, every task's loss
            blended alike): the concentration ``alpha`` of the ``Beta(alpha, alpha)`` blend
            weight (0, the default: off; 0.2-0.4 is usual).
        cutmix: CutMix of training batches: ``alpha`` as for mixup (0: off; 1.0 is usual).
            With both on, each batch uses one of them at random (see
            :mod:`cellclass.training.mixing`).
        pixels: Side the scikit-learn baselines downsample to.
        cache: Build the prepared image cache (``cellclass prepare``) when no valid one
            exists; a valid cache is used whenever present, whatever this says.
        cache_dir: Folder of prepared caches (default: ``$CELLCLASS_CACHE_DIR``, else
            ``.cellclass-cache/`` beside the manifest).
        loader_workers: Processes streaming training batches (``None``: a quarter of the
            cores for a cache; none for images in memory or below four cores).
        loader_memory_mb: Bound on the memory the training data path holds: the images
            are normalized once and kept in memory when that takes no more (else each
            batch is read and normalized on its own), the batches the loader workers
            queue fit in it, and a prepared cache larger than this is read without
            keeping its pages mapped.
    """

    model: str = "lenet5"
    tasks: list[str] = field(default_factory=list)
    image_size: int = 64
    fit: str = "pad"
    channels: list[int] = field(default_factory=list)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 3e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    label_smoothing: float = 0.1
    class_weights: str = "sqrt"
    multilabel_loss: str = "bce"
    pos_weight: bool = False
    task_weights: dict[str, float] = field(default_factory=dict)
    patience: int = 0
    monitor: str = "val/macro_f1"
    best_after: float = 0.5
    augment: bool = True
    crop_scale: list[float] | None = field(default_factory=lambda: [0.85, 1.0])
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    rotate: float = 0.0
    normalize: str = "percentile"
    norm_low: float = 1.0
    norm_high: float = 99.8
    split: str | None = None
    split_by: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    threshold_method: str = "f1"
    tta: bool = True
    seed: int = 0
    devices: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    workers: int = 4
    pretrained: bool | str = False
    drop_rate: float = 0.0
    head: str = "linear"
    drop_path_rate: float = 0.0
    stem_pool: bool = True
    zero_init_last: bool = False
    ema_decay: float | None = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    pixels: int = 32
    cache: bool = False
    cache_dir: str | None = None
    loader_workers: int | None = None
    loader_memory_mb: int = 512

    def __post_init__(self) -> None:
        self._coerce_numbers()
        if isinstance(self.epochs, str):
            self.epochs = _auto_or_number("epochs", self.epochs, int, "an integer >= 1")
        if isinstance(self.batch_size, str):
            self.batch_size = _auto_or_number("batch_size", self.batch_size, int, "an integer >= 1")
        if isinstance(self.ema_decay, str):
            self.ema_decay = _auto_or_number("ema_decay", self.ema_decay, float, "a number")
        if isinstance(self.class_weights, bool):
            self.class_weights = "inverse" if self.class_weights else "none"
        self._check_types()
        self._check_ranges()
        choices = {
            "class_weights": ("none", "inverse", "sqrt"),
            "optimizer": ("adamw", "sgd"),
            "schedule": ("onecycle", "cosine", "none"),
            "multilabel_loss": ("bce", "focal", "softf1"),
            "normalize": ("percentile", "image", "group", "none"),
            "threshold_method": ("f1", "prevalence", "none"),
            "fit": ("pad", "resize", "crop"),
            "head": ("linear", "mlp"),
        }
        for key, valid in choices.items():
            value = getattr(self, key)
            if value not in valid:
                raise ConfigError(f"{key} = {value!r} is invalid; valid: {', '.join(valid)}")
        if self.split is not None and self.split not in ("group", "random", "predefined"):
            raise ConfigError(f"split = {self.split!r} is invalid; valid: group, random, predefined")
        for key in ("epochs", "batch_size", "image_size", "devices"):
            if key in ("batch_size", "epochs") and getattr(self, key) is None:
                continue
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is invalid; valid: an integer >= 1")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ConfigError(f"loader_workers = {self.loader_workers!r} is invalid; valid: an integer >= 0 or null")
        if self.loader_memory_mb < 1:
            raise ConfigError(f"loader_memory_mb = {self.loader_memory_mb!r} is invalid; valid: an integer >= 1")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ConfigError("val_fraction and test_fraction must each lie in [0, 1)")

    def _check_types(self) -> None:
        """Every field holds a value of its declared type (a float field takes an integer)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, f.type):
                raise ConfigError(f"{f.name} = {value!r} is invalid; valid: {_describe(f.type)}")
            if f.type == "float":
                setattr(self, f.name, float(value))
            elif f.type.startswith("int") and isinstance(value, float):
                setattr(self, f.name, int(value))  # 64.0, as a sweep may sample it
            elif isinstance(value, tuple):
                setattr(self, f.name, list(value))

    def _check_ranges(self) -> None:
        """Numbers lie where the training loop can use them."""
        if not 0 <= self.norm_low < self.norm_high <= 100:
            raise ConfigError(f"norm_low = {self.norm_low!r} and norm_high = {self.norm_high!r} are invalid; "
                              "valid: percentiles with 0 <= norm_low < norm_high <= 100")
        if self.lr <= 0:
            raise ConfigError(f"lr = {self.lr!r} is invalid; valid: a number > 0")
        bounds = {"weight_decay": (0, None), "intensity_scale": (0, None), "intensity_shift": (0, None),
                  "warmup_fraction": (0, 1), "label_smoothing": (0, 1), "drop_rate": (0, 1),
                  "drop_path_rate": (0, 1), "ema_decay": (0, 1), "mixup": (0, None), "cutmix": (0, None),
                  "rotate": (0, 181), "best_after": (0, 1)}
        for key, (low, high) in bounds.items():
            value = getattr(self, key)
            if value is None:  # auto
                continue
            if value < low or (high is not None and value >= high):
                valid = f"a number >= {low}" + (f" and < {high}" if high is not None else "")
                raise ConfigError(f"{key} = {value!r} is invalid; valid: {valid}")
        for key in ("patience",):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is invalid; valid: an integer >= 0")
        for key in ("workers", "pixels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is invalid; valid: an integer >= 1")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction = {self.val_fraction} + {self.test_fraction} is "
                              "invalid; valid: a sum < 1, leaving rows to train on")
        if self.crop_scale is not None and (len(self.crop_scale) != 2
                                            or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(f"crop_scale = {self.crop_scale!r} is invalid; valid: [low, high] with "
                              "0 < low <= high <= 1, or null for no crop")
        negative = [c for c in self.channels if c < 0]
        if negative:
            raise ConfigError(f"channels = {self.channels!r} is invalid; valid: channel indices >= 0")
        weights = {k: v for k, v in self.task_weights.items() if v < 0}
        if weights:
            raise ConfigError(f"task_weights = {self.task_weights!r} is invalid; valid: weights >= 0")

    def _coerce_numbers(self) -> None:
        """YAML 1.1 reads ``1e-3`` as text: convert numeric fields given as text."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or f.type not in ("float", "int"):
                continue
            try:
                setattr(self, f.name, float(value) if f.type == "float" else int(value))
            except ValueError:
                raise ConfigError(f"{f.name} = {value!r} is invalid; valid: a number") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        """Write the config as YAML (atomically)."""
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error naming the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid: {', '.join(sorted(valid))}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`to_yaml` (or by hand)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = load_yaml(path, "config file", ConfigError) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping")
        return cls.from_dict(data)

    def override(self, values: Mapping[str, Any]) -> TrainConfig:
        """A copy with ``values`` applied (validated again)."""
        return TrainConfig.from_dict({**self.to_dict(), **dict(values)})


def run_config(run: str | Path) -> TrainConfig:
    """The resolved configuration of a finished or interrupted run (its folder's ``config.yaml``).

    Raises:
        ConfigError: When the folder holds no run.
    """
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run)!r} is not a run folder: no config.yaml (made by `cellclass train`)")
    return TrainConfig.from_dict(yaml.safe_load(path.read_text())["train"])


def _matches(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field annotation written as text (``"list[int]"``, ``"str | None"``)."""
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option.startswith("list[") and isinstance(value, list | tuple):
            if all(_matches(v, option[5:-1]) for v in value):
                return True
        elif option.startswith("dict[") and isinstance(value, dict):
            key_type, value_type = (t.strip() for t in option[5:-1].split(","))
            if all(_matches(k, key_type) and _matches(v, value_type) for k, v in value.items()):
                return True
        elif option in _SCALARS and _SCALARS[option][0](value):
            return True
    return False


def _describe(annotation: str) -> str:
    parts = []
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None":
            parts.append("null")
        elif option.startswith("list["):
            parts.append(f"a list of {_describe(option[5:-1]).removeprefix('a ').removeprefix('an ')}s")
        elif option.startswith("dict["):
            parts.append(f"a mapping of names to {_describe(option[5:-1].split(',')[1].strip())}s"
                         .replace("a mapping of names to a ", "a mapping of names to "))
        else:
            parts.append(_SCALARS[option][1])
    return " or ".join(parts)


_SCALARS: dict[str, tuple[Any, str]] = {
    "int": (lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
            "an integer"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _auto_or_number(key: str, text: str, parse: Callable[[str], Any], valid: str) -> Any:
    """``auto`` (``None``) or a number given as text, read by ``parse`` (``valid`` names it)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return parse(text)
    except ValueError:
        raise ConfigError(f"{key} = {text!r} is invalid; valid: {valid} or auto") from None


def parse_set_options(options: Iterable[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` options; values are read as YAML (``lr=1e-3``, ``tta=false``).

    Raises:
        ConfigError: When an option has no ``=``.
    """
    out: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {option!r} is invalid; valid: KEY=VALUE, e.g. --set lr=1e-3")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:
                parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out
