"""The precision and memory format a network trains in, and for ``precision: auto`` the
fastest on this machine, found by timing.

Whether bfloat16 pays on a CPU is not told by its flags: some CPUs with native bfloat16
instructions train faster in bf16 than in float32, others that report the same
instructions slower (docs/benchmarks.md). So ``auto`` does what ``cudnn.benchmark`` does
for kernels: before training, on the run's first batches, it times a few optimizer steps
(forward, loss, backward, step, as the training loop runs them) of every candidate on a
copy of the network and a fresh optimizer, so training itself starts untouched, and keeps
the fastest. The candidates (:func:`candidates`): float32, float32 channels-last (networks
with convolutions) and bf16-mixed (where bfloat16 autocast runs on the device).

The choice is kept in a small JSON file per user (:func:`cache_path`), keyed by the
machine (CPU model, torch version, threads) and the model's shape (architecture, input
channels, image size, batch size), so the next run of the same shape on the same machine
starts at once (``auto: cached``). A run of fewer than :data:`MIN_STEPS_TO_TIME` steps is
not timed; it trains in float32 unless a cached choice exists. On a GPU ``auto`` is
bf16-mixed where the GPU supports bfloat16, untimed.

What was chosen, how (``set``, ``auto: timed``, ``auto: cached``, ...) and the images per
second of every candidate are recorded in the run's :class:`~cellclass.training.optim.StepPlan`.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import MixedPrecision, Precision

from cellclass.atomic import atomic_write_text
from cellclass.training.config import TrainConfig
from cellclass.training.optim import build_optimizer

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "CELLCLASS_USER_CACHE_DIR"
"""Environment variable naming the per-user cache folder that holds ``precision.json``."""
CACHE_FORMAT = "cellclass-precision/1"
"""Format tag of ``precision.json``; a file of another format is ignored and rewritten."""
WARMUP_STEPS = 1
"""Untimed steps per candidate (first-call allocations, kernel selection)."""
TIMED_STEPS = 3
"""Timed steps per candidate at least; the fastest counts (other load on the machine only adds time)."""
TIMING_SECONDS = 1.0
"""Timed steps continue, in turns, until the timing has taken this long (a small network's
steps of milliseconds are too few at three to stand out of the noise) ..."""
MAX_TIMED_STEPS = 20
"""... or until every candidate has had this many."""
RETIRE_FACTOR = 3.0
"""A candidate whose fastest timed step takes over this many times the fastest candidate's
is timed no further: load on the machine only adds time, so it cannot win. On a CPU
without native bfloat16 a bf16 step can take ten times a float32 one: timing it three
times would cost the run a minute. (Untimed first steps are no guide: the first carries
the process's one-off costs.)"""
MIN_STEPS_TO_TIME = 10
"""Fewest optimizer steps a run must have for ``auto`` to time its candidates (the timing
takes four steps or more per candidate)."""
CHANNELS_LAST, CONTIGUOUS = "channels_last", "contiguous"

Batch = tuple[torch.Tensor, Mapping[str, torch.Tensor]]
"""One training batch: images ``(N, C, H, W)`` and targets per task."""


@dataclass(frozen=True)
class Candidate:
    """One way to run a training step: a Fabric precision and a memory format."""

    precision: str
    memory_format: str

    @property
    def name(self) -> str:
        """``precision/memory_format``, the key of the recorded timings."""
        return f"{self.precision}/{self.memory_format}"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision and memory format a run trains in, and how they were chosen.

    Attributes:
        precision: Fabric precision (``32-true``, ``bf16-mixed``, ...).
        memory_format: ``channels_last`` or ``contiguous``.
        source: ``set`` (configured), ``auto: timed``, ``auto: cached``, or for an
            untimed ``auto`` the reason (``auto: on cuda, not timed``, ``auto: 8 steps, too few
            to time (float32)``).
        timings: Training images per second of each candidate (``precision/memory_format``)
            when they were timed, here or in the cached run; else ``None``.
    """

    precision: str
    memory_format: str
    source: str
    timings: dict[str, float] | None = None

    @classmethod
    def from_steps(cls, steps: Mapping[str, Any]) -> PrecisionChoice | None:
        """The choice recorded in a run's step plan (``None`` for a run that predates it)."""
        if "precision" not in steps or "memory_format" not in steps:
            return None
        return cls(steps["precision"], steps["memory_format"], steps.get("precision_from", "set"),
                   steps.get("precision_timings"))

    def to_steps(self) -> dict[str, Any]:
        """The :class:`~cellclass.training.optim.StepPlan` fields that record this choice."""
        return {"precision": self.precision, "memory_format": self.memory_format, "precision_from": self.source,
                "precision_timings": None if self.timings is None else dict(self.timings)}


def configured_choice(config: TrainConfig) -> PrecisionChoice:
    """An explicit ``precision`` with the configured memory format, untimed."""
    return PrecisionChoice(config.precision, CHANNELS_LAST if config.channels_last else CONTIGUOUS, "set")


def resumed_choice(config: TrainConfig, steps: Mapping[str, Any] | None) -> PrecisionChoice | None:
    """What a resumed run trains in: the run's own choice under ``auto`` (not timed again);
    ``None`` when the configuration sets the precision or the run recorded none."""
    if config.precision != "auto" or not steps:
        return None
    return PrecisionChoice.from_steps(steps)


def choose_precision(config: TrainConfig, model: torch.nn.Module, batches: Callable[[int], Sequence[Batch]],
                     loss_fn: Callable[..., torch.Tensor], *, device: torch.device, batch_size: int,
                     total_steps: int, cache_file: Path | None = None) -> PrecisionChoice:
    """The precision and memory format ``model`` trains fastest in here (``config.precision``
    when it is not ``auto``).

    Args:
        config: The run's configuration (``precision``, ``channels_last``, the optimizer).
        model: The network as created, on the CPU; only copies of it are stepped.
        batches: Makes the first ``n`` training batches of the run (called only to time).
        loss_fn: The run's loss of ``(logits per task, targets per task)``.
        device: Where training runs; only a CPU is timed.
        batch_size: Images per step of this process.
        total_steps: Optimizer steps of the run.
        cache_file: The cache of choices (default: :func:`cache_path`).
    """
    if config.precision != "auto":
        return configured_choice(config)
    fallback = CHANNELS_LAST if config.channels_last else CONTIGUOUS
    if device.type != "cpu":
        bf16 = bf16_autocast_works(device)
        return PrecisionChoice("bf16-mixed" if bf16 else "32-true", fallback, f"auto: on {device.type}, not timed")
    options = candidates(model, device, channels_last=config.channels_last)
    path = cache_file or cache_path()
    key = cache_key(model, batch_size=batch_size, device=device, options=options)
    cached = _lookup(_read_cache(path), key, options)
    if cached is not None:
        return cached
    if total_steps < MIN_STEPS_TO_TIME:
        return PrecisionChoice("32-true", fallback, f"auto: {total_steps} steps, too few to time (float32)")
    started = time.perf_counter()
    timings = time_candidates(model, options, batches(WARMUP_STEPS + TIMED_STEPS), loss_fn, config,
                              device=device)
    best = max(options, key=lambda c: timings[c.name])
    log.info("precision auto: timed %s in %.1f s; training in %s", ", ".join(f"{k} {v:.1f} img/s"
             for k, v in timings.items()), time.perf_counter() - started, best.name)
    choice = PrecisionChoice(best.precision, best.memory_format, "auto: timed", timings)
    _remember(path, key, choice)
    return choice


def candidates(model: torch.nn.Module, device: torch.device, *, channels_last: bool = True) -> list[Candidate]:
    """What ``auto`` times: float32; float32 channels-last for a network with convolutions
    (unless ``channels_last`` is off); bf16-mixed, in the same memory format, where bfloat16
    autocast runs on ``device``."""
    layout = CHANNELS_LAST if channels_last and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) \
        else CONTIGUOUS
    options = [Candidate("32-true", CONTIGUOUS)]
    if layout == CHANNELS_LAST:
        options.append(Candidate("32-true", CHANNELS_LAST))
    if bf16_autocast_works(device):
        options.append(Candidate("bf16-mixed", layout))
    return options


@functools.cache
def bf16_autocast_works(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs on ``device`` (a CUDA GPU that supports bfloat16, or a CPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
    except RuntimeError:
        return False
    return out.dtype == torch.bfloat16


def time_candidates(model: torch.nn.Module, options: Sequence[Candidate], batches: Sequence[Batch],
                    loss_fn: Callable[..., torch.Tensor], config: TrainConfig, *,
                    device: torch.device) -> dict[str, float]:
    """Training images per second of each candidate, on a copy of ``model`` with a fresh
    optimizer of ``config``'s: :data:`WARMUP_STEPS` untimed steps each, then one step each
    in turns (so a change in the machine's load falls on all alike), over ``batches`` again
    and again, :data:`TIMED_STEPS` turns or more, until :data:`TIMING_SECONDS` have passed
    (at most :data:`MAX_TIMED_STEPS` turns); each candidate's fastest step counts. A
    candidate far slower than the fastest is retired after a timed step
    (:data:`RETIRE_FACTOR`), its rate that of its fastest step so far; timing ends when one
    candidate is left.

    The step is Fabric's (its precision plugin casts the inputs, runs the forward under
    autocast, casts the outputs back, then backward and optimizer step), as in training.
    """
    with torch.random.fork_rng(devices=[]):  # dropout in a timed step draws from the global generator
        runners = [_Runner(model, option, batches, loss_fn, config, device) for option in options]
        for step in range(WARMUP_STEPS):
            for runner in runners:
                runner.step(step % len(batches))
        active, started, turn = list(runners), time.perf_counter(), 0
        while turn == 0 or (len(active) > 1 and (turn < TIMED_STEPS or (
                time.perf_counter() - started < TIMING_SECONDS and turn < MAX_TIMED_STEPS))):
            step = WARMUP_STEPS + turn
            for runner in (active if turn % 2 else reversed(active)):
                runner.seconds.append(runner.step(step % len(batches)))
            active = _survivors(active, [min(r.seconds) for r in active], RETIRE_FACTOR)
            turn += 1
    retired = [r.option.name for r in runners if r not in active]
    if retired:
        log.info("precision auto: %s retired early, far slower than the fastest", ", ".join(retired))
    return {r.option.name: round(len(batches[0][0]) / min(r.seconds), 1) for r in runners}


def _survivors(runners: Sequence[_Runner], seconds: Sequence[float], factor: float) -> list[_Runner]:
    """The runners whose ``seconds`` are within ``factor`` times the fastest's."""
    fastest = min(seconds)
    return [r for r, s in zip(runners, seconds, strict=True) if s <= factor * fastest]


class _Runner:
    """One candidate's copy of the network, its optimizer and precision plugin, and its batches."""

    def __init__(self, model: torch.nn.Module, option: Candidate, batches: Sequence[Batch],
                 loss_fn: Callable[..., torch.Tensor], config: TrainConfig, device: torch.device) -> None:
        fmt = torch.channels_last if option.memory_format == CHANNELS_LAST else torch.contiguous_format
        self.option, self.loss_fn = option, loss_fn
        self.net = copy.deepcopy(model).to(device=device, memory_format=fmt).train()
        self.optimizer = build_optimizer(self.net, config, device)
        self.plugin = MixedPrecision(option.precision, device.type) if option.precision.endswith("-mixed") \
            else Precision()
        self.batches = [(xb.to(device).contiguous(memory_format=fmt), {t: v.to(device) for t, v in yb.items()})
                        for xb, yb in batches]
        self.seconds: list[float] = []

    def step(self, k: int) -> float:
        """Train on batch ``k`` the way Fabric runs a step in this precision; return the seconds taken."""
        started = time.perf_counter()
        xb, yb = self.batches[k]
        xb = self.plugin.convert_input(xb)
        with self.plugin.forward_context():
            out = self.net(xb)
        loss = self.loss_fn(self.plugin.convert_output(out), yb)
        self.optimizer.zero_grad(set_to_none=True)
        self.plugin.backward(loss, self.net)
        self.plugin.optimizer_step(self.optimizer)
        float(loss.detach())  # waits for the step to finish on an asynchronous device
        return time.perf_counter() - started


# -- the cache of choices ------------------------------------------------------------------
def cache_path() -> Path:
    """``$CELLCLASS_USER_CACHE_DIR/precision.json``, else ``precision.json`` in the user's
    cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``cellclass/``)."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if folder:
        return Path(folder).expanduser() / "precision.json"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "cellclass" / "precision.json"


def cache_key(model: torch.nn.Module, *, batch_size: int, device: torch.device,
              options: Sequence[Candidate]) -> dict[str, Any]:
    """The machine and model shape a choice holds for: CPU model, torch version, device and
    threads; the architecture (its arguments, input channels and image size included), the
    batch size per process, and the candidates timed."""
    arch = getattr(model, "config", None) or {"class": type(model).__name__}
    key = {"cpu": cpu_name(), "torch": torch.__version__, "device": device.type,
           "threads": torch.get_num_threads(), "model": arch, "batch_size": batch_size,
           "candidates": [c.name for c in options]}
    return json.loads(json.dumps(key, default=str))  # as it reads back from the file


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what :mod:`platform` says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _read_cache(path: Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """The cached choices; an unreadable or malformed file counts as empty (with a warning)."""
    if not path.is_file():
        return []
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a {CACHE_FORMAT} file")
        entries = content["choices"]
        for entry in entries:
            if not (isinstance(entry["key"], dict) and isinstance(entry["precision"], str)
                    and isinstance(entry["memory_format"], str) and isinstance(entry["timings"], dict)
                    and all(isinstance(v, (int, float)) for v in entry["timings"].values())):
                raise ValueError("an entry lacks its key, precision, memory_format or timings")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        if warn:
            log.warning("precision cache %s is unreadable (%s); ignoring it (it is rewritten after the next "
                        "timing)", path, error)
        return []
    return entries


def _lookup(entries: Sequence[Mapping[str, Any]], key: Mapping[str, Any],
            options: Sequence[Candidate]) -> PrecisionChoice | None:
    """The cached choice for ``key`` (``None`` without one, or when it is no candidate now)."""
    names = {c.name for c in options}
    for entry in entries:
        if entry["key"] == key and f"{entry['precision']}/{entry['memory_format']}" in names:
            return PrecisionChoice(entry["precision"], entry["memory_format"], "auto: cached",
                                   dict(entry["timings"]))
    return None


def _remember(path: Path, key: Mapping[str, Any], choice: PrecisionChoice) -> None:
    """Keep ``choice`` for ``key`` in the cache file (written atomically, replacing an entry
    of the same key); a cache that cannot be written is skipped with a warning."""
    entries = [e for e in _read_cache(path, warn=False) if e["key"] != key]
    entries.append({"key": dict(key), "precision": choice.precision, "memory_format": choice.memory_format,
                    "timings": choice.timings, "measured": datetime.date.today().isoformat()})
    try:
        atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "choices": entries}, indent=1) + "\n")
    except OSError as error:
        log.warning("could not write the precision cache %s (%s); the next run times again", path, error)
