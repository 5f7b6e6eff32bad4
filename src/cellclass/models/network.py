"""The multi-head network every cellclass network derives from."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from cellclass.errors import ModelError
from cellclass.models.arguments import check_task_types, image_size_to_config

logger = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
"""What sits between the pooled features and the task layers: ``linear`` (nothing: one
linear layer per task) or ``mlp`` (fastai's head: BatchNorm, dropout 0.25, linear to
512, ReLU, BatchNorm, dropout 0.5, shared by the tasks' linear layers)."""

MLP_WIDTH = 512


class MultiHeadNetwork(nn.Module):
    """A feature extractor followed by one linear head per task.

    Subclasses build their feature extractor, call :meth:`_init_heads` with its output
    width, and implement :meth:`forward_features`.

    Attributes:
        name: Registry name of the model.
        in_chans: Number of input channels.
        image_size: ``(height, width)`` the model was built for.
        task_types: Task name → ``"single"``, ``"multilabel"`` or ``"binary"``; the
            network itself returns logits whatever the type, losses use it.
        heads: ``nn.ModuleDict`` task name → ``nn.Linear``, in task order.
    """

    def __init__(
        self,
        name: str,
        in_chans: int,
        heads: Mapping[str, int],
        *,
        image_size: tuple[int, int],
        drop_rate: float = 0.0,
        task_types: Mapping[str, str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not (
            0.0 <= drop_rate < 1.0
        ):
            raise ModelError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        self.name = name
        self.in_chans = in_chans
        self.image_size = image_size
        self.task_types = check_task_types(task_types, heads)
        self._num_outputs = dict(heads)
        probe = nn.ModuleDict()
        for task in heads:
            # ModuleDict refuses keys that shadow its own attributes ('items', 'keys', ...).
            if hasattr(probe, task):
                raise ModelError(
                    f"task name {task!r} clashes with a torch.nn.ModuleDict attribute; "
                    "rename the task (e.g. with a prefix or suffix)"
                )
        config: dict[str, Any] = {
            "name": name,
            "in_chans": in_chans,
            "heads": dict(heads),
            "image_size": image_size_to_config(image_size),
        }
        if drop_rate:
            config["drop_rate"] = float(drop_rate)
        if task_types is not None:
            config["task_types"] = dict(task_types)
        config.update(extra_config or {})
        self._config = config
        self.head_drop = nn.Dropout(float(drop_rate))

    def _init_heads(self, num_features: int, head: str = "linear") -> None:
        """Build the task layers on ``num_features`` pooled features, with the ``head``
        of :data:`HEADS` between them (``neck``: the identity for ``linear``)."""
        if head not in HEADS:
            raise ModelError(f"head = {head!r} is invalid; valid: {', '.join(HEADS)}")
        self.num_features = num_features
        width = num_features
        self.neck: nn.Module = nn.Identity()
        if head == "mlp":
            self.neck = nn.Sequential(
                nn.BatchNorm1d(num_features), nn.Dropout(0.25), nn.Linear(num_features, MLP_WIDTH, bias=False),
                nn.ReLU(inplace=True), nn.BatchNorm1d(MLP_WIDTH), nn.Dropout(0.5),
            )
            width = MLP_WIDTH
        self.heads = nn.ModuleDict(
            {task: nn.Linear(width, n) for task, n in self._num_outputs.items()}
        )

    @property
    def config(self) -> dict[str, Any]:
        """Arguments that rebuild this architecture: ``create_model(**model.config)``."""
        return copy.deepcopy(self._config)

    @property
    def num_outputs(self) -> dict[str, int]:
        """Task name → number of outputs, in task order."""
        return dict(self._num_outputs)

    def forward_features(self, x: Tensor) -> Tensor:
        """Map images ``(N, C, H, W)`` to features ``(N, num_features)``."""
        raise NotImplementedError

    def forward_heads(self, features: Tensor) -> dict[str, Tensor]:
        """Map features ``(N, num_features)`` to ``{task: logits (N, heads[task])}``."""
        features = self.head_drop(self.neck(features))
        return {task: head(features) for task, head in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Map float images ``(N, C, H, W)`` to ``{task: logits (N, heads[task])}``."""
        return self.forward_heads(self.forward_features(x))


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``.

    Common wrappers are removed: a ``{"state_dict": ...}`` or ``{"model": ...}`` nesting
    and the ``module.`` prefix that DataParallel/DDP adds.

    Raises:
        ModelError: the file is missing, unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"pretrained weight file {str(path)!r} does not exist; pass the path to a "
            "local .safetensors, .pth or .pt file, or pretrained=False"
        )
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any decoder error means the same thing to the user
        raise ModelError(
            f"cannot read weights from {str(path)!r} ({type(err).__name__}: {err}); "
            "valid files are safetensors files or torch.save'd state dicts "
            "(.pth/.pt, loadable with weights_only=True)"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelError(
            f"{str(path)!r} holds no state dict (a mapping of names to tensors), "
            f"got {type(state).__name__}"
        )
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_matching_weights(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    model_name: str,
    skip_prefixes: tuple[str, ...] = (),
    adapt: Callable[[str, Tensor, Tensor], Tensor | None] | None = None,
) -> None:
    """Copy the tensors of ``state`` whose names match ``module``'s into it.

    Keys under ``skip_prefixes`` are ignored on both sides; missing and unexpected keys
    are logged as warnings.

    Args:
        module: The module to load into.
        state: The state dict read from ``source``.
        source: Where ``state`` came from, for messages.
        model_name: The model's name, for messages.
        skip_prefixes: Key prefixes left alone (e.g. the task heads).
        adapt: Called as ``adapt(key, value, target)`` when shapes differ; returns the
            adapted tensor, or ``None`` when it cannot adapt that key.

    Raises:
        ModelError: a shape differs and cannot be adapted, or no key matches at all.
    """

    def kept(key: str) -> bool:
        return not key.startswith(skip_prefixes) if skip_prefixes else True

    own = {k: v for k, v in module.state_dict().items() if kept(k)}
    state = {k: v for k, v in state.items() if kept(k)}
    matched: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if value.shape != target.shape:
            adapted = adapt(key, value, target) if adapt is not None else None
            if adapted is None:
                raise ModelError(
                    f"weight {key!r} in {source} has shape {tuple(value.shape)} but "
                    f"{model_name} as built here expects {tuple(target.shape)}; only the "
                    "first convolution is adapted to the channel count, so the file must "
                    "hold weights of the same architecture"
                )
            value = adapted
        matched[key] = value
    if not matched:
        raise ModelError(
            f"none of the {len(state)} tensors in {source} matches a weight of "
            f"{model_name}: the file has keys like {sorted(state)[:3]}, the model expects "
            f"keys like {sorted(own)[:3]}; pass weights of the same architecture"
        )
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected:
        logger.warning(
            "%d tensor(s) in %s are not used by %s: %s",
            len(unexpected), source, model_name, _preview(unexpected),
        )
    if missing:
        logger.warning(
            "%d weight(s) of %s are not in %s and keep their random initialisation: %s",
            len(missing), model_name, source, _preview(missing),
        )
    module.load_state_dict(matched, strict=False)
    logger.info("loaded %d tensors from %s into %s", len(matched), source, model_name)


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
