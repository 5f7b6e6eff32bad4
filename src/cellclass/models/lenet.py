"""LeNet-5 for any channel count and image size."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cellclass.errors import ModelError
from cellclass.models.network import (
    MultiHeadNetwork,
    load_matching_weights,
    load_state_dict_file,
)
from cellclass.models.registry import register_model

_MIN_SIDE = 16  # smallest side whose feature map survives two 5x5 convs and two 2x2 pools


def _feature_side(side: int) -> int:
    return ((side - 4) // 2 - 4) // 2


class LeNet5(MultiHeadNetwork):
    """LeNet-5 (LeCun et al. 1998) in its modern form, one linear head per task.

    conv 6@5x5 → ReLU → max-pool 2 → conv 16@5x5 → ReLU → max-pool 2 → fc 120 → ReLU →
    fc 84 → ReLU → heads. Departures from the paper, as in most re-implementations: ReLU
    instead of scaled tanh, max-pooling instead of trainable subsampling, a full C3
    connection table, and linear heads instead of the RBF output layer. The first fully
    connected layer sees the whole final feature map, whose size follows from
    ``image_size`` (5x5 for 32x32 inputs, as in the paper), so inputs must have the
    size the model was built for.

    Args:
        in_chans: Number of input channels.
        heads: Task name → number of outputs.
        image_size: ``(height, width)``, each at least 16.
        drop_rate: Dropout probability before the heads.
        task_types: Task name → ``"single"``, ``"multilabel"`` or ``"binary"``.
    """

    def __init__(
        self,
        in_chans: int,
        heads: Mapping[str, int],
        *,
        image_size: tuple[int, int] = (32, 32),
        drop_rate: float = 0.0,
        task_types: Mapping[str, str] | None = None,
    ) -> None:
        if min(image_size) < _MIN_SIDE:
            raise ModelError(
                f"lenet5 needs images of at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got "
                f"image_size {image_size}; resize the images or pick a larger image_size"
            )
        super().__init__(
            "lenet5",
            in_chans,
            heads,
            image_size=image_size,
            drop_rate=drop_rate,
            task_types=task_types,
        )
        fh, fw = _feature_side(image_size[0]), _feature_side(image_size[1])
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(
            nn.Linear(16 * fh * fw, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self._init_heads(84)

    def forward_features(self, x: Tensor) -> Tensor:
        """Map images ``(N, C, H, W)`` to the 84 features the heads read."""
        return self.fc(self.features(x))


@register_model("lenet5", kind="network")
def lenet5(
    in_chans: int,
    heads: Mapping[str, int],
    *,
    image_size: tuple[int, int],
    pretrained: bool | str | Path = False,
    **kwargs: Any,
) -> LeNet5:
    """LeNet-5 (ReLU, max-pool) for any channel count and image size >= 16."""
    unknown = sorted(set(kwargs) - {"drop_rate", "task_types"})
    if unknown:
        raise ModelError(
            f"lenet5 got unknown argument(s) {unknown}; valid arguments are drop_rate "
            "and task_types"
        )
    if pretrained is True:
        raise ModelError(
            "lenet5 has no published pretrained weights, got pretrained=True; pass "
            "pretrained=PATH to a state dict of a lenet5 with the same in_chans and "
            "image_size, or pretrained=False"
        )
    model = LeNet5(in_chans, heads, image_size=image_size, **kwargs)
    if pretrained:
        state = load_state_dict_file(pretrained)
        # Heads are task-specific: only the body transfers.
        load_matching_weights(
            model, state, source=repr(str(pretrained)), model_name="lenet5",
            skip_prefixes=("heads.",),
        )
    return model
