"""The compiled CPU kernel against the torch transforms it fuses, on random batches.

Each transform the kernel does (random resized crop, D4 element, intensity jitter, and
all three in one pass) is compared with the torch reference in ``cellclass.data.augment``
fed the same draws: the draws are made from one seed twice, in the order the torch
functions make them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellclass.data import augment
from cellclass.data._kernels import augment_batch
from cellclass.data.augment import (
    intensity_jitter,
    random_dihedral,
    random_resized_crop,
)

SCALE, RATIO = (0.4, 1.0), (3 / 4, 4 / 3)
GAIN, SHIFT = 0.3, 0.2
TRANSFORMS = ("crop", "dihedral", "jitter")


def _reference(x: torch.Tensor, transforms: tuple[str, ...], seed: int) -> torch.Tensor:
    """The torch transforms one after another, drawing from one generator."""
    gen = torch.Generator().manual_seed(seed)
    if "crop" in transforms:
        x = random_resized_crop(x, SCALE, RATIO, gen)
    if "dihedral" in transforms:
        x = random_dihedral(x, gen)
    if "jitter" in transforms:
        x = intensity_jitter(x, GAIN, SHIFT, gen)
    return x


def _compiled(src: np.ndarray, rows: np.ndarray, transforms: tuple[str, ...], seed: int) -> np.ndarray:
    """The kernel over ``src[rows]``, with the draws the torch transforms make from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n, (c, h, w) = len(rows), src.shape[1:]
    crop_u, bounds = np.empty((0, 0)), np.array([1.0, 1.0, 0.0, 0.0])
    elements, jitter_u = np.empty(0, dtype=np.int64), np.empty((0, 0, 0))
    if "crop" in transforms:
        crop_u = augment._crop_uniforms(n, gen)
        bounds = np.array([SCALE[0], SCALE[1], math.log(RATIO[0]), math.log(RATIO[1])])
    if "dihedral" in transforms:
        elements = augment._draw_elements((n, c, h, w), gen)
    if "jitter" in transforms:
        jitter_u = augment._jitter_uniforms(n, c, gen)
    out = np.full((n, c, h, w), np.nan, dtype=np.float32)
    augment_batch(src, rows, crop_u, bounds, elements, augment._PASS_FLAGS, jitter_u, GAIN, SHIFT, out)
    return out


@pytest.mark.parametrize("transforms", [(t,) for t in TRANSFORMS] + [TRANSFORMS], ids="+".join)
@pytest.mark.parametrize("shape", [(64, 1, 16, 16), (48, 3, 9, 9), (32, 2, 10, 14)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_kernel_gives_the_values_of_the_torch_transforms(
        transforms: tuple[str, ...], shape: tuple[int, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = (rng.random(shape, dtype=np.float32) * 4 - 1).astype(np.float32)
    # rows picked as a training batch picks them: any order, repeats allowed
    rows = rng.integers(0, shape[0], size=shape[0] // 2).astype(np.int64)
    compiled = _compiled(src, rows, transforms, seed + 10)
    reference = _reference(torch.from_numpy(src[rows]), transforms, seed + 10)
    np.testing.assert_allclose(compiled, reference.numpy(), atol=1e-6, rtol=1e-6)
    assert not np.allclose(compiled, src[rows])  # every transform changed the batch


def test_the_kernel_without_draws_copies_the_rows() -> None:
    src = np.random.default_rng(3).random((10, 2, 6, 6), dtype=np.float32)
    rows = np.array([4, 0, 9, 4])
    assert np.array_equal(_compiled(src, rows, (), 0), src[rows])


def test_the_kernel_refuses_quarter_turns_of_non_square_images() -> None:
    src = np.zeros((2, 1, 4, 6), dtype=np.float32)
    out = np.empty_like(src)
    with pytest.raises(ValueError, match="square images"):
        augment_batch(src, np.arange(2), np.empty((0, 0)), np.ones(4), np.array([1, 1]), augment._PASS_FLAGS,
                      np.empty((0, 0, 0)), 0.0, 0.0, out)
