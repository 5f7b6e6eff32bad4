"""Simulated fluorescence fields of nuclei with their true instance masks, for segmentation tests.

A field looks like a 12-bit widefield image of a nuclear stain (Hoechst, DAPI): elliptical
nuclei, brighter at the centre and textured (chromatin), some in touching pairs whose
shared edge is flattened as real neighbours press together, blurred by the optics, on an
uneven background, with shot and read noise. Deterministic by seed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from cellclass.data.segment import relabel
from cellclass.errors import SegmentationError

__all__ = ["simulate_nuclei_field"]


def simulate_nuclei_field(
    shape: tuple[int, int] = (256, 256),
    n: int = 30,
    seed: int = 0,
    touching_fraction: float = 0.3,
    radius: tuple[float, float] = (8.0, 13.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Render one field of nuclei and its ground truth.

    Args:
        shape: ``(H, W)`` of the field.
        n: Number of nuclei asked for; fewer are placed where the field is too crowded
            (the labels say how many there are).
        seed: Seed of every random choice.
        touching_fraction: Share of the nuclei placed in touching pairs, in [0, 1].
        radius: Range of the nuclei's semi-axes, in pixels.

    Returns:
        ``(image, labels)``: the field as ``uint16`` of shape ``(1, H, W)`` with values in
        the 12-bit range, and its ``uint16`` instance labels ``(H, W)`` (0 background,
        nuclei 1..N, where overlapping ellipses are split at their equal-distance line).

    Raises:
        SegmentationError: On a shape under 16 pixels, a negative ``n``, a fraction outside
            [0, 1] or a radius range that is not ``0 < low <= high``.
    """
    height, width = shape
    if min(height, width) < 16:
        raise SegmentationError(f"field shape must be at least 16 x 16; got {shape}")
    if n < 0:
        raise SegmentationError(f"number of nuclei must be >= 0; got {n}")
    if not 0.0 <= touching_fraction <= 1.0:
        raise SegmentationError(f"touching_fraction must be in [0, 1]; got {touching_fraction}")
    low, high = radius
    if not 0 < low <= high:
        raise SegmentationError(f"radius range must satisfy 0 < low <= high; got {radius}")
    rng = np.random.default_rng(seed)
    nuclei = _place(rng, shape, n, touching_fraction, low, high)

    labels = np.zeros(shape, np.uint16)
    signal = np.zeros(shape, np.float32)
    nearest = np.full(shape, np.inf, np.float32)
    chromatin = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
    chromatin /= chromatin.std() or 1.0
    for index, (cy, cx, a, b, theta, brightness) in enumerate(nuclei, start=1):
        reach = int(math.ceil(a)) + 1
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, height)
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        box = (slice(y0, y1), slice(x0, x1))
        mine = (rho < 1.0) & (rho < nearest[box])
        nearest[box][mine] = rho[mine]
        labels[box][mine] = index
        profile = brightness * (1.0 - 0.45 * rho**2) * (1.0 + 0.12 * chromatin[box])
        signal[box][mine] = profile[mine]
    labels = relabel(labels)

    # optics, then the uneven background (illumination falling off to one corner), then noise
    image = ndi.gaussian_filter(signal, 1.2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tilt = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (np.cos(tilt) * xx / width + np.sin(tilt) * yy / height)
    image = image * (1.0 - 0.25 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))
    image += 110.0 + 40.0 * (ramp - ramp.min())
    image += rng.standard_normal(shape).astype(np.float32) * np.sqrt(np.maximum(image, 0.0)) * 0.8
    image += rng.standard_normal(shape).astype(np.float32) * 3.0
    pixels = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    return pixels[None], labels


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    touching_fraction: float,
    low: float,
    high: float,
) -> list[tuple[float, float, float, float, float, float]]:
    """Centres, semi-axes, angle and brightness of up to ``n`` nuclei, pairs touching."""
    height, width = shape
    n_pairs = int(round(n * touching_fraction / 2))
    placed: list[tuple[float, float, float, float, float, float]] = []

    def draw(cy: float, cx: float) -> tuple[float, float, float, float, float, float]:
        a = rng.uniform(low, high)
        b = a * rng.uniform(0.7, 1.0)
        return (cy, cx, a, b, rng.uniform(0.0, math.pi), rng.uniform(500.0, 1400.0))

    def free(candidate: tuple[float, ...], ignore: int | None = None) -> bool:
        cy, cx, a = candidate[:3]
        if not (-0.3 * a < cy < height + 0.3 * a and -0.3 * a < cx < width + 0.3 * a):
            return False
        for k, other in enumerate(placed):
            if k != ignore and math.hypot(cy - other[0], cx - other[1]) < a + other[2] + 3.0:
                return False
        return True

    attempts = 0
    while len(placed) < n and attempts < 200 * max(n, 1):
        attempts += 1
        first = draw(rng.uniform(0, height), rng.uniform(0, width))
        if not free(first):
            continue
        if n_pairs > 0 and len(placed) + 2 <= n:
            phi = rng.uniform(0.0, 2.0 * math.pi)
            second = draw(0.0, 0.0)
            # centre distance so the two ellipses overlap by about 15% of their reach
            gap = 0.85 * (_reach(first, phi) + _reach(second, phi + math.pi))
            second = (first[0] + gap * math.sin(phi), first[1] + gap * math.cos(phi), *second[2:])
            placed.append(first)
            if free(second, ignore=len(placed) - 1):
                placed.append(second)
                n_pairs -= 1
            else:
                placed.pop()
            continue
        placed.append(first)
    return placed


def _reach(nucleus: tuple[float, ...], phi: float) -> float:
    """Distance from an ellipse's centre to its edge in direction ``phi``."""
    _, _, a, b, theta = nucleus[:5]
    psi = phi - theta
    return a * b / math.sqrt((b * math.cos(psi)) ** 2 + (a * math.sin(psi)) ** 2)

