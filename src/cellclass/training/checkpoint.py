"""Checkpoints that are enough to serve.

A checkpoint holds the weights (or the fitted baseline), the architecture name and
arguments, the channel names, the class names per task, the normalization statistics,
the tuned thresholds, the image preparation and the resolved configuration. ``last.ckpt``
also holds the optimizer, scheduler and RNG states so ``--resume`` continues a run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cellclass.atomic import atomic_path
from cellclass.errors import CheckpointError

FORMAT = "cellclass-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    path = Path(path)
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def find_checkpoint(source: str | Path, which: str = "best") -> Path:
    """Resolve a run folder or a checkpoint file to a checkpoint path.

    Raises:
        CheckpointError: When nothing usable is there.
    """
    source = Path(source)
    if source.is_file():
        return source
    candidate = source / "checkpoints" / f"{which}.ckpt"
    if candidate.is_file():
        return candidate
    raise CheckpointError(
        f"no checkpoint at {str(source)!r}: expected a .ckpt file or a run folder holding "
        f"checkpoints/{which}.ckpt (made by `cellclass train`)"
    )


def load_checkpoint(source: str | Path, which: str = "best") -> dict[str, Any]:
    """Read a checkpoint (weights only: no arbitrary code runs while loading).

    A baseline's fitted estimator is stored as pickled bytes and unpickled here only for
    checkpoints of ``kind == "baseline"``; load checkpoints you trust.
    """
    path = find_checkpoint(source, which)
    valid = "valid: a .ckpt file or a run folder made by `cellclass train`"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not one
        raise CheckpointError(f"{str(path)!r} is not a checkpoint ({path.stat().st_size} bytes, not a "
                              f"torch archive); {valid}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {reason}; {valid}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a cellclass checkpoint (format {FORMAT})")
    if payload.get("kind") == "baseline":
        payload["estimator"] = pickle.loads(payload["estimator"])  # noqa: S301 (own file)
    payload["path"] = str(path)
    return payload


def baseline_bytes(estimator: Any) -> bytes:
    """Serialise a fitted baseline for :func:`save_checkpoint`."""
    return pickle.dumps(estimator, protocol=pickle.HIGHEST_PROTOCOL)
