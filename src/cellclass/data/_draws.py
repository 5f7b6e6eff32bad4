"""From a batch's uniform draws to each sample's crop box and intensity jitter.

Plain NumPy, shared by the torch path of :mod:`cellclass.data.augment` and the compiled
kernel (:mod:`cellclass.data._kernels` compiles these same functions), so both turn the
same draws into the same boxes and factors.
"""

from __future__ import annotations

import numpy as np


def box_from_uniforms(u: np.ndarray, area_lo: float, area_hi: float, log_lo: float,
                      log_hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Crop boxes from uniform draws ``u`` ``(4, n)``: area uniform in ``[area_lo, area_hi]``,
    aspect log-uniform, each side capped at the image, position uniform inside it.

    Returns:
        Width, height, x shift and y shift of each box, in ``affine_grid`` units.
    """
    area = area_lo + (area_hi - area_lo) * u[0]
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[1])
    width = np.minimum(np.sqrt(area * aspect), 1.0)
    height = np.minimum(np.sqrt(area / aspect), 1.0)
    # affine_grid's coordinates run from -1 to 1: a box of relative size s can move by 1 - s.
    tx = (1.0 - width) * (2 * u[2] - 1)
    ty = (1.0 - height) * (2 * u[3] - 1)
    return width, height, tx, ty


def jitter_from_uniforms(u: np.ndarray, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Factors uniform in ``[1 - scale, 1 + scale]`` and offsets in ``[-shift, shift]`` from
    uniform draws ``u`` (``u[0]`` and ``u[1]``)."""
    return 1.0 - scale + 2 * scale * u[0], shift * (2 * u[1] - 1)
