"""Any timm model as a feature extractor with one linear head per task.

Pretrained weights come either from a local file (``pretrained=PATH``) or from timm's
hub (``pretrained=True``). A 3-channel (RGB) first convolution is adapted to ``in_chans``
the way timm does (:func:`timm.models.adapt_input_conv`: summed over RGB for one
channel, repeated and rescaled for more). Hub weights are looked up in the local Hugging
Face and torch hub caches first; where they are not cached and the hub cannot be
reached, creation fails at once instead of waiting on network timeouts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from timm.models import adapt_input_conv
from torch import Tensor, nn

from cellclass.errors import ModelError
from cellclass.models.network import (
    MultiHeadNetwork,
    load_matching_weights,
    load_state_dict_file,
)

logger = logging.getLogger(__name__)

_RESERVED = ("in_chans", "num_classes", "pretrained", "features_only")
_CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


class TimmNetwork(MultiHeadNetwork):
    """A timm backbone (``num_classes=0``, pooled features) followed by task heads.

    Args:
        name: A timm model name, optionally with a pretrained tag
            (``"resnet18"``, ``"resnet18.tv_in1k"``).
        in_chans: Number of input channels.
        heads: Task name → number of outputs.
        image_size: ``(height, width)``; passed to timm as ``img_size`` for models that
            take it (vision transformers), and checked with one dummy forward pass.
        pretrained: ``False``, ``True`` (hub weights) or a path to a local state dict
            (``.safetensors``, ``.pth``, ``.pt``) of the backbone, with or without its
            classifier, or of a cellclass network (its ``backbone.`` part is used).
        drop_rate: Dropout probability before the heads.
        task_types: Task name → ``"single"``, ``"multilabel"`` or ``"binary"``.
        stem_pool: Keep the stem's max-pool (``False`` replaces it by the identity, for
            models that have one, the ResNet family: the feature maps stay twice as
            large on each side, which small single-cell crops need; four times the
            compute after the stem).
        head: ``linear`` or ``mlp`` (:data:`~cellclass.models.network.HEADS`); ``mlp``
            also pools by concatenated average and max (timm's ``catavgmax``) unless
            ``global_pool`` is given.
        zero_init_last: ``False`` starts the last BatchNorm of every residual block at
            one instead of zero, for the models whose class zero-initialises it (timm's
            ResNet family); models that never do are built as they are.
        **timm_kwargs: Passed to :func:`timm.create_model` (``drop_path_rate``, ...).

    Raises:
        ModelError: bad arguments, weights that do not fit, or hub weights that cannot
            be fetched.
    """

    def __init__(
        self,
        name: str,
        in_chans: int,
        heads: Mapping[str, int],
        *,
        image_size: tuple[int, int] = (224, 224),
        pretrained: bool | str | Path = False,
        drop_rate: float = 0.0,
        task_types: Mapping[str, str] | None = None,
        stem_pool: bool = True,
        head: str = "linear",
        zero_init_last: bool = True,
        **timm_kwargs: Any,
    ) -> None:
        reserved = sorted(set(timm_kwargs) & set(_RESERVED))
        if reserved:
            raise ModelError(
                f"argument(s) {reserved} are set by cellclass (in_chans and pretrained are "
                "create_model arguments, the heads replace the classifier), got "
                f"{ {k: timm_kwargs[k] for k in reserved} }; remove them"
            )
        super().__init__(
            name,
            in_chans,
            heads,
            image_size=image_size,
            drop_rate=drop_rate,
            task_types=task_types,
            extra_config=dict(timm_kwargs, **({} if stem_pool else {"stem_pool": False}),
                              **({} if head == "linear" else {"head": head}),
                              **({} if zero_init_last else {"zero_init_last": False})),
        )
        if head == "mlp" and "global_pool" not in timm_kwargs:
            timm_kwargs = dict(timm_kwargs, global_pool="catavgmax")
        if pretrained is True:
            backbone = _hub_backbone(name, in_chans, image_size, timm_kwargs)
        else:
            backbone = _create_backbone(name, in_chans, image_size, timm_kwargs, zero_init_last=zero_init_last)
            if pretrained:
                load_backbone_weights(backbone, pretrained, model_name=name)
        if not stem_pool:
            _drop_stem_pool(backbone, name)
        self.backbone = backbone
        self._init_heads(_feature_width(backbone, in_chans, image_size, name), head)

    def forward_features(self, x: Tensor) -> Tensor:
        """Map images ``(N, C, H, W)`` to the backbone's pooled features."""
        return self.backbone(x)


def _create_backbone(
    name: str,
    in_chans: int,
    image_size: tuple[int, int],
    timm_kwargs: Mapping[str, Any],
    *,
    pretrained: bool = False,
    zero_init_last: bool = True,
) -> nn.Module:
    if not zero_init_last:
        try:
            return _create_backbone(name, in_chans, image_size, dict(timm_kwargs, zero_init_last=False),
                                    pretrained=pretrained)
        except ModelError as err:
            if "zero_init_last" not in str(err.__cause__):
                raise
            # The model's class takes no zero_init_last: it never zero-initialises a block.
    args = dict(timm_kwargs, in_chans=in_chans, num_classes=0, pretrained=pretrained)
    if "img_size" not in timm_kwargs:
        # Transformers need the input size at construction, CNNs refuse the argument:
        # the model class's own signature is the only reliable test.
        try:
            return timm.create_model(name, img_size=image_size, **args)
        except TypeError as err:
            if "img_size" not in str(err):
                raise _bad_kwargs_error(name, timm_kwargs, err) from err
    try:
        return timm.create_model(name, **args)
    except TypeError as err:
        raise _bad_kwargs_error(name, timm_kwargs, err) from err


def _drop_stem_pool(backbone: nn.Module, name: str) -> None:
    """Replace the stem's max-pool by the identity (``stem_pool=False``)."""
    if not isinstance(getattr(backbone, "maxpool", None), nn.MaxPool2d):
        raise ModelError(f"stem_pool = False is invalid for {name!r}: it has no stem max-pool; valid: models of "
                         "the ResNet family (resnet18, resnet50, resnext, ...), or stem_pool = True")
    backbone.maxpool = nn.Identity()


def _bad_kwargs_error(name: str, kwargs: Mapping[str, Any], err: Exception) -> ModelError:
    return ModelError(
        f"timm model {name!r} does not accept the argument(s) {sorted(kwargs)} ({err}); "
        "valid arguments are drop_rate, task_types and those of the timm model's class"
    )


def _feature_width(
    backbone: nn.Module, in_chans: int, image_size: tuple[int, int], name: str
) -> int:
    # A dummy forward gives the true width (some models add a head conv after pooling)
    # and turns an image size the model cannot take into a clear error now, not mid-run.
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_chans, *image_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ModelError(
            f"{name} cannot process images of image_size {image_size} ({err}); "
            "valid sizes depend on the architecture: try a larger image_size"
        ) from err
    finally:
        backbone.train(was_training)
    if out.ndim != 2:
        raise ModelError(
            f"{name} returns features of shape {tuple(out.shape)} with num_classes=0; "
            "cellclass needs pooled features (N, F): pick another timm model"
        )
    return int(out.shape[1])


def _names(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def load_backbone_weights(
    backbone: nn.Module, path: str | Path, *, model_name: str | None = None
) -> None:
    """Load a local state dict into a timm backbone built with ``num_classes=0``.

    The original classifier's weights are ignored, a 3-channel first convolution is
    adapted to the backbone's channel count with :func:`timm.models.adapt_input_conv`,
    and missing or unused keys are logged.

    Args:
        backbone: A model from ``timm.create_model(..., num_classes=0)``.
        path: ``.safetensors``, ``.pth`` or ``.pt`` file.
        model_name: Name used in messages (defaults to the class name).

    Raises:
        ModelError: the file is unreadable, or a weight other than the first
            convolution's has another shape than the model's.
    """
    name = model_name or type(backbone).__name__
    state = load_state_dict_file(path)
    if any(k.startswith("backbone.") for k in state):  # a cellclass network's weights
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    own = backbone.state_dict()
    classifiers = _names(cfg.get("classifier"))
    dropped = [
        k
        for k in state
        if k not in own and any(k == c or k.startswith(c + ".") for c in classifiers)
    ]
    if dropped:
        logger.debug("ignoring the original classifier's weights: %s", dropped)
        state = {k: v for k, v in state.items() if k not in dropped}
    stems = {f"{n}.weight" for n in _names(cfg.get("first_conv"))}

    def adapt(key: str, value: Tensor, target: Tensor) -> Tensor | None:
        if not (
            key in stems
            and value.ndim == 4
            and target.ndim == 4
            and value.shape[1] == 3
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            return None
        logger.info(
            "adapting %s of %s from 3 (RGB) to %d input channels",
            key, name, target.shape[1],
        )
        return adapt_input_conv(int(target.shape[1]), value)

    load_matching_weights(
        backbone, state, source=repr(str(path)), model_name=name, adapt=adapt
    )


def _hub_backbone(
    name: str, in_chans: int, image_size: tuple[int, int], timm_kwargs: Mapping[str, Any]
) -> nn.Module:
    backbone = _create_backbone(name, in_chans, image_size, timm_kwargs)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url:
        tags = timm.list_models(name.split(".", 1)[0], pretrained=True)
        raise ModelError(
            f"timm has no pretrained weights for {name!r}; "
            + (f"valid pretrained names are {tags}" if tags else "train it from scratch")
            + " or pass pretrained=PATH to a local weight file"
        )
    cached = _cached_weights(cfg)
    if cached is not None:
        logger.info("loading %s weights from the local cache %s", name, cached)
        load_backbone_weights(backbone, cached, model_name=name)
        return backbone
    where = f"the Hugging Face hub ({hub_id})" if hub_id else f"{url}"
    reason = _offline_reason(hub_id, url)
    if reason:
        raise ModelError(
            f"pretrained weights for {name!r} must be downloaded from {where}, which is "
            f"unreachable ({reason}), and are not in the local cache; pass "
            "pretrained=PATH to a local .safetensors/.pth file, or pretrained=False"
        )
    try:
        return _create_backbone(name, in_chans, image_size, timm_kwargs, pretrained=True)
    except (OSError, RuntimeError) as err:  # HTTP and hub errors derive from these
        raise ModelError(
            f"downloading pretrained weights for {name!r} from {where} failed ({err}); "
            "pass pretrained=PATH to a local .safetensors/.pth file, or pretrained=False"
        ) from err


def _hf_cache_dir() -> str:
    # Read at call time, unlike huggingface_hub's constants, which are fixed at import.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def _cached_weights(cfg: Mapping[str, Any]) -> Path | None:
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        filenames = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
        for filename in filter(None, filenames):
            found = try_to_load_from_cache(
                repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None
            )
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def _offline_reason(hub_id: str | None, url: str | None) -> str | None:
    if hub_id and os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        None,
    )
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname, parsed.port or 3128
    else:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        parsed = urlparse(endpoint if hub_id else (url or ""))
        host, port = parsed.hostname, parsed.port or 443
    if not host:
        return None
    if not _host_reachable(host, port):
        return f"cannot connect to {host}:{port}"
    return None


def _host_reachable(host: str, port: int, timeout: float = _CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # Name resolution ignores socket timeouts; a daemon thread bounds the whole probe.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])
