"""Compiled CPU kernel of the batch augmentation (numba), one pass per batch.

:class:`~cellclass.data.augment.BatchAugment` on a CPU float32 batch takes each sample's
rows straight from the source array (the normalized training images), crops and resizes
them bilinearly, applies the sample's D4 element and intensity jitter, and writes the
result once (the batch is read once and written once), where the same work as torch
operations passes over the batch a dozen times (gathers of both taps, blends, transposes,
the offset): on a small network that shows in the training throughput
(``benchmarks/train_step.py``, figures in docs/benchmarks.md). The values are those of
``augment._resample`` (same taps, same float32 weights, same order of operations), which
stays the path for other devices and dtypes; the crop boxes and jitter factors come from
the same functions as there (:mod:`cellclass.data._draws`), compiled here.
``tests/data/test_kernels.py`` holds the kernel to the torch transforms.

Compiled on first use and cached beside this file (numba ``cache=True``), so later
processes load it without compiling.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cellclass.data._draws import box_from_uniforms, jitter_from_uniforms


@njit(cache=True, nogil=True, boundscheck=False)
def _border_taps(scale: float, shift: float, size: int, reverse: bool, index: np.ndarray,
                 weight: np.ndarray) -> None:  # pragma: no cover - compiled
    """Lower tap and both weights of every output position, ``border`` padding.

    ``augment._taps`` in scalar form: grid_sample's unnormalization of affine_grid's
    coordinates, exact pixels kept exact, clamped to the image; the upper tap is
    ``index + 1`` clamped (its weight is 0 where that clamp bites).
    """
    for k in range(size):
        position = size - 1 - k if reverse else k
        base = (2.0 * position + 1.0) / size - 1.0
        px = ((scale * base + shift + 1.0) * size - 1.0) / 2.0
        snapped = np.round(px)
        if abs(px - snapped) < 1e-9:
            px = snapped
        px = min(max(px, 0.0), size - 1.0)
        low = np.floor(px)
        index[k] = int(low)
        weight[1, k] = px - low
        weight[0, k] = 1.0 - (px - low)


_box = njit(cache=True, nogil=True)(box_from_uniforms)
_jitter = njit(cache=True, nogil=True)(jitter_from_uniforms)


@njit(cache=True, nogil=True, boundscheck=False)
def augment_batch(src: np.ndarray, rows: np.ndarray, crop_u: np.ndarray, bounds: np.ndarray, elements: np.ndarray,
                  pass_flags: np.ndarray, jitter_u: np.ndarray, scale: float, shift: float,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[s] = jitter(D4(crop(src[rows[s]])))`` for every sample ``s``, from the batch's draws.

    Args:
        src: ``(N, C, H, W)`` float32, C-contiguous.
        rows: ``(n,)`` int64 rows of ``src``, each in ``[0, N)``.
        crop_u: ``(4, n)`` uniforms of the crop boxes, or ``(0, 0)`` for no crop.
        bounds: The crop's area and log aspect ranges (``augment._box_bounds``).
        elements: ``(n,)`` D4 elements, or empty for none.
        pass_flags: ``augment._PASS_FLAGS``, each element as (transposed, reverse the first
            pass's taps, reverse the second's).
        jitter_u: ``(2, n, C)`` uniforms of the intensity jitter, or ``(0, 0, 0)`` for none.
        scale, shift: The jitter's half-widths.
        out: ``(n, C, H, W)`` float32, written.
    """
    n = rows.shape[0]
    channels, height, width = src.shape[1], src.shape[2], src.shape[3]
    if crop_u.shape[0] > 0:
        sx, sy, tx, ty = _box(crop_u, bounds[0], bounds[1], bounds[2], bounds[3])
    else:  # the identity box: every tap lands on a pixel with weights 1 and 0
        sx, sy, tx, ty = np.ones(n), np.ones(n), np.zeros(n), np.zeros(n)
    if jitter_u.shape[0] > 0:
        gain, offset = _jitter(jitter_u, scale, shift)
    else:
        gain, offset = np.ones((n, channels)), np.zeros((n, channels))
    first_index = np.empty(height, dtype=np.int64)
    first_weight = np.empty((2, height), dtype=np.float64)
    second_index = np.empty(width, dtype=np.int64)
    second_weight = np.empty((2, width), dtype=np.float64)
    w0 = np.empty(width, dtype=np.float32)
    w1 = np.empty(width, dtype=np.float32)
    blended = np.empty(width + 1, dtype=np.float32)
    blended[width] = 0.0  # the upper tap past the last column always has weight 0
    line = np.empty(width, dtype=np.float32)
    for s in range(n):
        transposed = flip_first = flip_second = False
        if elements.shape[0] > 0:
            flags = pass_flags[elements[s]]
            transposed, flip_first, flip_second = flags[0], flags[1], flags[2]
            if transposed and height != width:
                raise ValueError("D4 elements that turn a quarter need square images")
        _border_taps(sy[s], ty[s], height, flip_first, first_index, first_weight)
        _border_taps(sx[s], tx[s], width, flip_second, second_index, second_weight)
        for c in range(channels):
            g = gain[s, c]
            o = np.float32(offset[s, c])
            for v in range(width):  # the jitter's gain folded into the second pass's weights
                w0[v] = np.float32(second_weight[0, v] * g)
                w1[v] = np.float32(second_weight[1, v] * g)
            image = src[rows[s], c]
            for u in range(height):
                a = first_index[u]
                upper = image[min(a + 1, height - 1)]
                lower = image[a]
                f0 = np.float32(first_weight[0, u])
                f1 = np.float32(first_weight[1, u])
                for b in range(width):  # first pass: blend two source rows
                    blended[b] = lower[b] * f0 + upper[b] * f1
                for v in range(width):  # second pass: blend two columns of that row
                    j = second_index[v]
                    line[v] = (blended[j] * w0[v] + blended[j + 1] * w1[v]) + o
                if transposed:
                    for v in range(width):
                        out[s, c, v, u] = line[v]
                else:
                    out[s, c, u, :] = line
