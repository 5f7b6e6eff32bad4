"""Grad-CAM saliency maps (Selvaraju et al. 2017) and their overlay as a PNG.

The target layer is the network's last convolutional stage, found by module type, and
its activations and gradients are caught with torch hooks:

- LeNet-5 (and any network without timm's ``feature_info``): the output of the last
  ``Conv2d``, after its activation when one follows directly (the map the next layer
  reads);
- timm backbones: the last stage listed in ``feature_info`` (``layer4`` of a ResNet,
  ``stages.3`` of a ConvNeXt), which is the feature map that is pooled.

The map is the ReLU of the activations weighted by the spatially averaged gradients of
the chosen class's logit, upsampled to the input size and scaled to [0, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellclass.inference.probabilities import probabilities
from cellclass.errors import UploadError

log = logging.getLogger(__name__)

_ACTIVATIONS = ("ReLU", "ReLU6", "GELU", "SiLU", "LeakyReLU", "ELU", "Hardswish", "Mish", "Tanh")


@dataclass(frozen=True)
class Saliency:
    """A Grad-CAM map and what it explains.

    Attributes:
        cam: ``(S, S)`` float32 map in [0, 1] at the model's input size.
        task: Task whose logit was explained.
        class_index: Class whose logit was explained.
        probability: The model's probability of that class for this image (no TTA).
        layer: Name of the hooked layer.
    """

    cam: np.ndarray
    task: str
    class_index: int
    probability: float
    layer: str


def target_layer(model: Any) -> tuple[str, Any]:
    """``(name, module)`` of the layer Grad-CAM hooks (see the module docstring).

    Raises:
        UploadError: When the network has no convolution (e.g. a vision transformer).
    """
    from torch import nn

    backbone = getattr(model, "backbone", None)
    info = getattr(backbone, "feature_info", None)
    if backbone is not None and info:
        try:
            name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
            return f"backbone.{name}", backbone.get_submodule(name)
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            log.debug("feature_info gives no usable stage (%s); using the last Conv2d", exc)
    named = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UploadError(f"Grad-CAM needs a convolutional network; {type(model).__name__} has no Conv2d layer")
    index = convs[-1]
    following = named[index + 1] if index + 1 < len(named) else None
    if following is not None and type(following[1]).__name__ in _ACTIVATIONS:
        return following
    return named[index]


def grad_cam(model: Any, x: np.ndarray, task: str, class_index: int | None = None,
             *, activation: str = "single") -> Saliency:
    """Grad-CAM of one normalized image.

    Args:
        model: A cellclass network (returns ``{task: logits}``), in eval mode. Hooks are
            added and removed here: do not share the model with concurrent callers.
        x: Normalized ``(C, S, S)`` float32 image.
        task: Task to explain.
        class_index: Class to explain (default: the most probable).
        activation: ``single`` (softmax) or ``multilabel`` (sigmoid), for the reported
            probability.

    Raises:
        UploadError: When the network has no convolution.
    """
    import torch
    import torch.nn.functional as F

    name, layer = target_layer(model)
    caught: dict[str, torch.Tensor] = {}

    def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        caught["activation"] = output
        output.register_hook(lambda grad: caught.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].requires_grad_(True)
            logits = model(inputs)[task][0]
            if class_index is None:
                class_index = int(logits.argmax())
            probs = probabilities(logits, activation)
            model.zero_grad(set_to_none=True)
            logits[class_index].backward()
    finally:
        handle.remove()
    acts, grads = caught["activation"].detach()[0], caught["gradient"].detach()[0]
    weights = grads.mean(dim=(1, 2), keepdim=True)
    cam = torch.relu((weights * acts).sum(dim=0))[None, None]
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    top = float(cam.max())
    cam = cam / top if top > 0 else torch.zeros_like(cam)
    return Saliency(cam.numpy().astype(np.float32), task, class_index, float(probs[class_index].detach()), name)


def overlay_png(image: np.ndarray, cam: np.ndarray, *, scale: int = 8, max_side: int = 512, alpha: float = 0.45) -> bytes:
    """A PNG of the image (left) beside the image with the map over it (right).

    Args:
        image: Normalized ``(C, S, S)`` image (values near [0, 1]); one channel is shown
            in gray, three as RGB, otherwise their mean.
        cam: ``(S, S)`` map in [0, 1].
        scale: Upscaling factor, capped so each panel is at most ``max_side`` pixels.
        max_side: Largest panel side.
        alpha: Opacity of the map.
    """
    import imagecodecs

    c = image.shape[0]
    base = image.transpose(1, 2, 0) if c == 3 else np.repeat(image.mean(axis=0)[..., None], 3, axis=2)
    base = np.clip(base, 0.0, 1.0)
    heat = _colormap(np.clip(cam, 0.0, 1.0))
    weight = alpha * np.clip(cam, 0.0, 1.0)[..., None] ** 0.5
    blended = (1 - weight) * base + weight * heat
    factor = max(1, min(scale, max_side // max(1, image.shape[-1])))
    panels = [np.kron(p, np.ones((factor, factor, 1))) for p in (base, blended)]
    gap = np.ones((panels[0].shape[0], max(2, factor), 3))
    rgb = np.concatenate([panels[0], gap, panels[1]], axis=1)
    return bytes(imagecodecs.png_encode(np.round(rgb * 255).astype(np.uint8)))


def _colormap(values: np.ndarray) -> np.ndarray:
    """A blue-to-red ('jet'-like) colormap of values in [0, 1] as ``(..., 3)`` floats."""
    v = values[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)
