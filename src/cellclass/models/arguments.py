"""The arguments every model takes, checked in one place: task heads, task types, image size."""

from __future__ import annotations

from collections.abc import Mapping

from cellclass.data.spec import TASK_TYPES
from cellclass.errors import ModelError


def check_heads(heads: object) -> dict[str, int]:
    """Validate a task → number-of-outputs mapping and return it as a plain dict.

    Raises:
        ModelError: ``heads`` is empty, not a mapping, or has a bad name or count.
    """
    if not isinstance(heads, Mapping) or not heads:
        raise ModelError(
            f"heads must be a non-empty mapping of task name to number of outputs, "
            f"got {heads!r}; e.g. {{'particle': 3, 'dose': 4}}"
        )
    out: dict[str, int] = {}
    for task, n in heads.items():
        if not isinstance(task, str) or not task or "." in task:
            raise ModelError(
                f"task name must be a non-empty string without '.', got {task!r}; "
                "it names the head's weights in the state dict"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelError(
                f"number of outputs of task {task!r} must be a positive integer, got {n!r}"
            )
        out[task] = int(n)
    return out


def check_task_types(
    task_types: Mapping[str, str] | None, heads: Mapping[str, int]
) -> dict[str, str]:
    """Resolve per-task types (default ``"single"``) and check them against ``heads``.

    Raises:
        ModelError: a task is unknown, a type is invalid, or a head size does not suit
            its type (single needs >= 2 outputs, binary 1 or 2).
    """
    given = {} if task_types is None else task_types
    if not isinstance(given, Mapping):
        raise ModelError(
            f"task_types must be a mapping of task name to one of {TASK_TYPES}, "
            f"got {task_types!r}"
        )
    unknown = [t for t in given if t not in heads]
    if unknown:
        raise ModelError(
            f"task_types names task(s) {unknown} that are not in heads; "
            f"valid tasks are {list(heads)}"
        )
    resolved: dict[str, str] = {}
    for task, n in heads.items():
        kind = given.get(task, "single")
        if kind not in TASK_TYPES:
            raise ModelError(
                f"type of task {task!r} must be one of {TASK_TYPES}, got {kind!r}"
            )
        if kind == "single" and n < 2:
            raise ModelError(
                f"single-label task {task!r} needs at least 2 outputs (one per class), "
                f"got {n}; use task type 'binary' for a yes/no task"
            )
        if kind == "binary" and n not in (1, 2):
            raise ModelError(
                f"binary task {task!r} needs 1 output (sigmoid) or 2 (softmax), got {n}"
            )
        resolved[task] = kind
    return resolved


def check_image_size(image_size: object) -> tuple[int, int]:
    """Return ``image_size`` as ``(height, width)``.

    Raises:
        ModelError: it is not a positive int or a pair of positive ints.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        return int(size[0]), int(size[1])
    raise ModelError(
        f"image_size must be a positive int or a (height, width) pair of positive ints, "
        f"got {image_size!r}"
    )


def image_size_to_config(size: tuple[int, int]) -> int | list[int]:
    """The YAML-friendly form of an image size: an int when square, else ``[h, w]``."""
    return size[0] if size[0] == size[1] else [size[0], size[1]]
