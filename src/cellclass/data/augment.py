"""Batch augmentation on ``(N, C, H, W)`` float tensors, on whatever device they live.

Microscopy images have no preferred orientation, so the eight symmetries of the square
(the dihedral group D4: four rotations, each optionally mirrored) are free, exact
augmentations. Random resized crops and zooms resample every sample of a batch at once
(bilinear and separable: the values of ``affine_grid`` + ``grid_sample``, computed by
copying whole rows); intensity jitter scales and shifts each channel of each sample.
Randomness comes from a ``torch.Generator`` only, so a seed reproduces a run.

Every function takes a whole batch and draws an independent transform per sample.

:class:`BatchAugment`, the training augmenter, applies crop, D4 element and jitter in one
resampling. On a CPU float32 batch that is one compiled pass (``_kernels``, numba) that can
read each sample straight from the normalized images (:meth:`BatchAugment.take`); on other
devices and dtypes, torch operations with the same draws and values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cellclass.data._draws import box_from_uniforms, jitter_from_uniforms
from cellclass.data._kernels import augment_batch
from cellclass.data.normalize import checked_rows
from cellclass.errors import ConfigError

DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
"""``DIHEDRAL_INVERSE[k]`` undoes :func:`dihedral` element ``k``."""

SHAPE_PRESERVING = (0, 2, 4, 6)
"""D4 elements that keep a non-square ``H x W``: identity, half turn and the two mirrors."""

Output = torch.Tensor | Mapping[str, torch.Tensor]
ArrayLike = np.ndarray | torch.Tensor | float


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Apply element ``k`` of the dihedral group D4 to the last two dimensions.

    Element ``k`` mirrors left-right when ``k >= 4``, then turns ``k % 4`` quarter turns
    counter-clockwise. Odd quarter turns swap ``H`` and ``W``.

    Args:
        x: Tensor ``(..., H, W)``, usually a batch ``(N, C, H, W)``.
        k: Element index, 0 to 7 (0 is the identity).

    Raises:
        ValueError: When ``k`` is not in 0..7.
    """
    if not isinstance(k, int) or not 0 <= k < 8:
        raise ValueError(f"dihedral element must be an integer in 0..7; got {k!r}")
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply an independent, uniformly drawn D4 element to every sample of a batch.

    Non-square batches draw from :data:`SHAPE_PRESERVING` only, so the batch keeps one
    shape.

    Args:
        x: Batch ``(N, C, H, W)``.
        generator: Source of randomness; the default generator when ``None``.
    """
    _check_batch(x)
    return _apply_dihedral(x, _draw_elements(x.shape, generator))


def _apply_dihedral(x: torch.Tensor, elements: np.ndarray) -> torch.Tensor:
    """Sample ``i`` turned by D4 element ``elements[i]``."""
    n, c, h, w = x.shape
    # Every element is a permutation of the H*W pixel positions: one gather applies each
    # sample's own, whatever the mix of elements in the batch.
    table = _dihedral_table(h, w, x.device)
    index = table[torch.from_numpy(elements).to(x.device)][:, None, :].expand(n, c, h * w)
    return torch.gather(x.reshape(n, c, h * w), 2, index).reshape(x.shape)


def _draw_elements(shape: Sequence[int], generator: torch.Generator | None) -> np.ndarray:
    """One uniformly drawn D4 element per sample (shape-preserving ones for non-square images)."""
    n, _, h, w = shape
    allowed = np.arange(8) if h == w else np.array(SHAPE_PRESERVING)
    draws = torch.randint(len(allowed), (n,), generator=generator, device=_device(generator))
    return allowed[draws.cpu().numpy()]


_DIHEDRAL_TABLES: dict[tuple[int, int, str], torch.Tensor] = {}


def _dihedral_table(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(8, H*W)`` source positions of each D4 element (from :func:`dihedral` itself)."""
    key = (h, w, str(device))
    if key not in _DIHEDRAL_TABLES:
        grid = torch.arange(h * w).reshape(h, w)
        rows = [dihedral(grid, k).reshape(-1) if (k in SHAPE_PRESERVING or h == w) else grid.reshape(-1)
                for k in range(8)]
        _DIHEDRAL_TABLES[key] = torch.stack(rows).to(device)
    return _DIHEDRAL_TABLES[key]


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box from every sample and resize it back to ``H x W``.

    The box covers a fraction of the image area drawn uniformly from ``scale``, with a
    width/height ratio drawn log-uniformly from ``ratio`` (each side capped at the full
    image), at a uniformly drawn position inside the image. Bilinear resampling keeps
    values within each sample's range.

    Args:
        x: Batch ``(N, C, H, W)`` of floats.
        scale: Range of the box's area as a fraction of the image, in ``(0, 1]``.
        ratio: Range of the box's width/height ratio.
        generator: Source of randomness.

    Raises:
        ConfigError: On an invalid range.
        ValueError: On an invalid batch.
    """
    _check_batch(x)
    return _resample(x, *_crop_box(x.shape[0], scale, ratio, generator), padding_mode="border")


def _crop_box(n: int, scale: tuple[float, float], ratio: tuple[float, float],
              generator: torch.Generator | None) -> tuple[np.ndarray, ...]:
    """Draw ``n`` crop boxes as (width, height, x shift, y shift) in ``affine_grid`` units."""
    return box_from_uniforms(_crop_uniforms(n, generator), *_box_bounds(scale, ratio))


def _crop_uniforms(n: int, generator: torch.Generator | None) -> np.ndarray:
    """The ``(4, n)`` uniform draws a batch's crop boxes are made of."""
    return torch.rand((4, n), generator=generator, device=_device(generator), dtype=torch.float64).cpu().numpy()


def _box_bounds(scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """Checked ranges of the crop: area low and high, log aspect ratio low and high."""
    _check_range("scale", scale, upper=1.0)
    _check_range("ratio", ratio)
    return float(scale[0]), float(scale[1]), math.log(ratio[0]), math.log(ratio[1])


def zoom(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.9, 1.1),
    generator: torch.Generator | None = None,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Zoom every sample about its centre by a factor drawn uniformly from ``scale``.

    A factor above 1 magnifies (the border is cut off); below 1 shrinks, filling the
    margin per ``padding_mode`` (``zeros``: the background after normalization;
    ``border`` or ``reflection`` as in ``grid_sample``).

    Raises:
        ConfigError: On an invalid range.
        ValueError: On an invalid batch.
    """
    _check_batch(x)
    _check_range("scale", scale)
    n = x.shape[0]
    factor = _uniform(n, scale, generator).numpy()
    zeros = np.zeros(n)
    return _resample(x, 1.0 / factor, 1.0 / factor, zeros, zeros, padding_mode=padding_mode)


def intensity_jitter(
    x: torch.Tensor,
    scale: float = 0.1,
    shift: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scale and shift every channel of every sample: ``x * a + b``.

    ``a`` is drawn uniformly from ``[1 - scale, 1 + scale]`` and ``b`` from
    ``[-shift, shift]``, independently per sample and channel, so the mean factor is 1
    and the mean offset 0. Meant for normalized images (background near 0, bright near 1).

    Raises:
        ConfigError: When ``scale`` or ``shift`` is negative.
        ValueError: On an invalid batch.
    """
    _check_batch(x)
    if scale < 0 or shift < 0:
        raise ConfigError(f"intensity scale and shift must be >= 0; got {scale}, {shift}")
    return _apply_jitter(x, *_jitter_draws(x.shape[0], x.shape[1], scale, shift, generator))


def _apply_jitter(x: torch.Tensor, gain: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """``x * gain + offset`` with ``(N, C, 1, 1)`` factors and offsets."""
    gain_t, offset_t = (torch.from_numpy(v).to(x.device, x.dtype) for v in (gain, offset))
    return torch.addcmul(offset_t, x, gain_t)


def _jitter_draws(n: int, c: int, scale: float, shift: float,
                  generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Factors and offsets ``(n, c, 1, 1)`` of :func:`intensity_jitter`."""
    u = _jitter_uniforms(n, c, generator).reshape(2, n, c, 1, 1)
    return jitter_from_uniforms(u, scale, shift)


def _jitter_uniforms(n: int, c: int, generator: torch.Generator | None) -> np.ndarray:
    """The ``(2, n, c)`` uniform draws of a batch's intensity jitter."""
    return torch.rand((2, n, c), generator=generator, device=_device(generator), dtype=torch.float64).cpu().numpy()


@dataclass
class AugmentConfig:
    """Which augmentations a training batch gets.

    Attributes:
        dihedral: Apply a random D4 element (rotations and mirrors) per sample.
        crop_scale: Area range of random resized crops; ``None`` for no crop.
        crop_ratio: Width/height ratio range of the crops.
        intensity_scale: Half-width of the multiplicative jitter (0 for none).
        intensity_shift: Half-width of the additive jitter (0 for none).
        rotate: Largest angle, in degrees, of a random rotation per sample, drawn
            uniformly from ``[-rotate, rotate]`` after the other transforms (0 for none;
            bilinear, edges extended). With ``dihedral`` every angle is covered.
    """

    dihedral: bool = True
    crop_scale: tuple[float, float] | None = (0.85, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    rotate: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(v) for v in self.crop_scale)
            _check_range("crop_scale", self.crop_scale, upper=1.0)
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        _check_range("crop_ratio", self.crop_ratio)
        if self.intensity_scale < 0 or self.intensity_shift < 0:
            raise ConfigError(
                "intensity_scale and intensity_shift must be >= 0; got "
                f"{self.intensity_scale}, {self.intensity_shift}"
            )
        if not 0 <= self.rotate <= 180:
            raise ConfigError(f"rotate must be an angle in degrees in [0, 180]; got {self.rotate}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (lists, not tuples) for YAML, JSON and checkpoints."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Rebuild a config saved with :meth:`to_dict`.

        Raises:
            ConfigError: On an unknown key; the message lists the valid ones.
        """
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown augmentation option(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**dict(data))


class BatchAugment:
    """Callable applying an :class:`AugmentConfig` to training batches, reproducibly.

    Order: crop, dihedral, intensity jitter. The generator lives on the CPU; draws are
    moved to the batch's device.

    Args:
        config: What to apply; the defaults of :class:`AugmentConfig` when ``None``.
        seed: Seed of this augmenter's own generator.
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        self.config = config or AugmentConfig()
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a float batch ``(N, C, H, W)``; returns a new tensor of the same shape."""
        _check_batch(x)
        draws = self._draw(x.shape)
        if draws is None:
            out = x
        elif x.device.type == "cpu" and x.dtype == torch.float32:
            src = x.contiguous().numpy()
            out = torch.from_numpy(self._run_kernel(src, np.arange(len(src)), draws))
        else:
            out = self._apply_torch(x, draws)
        return self._rotate(out)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The batch turned by a random angle per sample (``rotate``; drawn after the
        other transforms' draws, so turning it on leaves those draws as they were)."""
        if not self.config.rotate:
            return x
        return rotate(x, _uniform(len(x), (-self.config.rotate, self.config.rotate), self.generator).numpy())

    def _apply_torch(self, x: torch.Tensor, draws: tuple[np.ndarray | None, ...]) -> torch.Tensor:
        """A batch's draws (see :meth:`_draw`) applied by torch operations: the path for
        other devices and dtypes, with the values of the compiled kernel."""
        crop_u, elements, jitter_u = draws
        n, c = x.shape[:2]
        gain = offset = None
        if jitter_u is not None:
            gain, offset = jitter_from_uniforms(jitter_u.reshape(2, n, c, 1, 1), self.config.intensity_scale,
                                                self.config.intensity_shift)
        if crop_u is not None:
            # One resampling pass does it all: the result of random_resized_crop, then
            # random_dihedral, then intensity_jitter with the same draws, in a fraction of
            # the time (the D4 element and the jitter are folded into the crop's taps).
            box = box_from_uniforms(crop_u, *_box_bounds(self.config.crop_scale, self.config.crop_ratio))
            return _resample(x, *box, padding_mode="border", elements=elements, gain=gain, offset=offset)
        if elements is not None:
            x = _apply_dihedral(x, elements)
        if gain is not None:
            x = _apply_jitter(x, gain, offset)
        return x

    def take(self, source: Any, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Augment rows of ``source``: the result of ``self(torch.from_numpy(source[rows]))``.

        The same draws and values, but from a C-contiguous float32 ``(N, C, H, W)`` array
        each sample is read straight from ``source`` by the compiled kernel, without
        copying the batch first (the training loader's path). Any other ``source`` that
        supports ``source[rows]`` is read first, then augmented.

        Raises:
            IndexError: When a row is outside ``source``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not _kernel_source(source):
            return self(torch.from_numpy(np.ascontiguousarray(source[rows], dtype=np.float32)))
        if rows.ndim != 1:
            raise IndexError(f"rows must be a 1-D list of indices into {len(source)} images; got {rows!r}")
        rows = checked_rows(rows, len(source))
        draws = self._draw((len(rows), *source.shape[1:]))
        if draws is None:
            return self._rotate(torch.from_numpy(source[rows]))
        return self._rotate(torch.from_numpy(self._run_kernel(source, rows, draws)))

    def _draw(self, shape: Sequence[int]) -> tuple[np.ndarray | None, ...] | None:
        """This batch's random draws, in this order: the crop's uniforms ``(4, N)``, the D4
        elements ``(N,)``, the jitter's uniforms ``(2, N, C)`` (``None`` for each that is
        off; ``None`` altogether when nothing is). The draws are those of
        random_resized_crop, random_dihedral and intensity_jitter in turn."""
        cfg = self.config
        n, c = shape[0], shape[1]
        crop_u = _crop_uniforms(n, self.generator) if cfg.crop_scale is not None else None
        elements = _draw_elements(shape, self.generator) if cfg.dihedral else None
        jitter = cfg.intensity_scale > 0 or cfg.intensity_shift > 0
        jitter_u = _jitter_uniforms(n, c, self.generator) if jitter else None
        if crop_u is None and elements is None and jitter_u is None:
            return None
        return crop_u, elements, jitter_u

    def _run_kernel(self, src: np.ndarray, rows: np.ndarray, draws: tuple[np.ndarray | None, ...]) -> np.ndarray:
        """The compiled kernel over ``src[rows]`` with a batch's draws (see :meth:`_draw`)."""
        crop_u, elements, jitter_u = draws
        n, (c, h, w) = len(rows), src.shape[1:]
        cfg = self.config
        none = np.empty((0, 0), dtype=np.float64)
        bounds = np.array(_box_bounds(cfg.crop_scale, cfg.crop_ratio) if crop_u is not None else (1.0, 1.0, 0.0, 0.0))
        out = np.empty((n, c, h, w), dtype=np.float32)
        augment_batch(src, rows, none if crop_u is None else crop_u, bounds,
                      np.empty(0, dtype=np.int64) if elements is None else elements, _PASS_FLAGS,
                      none.reshape(0, 0, 0) if jitter_u is None else jitter_u,
                      float(cfg.intensity_scale), float(cfg.intensity_shift), out)
        return out

    def __repr__(self) -> str:
        return f"BatchAugment(config={self.config!r}, seed={self.seed})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form: the config and the seed."""
        return {"config": self.config.to_dict(), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchAugment:
        """Rebuild an augmenter saved with :meth:`to_dict` (its generator restarts)."""
        return cls(AugmentConfig.from_dict(data.get("config", {})), int(data.get("seed", 0)))


def rotate(x: torch.Tensor, degrees: ArrayLike) -> torch.Tensor:
    """Turn each sample of ``(N, C, H, W)`` by its angle (degrees, counter-clockwise as
    shown with the origin top-left) about the image centre, in pixel space (a non-square
    image is not sheared). Bilinear; the border pixels are extended outwards."""
    _check_batch(x)
    n, _, h, w = x.shape
    rad = np.deg2rad(np.broadcast_to(np.asarray(degrees, dtype=np.float64), (n,)))
    cos, sin = np.cos(rad), np.sin(rad)
    theta = np.zeros((n, 2, 3))
    # affine_grid maps output to input in coordinates normalized by each side: a rotation
    # in pixels scales its off-diagonal terms by the sides' ratio.
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    grid = F.affine_grid(torch.from_numpy(theta).to(work.device, work.dtype), list(work.shape), align_corners=False)
    return F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


def tta_d4(
    model_fn: Callable[[torch.Tensor], Output],
    x: torch.Tensor,
    elements: Sequence[int] | None = None,
) -> Output:
    """Test-time augmentation: average a model's outputs over the D4 transforms of a batch.

    A class label does not move when the image turns, so the outputs are averaged as
    they come, with no inverse transform (that would be needed for segmentation, not
    here). Average probabilities, not logits: pass a ``model_fn`` that returns
    probabilities (softmax or sigmoid applied). Call under ``torch.no_grad()`` or
    ``torch.inference_mode()`` for inference.

    Args:
        model_fn: Maps a batch to a tensor, or to a mapping task → tensor.
        x: Batch ``(N, C, H, W)``.
        elements: D4 elements to average over; all eight for square images,
            :data:`SHAPE_PRESERVING` otherwise.

    Returns:
        The mean output, of the same structure as ``model_fn``'s.
    """
    _check_batch(x)
    if elements is None:
        elements = range(8) if x.shape[-1] == x.shape[-2] else SHAPE_PRESERVING
    elements = list(elements)
    if not elements:
        raise ValueError("tta_d4 needs at least one D4 element; got none")
    total: Output | None = None
    for k in elements:
        out = model_fn(dihedral(x, k))
        if total is None:
            total = dict(out) if isinstance(out, Mapping) else out
        elif isinstance(total, dict):
            total = {t: total[t] + out[t] for t in total}
        else:
            total = total + out
    if isinstance(total, dict):
        return {t: v / len(elements) for t, v in total.items()}
    return total / len(elements)


# -- helpers ------------------------------------------------------------------------------
def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(
    shape: int | tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """CPU ``float64`` draws of ``shape``, uniform in ``bounds``."""
    lo, hi = bounds
    shape = (shape,) if isinstance(shape, int) else shape
    u = torch.rand(shape, generator=generator, device=_device(generator), dtype=torch.float64)
    return (lo + (hi - lo) * u).cpu()


def _resample(
    x: torch.Tensor,
    sx: ArrayLike,
    sy: ArrayLike,
    tx: ArrayLike,
    ty: ArrayLike,
    *,
    padding_mode: str,
    elements: ArrayLike | None = None,
    gain: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> torch.Tensor:
    """Sample every image at ``(sx * u + tx, sy * v + ty)`` of its normalized grid.

    Bilinear, ``align_corners=False``: the values of ``affine_grid`` + ``grid_sample``. The
    map is axis-aligned, so the sampling separates into two passes, each of which copies
    whole rows (``index_select``) and blends the two taps of every output row; a transpose
    between them turns columns into rows. That is several times faster than ``grid_sample``
    or per-pixel gathers on a CPU, which matters when a small network trains faster than
    its batches are augmented. ``elements`` (one D4 element per sample) is applied to the
    result at no extra cost: mirrors reverse a pass's taps, and the transpose some
    elements need is the one between the passes; so is an intensity jitter
    ``out * gain + offset`` (``(N, C, 1, 1)`` each). ``reflection`` padding goes through
    ``grid_sample`` (no ``elements`` or jitter there).
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n, c, h, w = work.shape
    if padding_mode not in ("border", "zeros"):
        if elements is not None or gain is not None or offset is not None:
            raise ValueError(f"D4 elements and jitter cannot be folded into {padding_mode!r} resampling")
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = ty
        theta = torch.from_numpy(theta).to(work.device, work.dtype)
        grid = F.affine_grid(theta, list(work.shape), align_corners=False)
        return F.grid_sample(work, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False).to(x.dtype)
    # Two passes over rows with a transpose between give P = B x^T A^T for the taps A
    # (first pass, over x's rows) and B (second pass, over its columns). Without a D4
    # element, O = R x C^T for the rows' taps R and the columns' taps C: A = R, B = C and
    # O = P^T, one more transpose. An element is (transpose, then mirror rows, then mirror
    # columns) of the crop: mirrors reverse taps; a transposing element wants
    # O = C' x^T R'^T, which is P itself (its row mirror reverses C, its column mirror R).
    # The taps are computed in NumPy: on small images, a few dozen tiny torch operations
    # would cost more than the resampling itself.
    transposed, flip_first, flip_second = _element_flags(elements, n, h, w)
    first = _taps(sy, ty, h, n, padding_mode, flip_first)
    second = _taps(sx, tx, w, n, padding_mode, flip_second)
    out = _blend_rows(work.contiguous(), first)
    out = _blend_rows(out.transpose(-1, -2).contiguous(), second, gain)
    if not transposed.any():
        out = out.transpose(-1, -2).contiguous()
    elif not transposed.all():
        keep = torch.from_numpy(np.flatnonzero(~transposed)).to(out.device)
        out[keep] = out.index_select(0, keep).transpose(-1, -2)
    if offset is not None:
        out.add_(torch.from_numpy(offset).to(out.device, out.dtype))
    return out.to(x.dtype)


def _element_flags(elements: ArrayLike | None, n: int, h: int, w: int) -> tuple[np.ndarray, ...]:
    """Per sample: (transposed, reverse the first pass's taps, reverse the second's).

    See :func:`_resample`: an element is (transpose, then mirror rows, then mirror columns)
    of the crop, and a transposing element swaps which pass each mirror reverses.
    """
    if elements is None:
        none = np.zeros(n, dtype=bool)
        return none, none, none
    flags = _PASS_FLAGS[np.asarray(elements, dtype=np.int64)]
    if flags[:, 0].any() and h != w:
        raise ValueError(f"D4 elements that turn a quarter need square images; got {h} x {w}")
    return flags[:, 0], flags[:, 1], flags[:, 2]


def _kernel_source(source: Any) -> bool:
    """Whether the kernel can read ``source`` in place: a C-contiguous float32 ``(N, C, H, W)`` array."""
    return (isinstance(source, np.ndarray) and source.dtype == np.float32 and source.ndim == 4
            and source.flags.c_contiguous)


def _taps(scale: ArrayLike, shift: ArrayLike, size: int, n: int, padding_mode: str,
          reverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two taps of every output position: source indices and weights, ``(2, n, size)`` each.

    ``zeros`` padding gives a tap outside the image the weight 0 (its index clamped
    inside); ``reverse`` mirrors the output positions of the samples it marks.
    """
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (n,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (n,))
    base = (2 * np.arange(size, dtype=np.float64) + 1) / size - 1
    base = np.where(reverse[:, None], base[::-1], base)
    # grid_sample's unnormalization (align_corners=False) of affine_grid's coordinates.
    px = ((scale[:, None] * base + shift[:, None] + 1) * size - 1) / 2
    snapped = np.round(px)
    px = np.where(np.abs(px - snapped) < 1e-9, snapped, px)  # exact pixels stay exact
    if padding_mode == "border":
        np.clip(px, 0, size - 1, out=px)
    low = np.floor(px)
    index = np.stack([low, low + 1]).astype(np.int64)
    w1 = px - low
    weight = np.stack([1 - w1, w1])
    if padding_mode == "zeros":
        weight = np.where((index >= 0) & (index < size), weight, 0.0)
    return np.clip(index, 0, size - 1), weight


def _blend_rows(t: torch.Tensor, taps: tuple[np.ndarray, np.ndarray], gain: np.ndarray | None = None) -> torch.Tensor:
    """``(n, c, R, w)``: output row ``r`` of sample ``s`` = ``w0 * t[s, :, i0] + w1 * t[s, :, i1]``.

    Both taps of all rows are copied by one ``index_select``; ``gain`` (``(n, c, 1, 1)``)
    multiplies both weights.
    """
    n, c, h, w = t.shape
    index, weight = taps
    rows = index.shape[-1]
    offset = (np.arange(n * c, dtype=np.int64) * h).reshape(1, n, c, 1)
    flat_index = torch.from_numpy((offset + index[:, :, None, :]).reshape(-1)).to(t.device)
    picked = t.view(n * c * h, w).index_select(0, flat_index).view(2, n, c, rows, w)
    weight = weight.reshape(2, n, 1, rows, 1)
    if gain is not None:
        weight = weight * gain[None]
    dtype = np.float32 if t.dtype == torch.float32 else np.float64
    weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=dtype)).to(t.device, t.dtype)
    out = torch.mul(picked[0], weight[0])
    return out.addcmul_(picked[1], weight[1])


def _canonical_forms() -> np.ndarray:
    """``(8, 3)`` bool: each D4 element as (transpose, then mirror rows, then mirror columns)."""
    grid = torch.arange(12.0).reshape(3, 4)[:3, :3]  # distinct values: every element differs
    forms = []
    for k in range(8):
        target = dihedral(grid, k)
        for t in (False, True):
            for fr in (False, True):
                for fc in (False, True):
                    g = grid.T if t else grid
                    g = g.flip(-2) if fr else g
                    g = g.flip(-1) if fc else g
                    if torch.equal(g, target):
                        forms.append((t, fr, fc))
    return np.array(forms, dtype=bool)


def _pass_flags() -> np.ndarray:
    """``(8, 3)`` bool: each D4 element as :func:`_resample` applies it: (transposed, reverse
    the first pass's taps, reverse the second's). A transposing element swaps which pass
    each of its mirrors reverses."""
    transposed, mirror_rows, mirror_columns = _canonical_forms().T
    return np.stack([transposed, np.where(transposed, mirror_columns, mirror_rows),
                     np.where(transposed, mirror_rows, mirror_columns)], axis=1)


_PASS_FLAGS = _pass_flags()


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = getattr(x, "dtype", None)
        raise ValueError(
            f"augmentation expects a float tensor of shape (N, C, H, W); got {shape} of {dtype}"
        )


def _check_range(name: str, bounds: Sequence[float], upper: float | None = None) -> None:
    too_high = upper is not None and len(bounds) == 2 and bounds[1] > upper
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1] or too_high:
        limit = f" and at most {upper}" if upper is not None else ""
        raise ConfigError(
            f"{name} must be (low, high) with 0 < low <= high{limit}; got {tuple(bounds)}"
        )
