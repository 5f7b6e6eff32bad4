"""Model registry: one name space for cellclass models and every timm backbone.

cellclass's own models (``lenet5`` and the pixel baselines ``mlp``, ``svm``, ``logreg``)
register themselves with :func:`register_model`; any other name is looked up in timm and
built by :class:`cellclass.models.timm_backbone.TimmNetwork`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm

from cellclass.errors import ModelError
from cellclass.models.arguments import check_heads, check_image_size
from cellclass.models.timm_backbone import TimmNetwork

ModelKind = Literal["network", "baseline"]
Entrypoint = Callable[..., Any]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name.

    Attributes:
        name: The name accepted by :func:`create_model`.
        kind: ``"network"`` (a ``torch.nn.Module``) or ``"baseline"`` (a scikit-learn
            style estimator).
        source: ``"cellclass"`` or ``"timm"``.
        description: One line saying what the model is.
        pretrained_tags: Names of the pretrained weights timm knows for it (downloaded
            from the Hugging Face hub); empty where there are none.
    """

    name: str
    kind: ModelKind
    source: Literal["cellclass", "timm"]
    description: str
    pretrained_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    kind: ModelKind
    fn: Entrypoint
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, kind: ModelKind) -> Callable[[Entrypoint], Entrypoint]:
    """Register a cellclass model entrypoint under ``name``.

    The entrypoint is called as ``fn(in_chans, heads, image_size=..., pretrained=...,
    **kwargs)`` with arguments already validated; the first line of its docstring becomes
    the model's description.

    Args:
        name: Registry name; must not already be registered.
        kind: ``"network"`` or ``"baseline"``.

    Returns:
        A decorator returning the entrypoint unchanged.
    """

    def decorator(fn: Entrypoint) -> Entrypoint:
        if name in _REGISTRY:
            raise ModelError(
                f"model name {name!r} is registered twice; registered names must be unique"
            )
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = _Entry(kind=kind, fn=fn, description=doc[0] if doc else "")
        return fn

    return decorator


def list_models(pattern: str | None = None, *, pretrained: bool = False) -> list[str]:
    """Names accepted by :func:`create_model`: cellclass models first, then timm's.

    Args:
        pattern: Optional shell-style pattern (``fnmatch``), e.g. ``"resnet*"``.
        pretrained: Only names with pretrained weights on the hub; as in timm, these are
            listed with their tag (``"resnet18.a1_in1k"``), and cellclass's own models,
            which have none, are left out.

    Returns:
        Matching names, cellclass's sorted, then timm's in timm's order.
    """
    names = [] if pretrained else sorted(_REGISTRY)
    names += timm.list_models(pretrained=pretrained)
    if pattern is not None:
        names = fnmatch.filter(names, pattern)
    return names


def is_model(name: str) -> bool:
    """Whether ``name`` is a cellclass model or a timm model (tags such as
    ``"resnet18.tv_in1k"`` included)."""
    if name in _REGISTRY:
        return True
    return bool(timm.is_model(name))


def _unknown_model_error(name: str) -> ModelError:
    names = list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ModelError(
        f"unknown model name {name!r}{hint}; valid names are cellclass's "
        f"{', '.join(sorted(_REGISTRY))} and the {len(names) - len(_REGISTRY)} timm models; "
        f"run `cellclass models` (or cellclass.models.list_models('pattern*')) to list them"
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ModelError(
            f"model name must be a non-empty string, got {name!r}; "
            "run `cellclass models` to list the valid names"
        )
    if not is_model(name):
        raise _unknown_model_error(name)
    return name


def is_baseline(name: str) -> bool:
    """Whether ``name`` is a scikit-learn style baseline rather than a network.

    Raises:
        ModelError: ``name`` is not a known model.
    """
    name = _check_name(name)
    return name in _REGISTRY and _REGISTRY[name].kind == "baseline"


def model_info(name: str) -> ModelInfo:
    """Describe the model called ``name``.

    Raises:
        ModelError: ``name`` is not a known model.
    """
    name = _check_name(name)
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        return ModelInfo(name, entry.kind, "cellclass", entry.description)
    arch = name.split(".", 1)[0]
    tags = tuple(timm.list_models(arch, pretrained=True))
    if "." in name:
        tags = tuple(t for t in tags if t == name)
    return ModelInfo(
        name, "network", "timm", f"timm backbone {arch} with one linear head per task", tags
    )


def create_model(
    name: str,
    in_chans: int,
    heads: Mapping[str, int],
    *,
    image_size: int | tuple[int, int] = 64,
    pretrained: bool | str | Path = False,
    **kwargs: Any,
) -> Any:
    """Build a model by name.

    Args:
        name: A cellclass name (``lenet5``, ``mlp``, ``svm``, ``logreg``) or any timm
            model name (``resnet18``, ``efficientnet_b0``, ...); see :func:`list_models`.
        in_chans: Number of image channels.
        heads: Ordered task name → number of outputs (classes of a single-label task,
            labels of a multi-label task, 1 or 2 for a binary task).
        image_size: Input size, ``int`` or ``(height, width)``.
        pretrained: ``False`` for random weights; ``True`` for timm's hub weights (needs
            the Hugging Face hub or its local cache); a path to a local ``.safetensors``,
            ``.pth`` or ``.pt`` state dict of the backbone.
        **kwargs: Model arguments, e.g. ``drop_rate`` and ``task_types`` for networks,
            ``task_types``, ``pixels`` and estimator settings for baselines, or any timm
            model argument (``drop_path_rate``, ...).

    Returns:
        A ``torch.nn.Module`` whose ``forward(x)`` maps ``(N, C, H, W)`` float images to
        ``{task: logits (N, heads[task])}``, or a baseline estimator with ``fit``,
        ``predict_proba`` and ``predict``. Both carry ``name`` and ``config``, and
        ``create_model(**model.config)`` rebuilds the same architecture (``pretrained``
        is not part of ``config``: the weights travel in the checkpoint).

    Raises:
        ModelError: unknown name, invalid argument, or unusable pretrained weights.
    """
    name = _check_name(name)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"in_chans must be a positive integer, got {in_chans!r}")
    heads = check_heads(heads)
    size = check_image_size(image_size)
    if not isinstance(pretrained, (bool, str, Path)):
        raise ModelError(
            f"pretrained must be False, True or a path to a weight file, got {pretrained!r}"
        )
    if name in _REGISTRY:
        return _REGISTRY[name].fn(
            in_chans, heads, image_size=size, pretrained=pretrained, **kwargs
        )
    return TimmNetwork(
        name, in_chans, heads, image_size=size, pretrained=pretrained, **kwargs
    )


def count_parameters(model: Any, *, trainable_only: bool = False) -> int:
    """Number of parameters of a network, or of the fitted arrays of a baseline.

    Args:
        model: A network (``torch.nn.Module``) or a baseline from :func:`create_model`.
        trainable_only: Count only parameters with ``requires_grad`` (networks).

    Raises:
        ModelError: ``model`` is neither.
    """
    if hasattr(model, "parameters") and callable(model.parameters):
        return sum(
            p.numel() for p in model.parameters() if p.requires_grad or not trainable_only
        )
    if hasattr(model, "count_parameters"):
        return int(model.count_parameters())
    raise ModelError(
        f"count_parameters needs a network or a baseline from create_model, "
        f"got {type(model).__name__}"
    )
