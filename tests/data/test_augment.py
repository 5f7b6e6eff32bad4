"""D4 symmetries form a group; random batch augmentations are reproducible and bounded."""

from __future__ import annotations

import json

import pytest
import torch

from cellclass.data.augment import (
    DIHEDRAL_INVERSE,
    AugmentConfig,
    BatchAugment,
    dihedral,
    intensity_jitter,
    random_dihedral,
    random_resized_crop,
    rotate,
    tta_d4,
    zoom,
)


def asymmetric(n: int = 1, c: int = 2, size: int = 5) -> torch.Tensor:
    """Distinct values everywhere: no D4 element but the identity leaves it unchanged."""
    return torch.arange(n * c * size * size, dtype=torch.float32).reshape(n, c, size, size)


def _element_of(y: torch.Tensor, x: torch.Tensor) -> int:
    matches = [k for k in range(8) if torch.equal(dihedral(x, k), y)]
    assert len(matches) == 1
    return matches[0]


def test_the_eight_transforms_are_distinct() -> None:
    x = asymmetric()
    images = [dihedral(x, k) for k in range(8)]
    assert torch.equal(images[0], x)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(images[i], images[j])


def test_the_transforms_form_a_group() -> None:
    x = asymmetric()
    table = [[_element_of(dihedral(dihedral(x, a), b), x) for b in range(8)] for a in range(8)]
    for row in table:  # closure, and each row a permutation (cancellation)
        assert sorted(row) == list(range(8))
    for k in range(8):
        assert torch.equal(dihedral(dihedral(x, k), DIHEDRAL_INVERSE[k]), x)
        assert table[k][DIHEDRAL_INVERSE[k]] == 0


def test_dihedral_rejects_invalid_element() -> None:
    with pytest.raises(ValueError, match="integer in 0..7; got 8"):
        dihedral(asymmetric(), 8)


def test_random_dihedral_is_deterministic_and_per_sample() -> None:
    x = asymmetric(n=64)
    a = random_dihedral(x, torch.Generator().manual_seed(1))
    b = random_dihedral(x, torch.Generator().manual_seed(1))
    c = random_dihedral(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    used = {_element_of(a[i : i + 1], x[i : i + 1]) for i in range(len(x))}
    assert used == set(range(8))


def test_random_dihedral_keeps_non_square_shapes() -> None:
    x = torch.rand(32, 1, 4, 6)
    out = random_dihedral(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_crop_keeps_shape_and_range() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 20, 24) * 5 - 1
    out = random_resized_crop(x, scale=(0.5, 1.0), generator=gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5
    assert not torch.allclose(out, x)


def test_full_crop_is_the_identity() -> None:
    x = torch.rand(4, 2, 9, 9)
    out = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    torch.testing.assert_close(out, x)


def test_zoom_keeps_shape_and_pads_with_zeros() -> None:
    x = torch.ones(8, 1, 16, 16)
    out = zoom(x, scale=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out[:, :, 0, 0].abs().max() == 0 and out[:, :, 8, 8].min() == 1


def test_jitter_statistics() -> None:
    scale, shift = 0.2, 0.1
    x = torch.ones(4000, 3, 4, 4)
    out = intensity_jitter(x, scale, shift, torch.Generator().manual_seed(0))
    values = out[:, :, 0, 0]
    assert torch.equal(out, values[:, :, None, None].expand_as(out))  # one factor per channel
    assert values.min() >= 1 - scale - shift and values.max() <= 1 + scale + shift
    assert abs(values.mean().item() - 1.0) < 0.01
    expected_std = ((scale**2 + shift**2) / 3) ** 0.5
    assert abs(values.std().item() - expected_std) / expected_std < 0.05
    assert abs(torch.corrcoef(values[:, :2].T)[0, 1].item()) < 0.1  # channels independent


def test_batch_augment_reproducible_and_serialisable() -> None:
    x = torch.rand(8, 2, 12, 12)
    config = AugmentConfig(crop_scale=(0.7, 1.0), intensity_scale=0.2)
    a, b = BatchAugment(config, seed=3), BatchAugment(config, seed=3)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), b(x))
    data = json.loads(json.dumps(a.to_dict()))
    again = BatchAugment.from_dict(data)
    assert again.config == config and again.seed == 3
    assert torch.equal(again(x), BatchAugment(config, seed=3)(x))
    assert BatchAugment(AugmentConfig(False, None, intensity_scale=0, intensity_shift=0))(x) is x


def test_augment_errors() -> None:
    with pytest.raises(ValueError, match=r"crop_scale must be \(low, high\).*got \(0.5, 1.2\)"):
        AugmentConfig(crop_scale=(0.5, 1.2))
    with pytest.raises(ValueError, match=r"unknown augmentation option\(s\) \['shear'\]; valid: dihedral"):
        AugmentConfig.from_dict({"shear": True})
    with pytest.raises(ValueError, match=r"rotate must be an angle in degrees in \[0, 180\]; got -5"):
        AugmentConfig(rotate=-5)
    with pytest.raises(ValueError, match="intensity_scale and intensity_shift must be >= 0"):
        AugmentConfig(intensity_scale=-1)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\); got \(3, 8, 8\)"):
        BatchAugment()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="of torch.uint8"):
        random_dihedral(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def test_tta_on_an_invariant_model_equals_no_tta() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 4)

    def model(x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = x.mean(dim=(-2, -1))  # global pooling: invariant to every D4 element
        return {"t": torch.softmax(linear(pooled), dim=1), "u": torch.sigmoid(pooled)}

    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        plain, tta = model(x), tta_d4(model, x)
    for task in plain:
        torch.testing.assert_close(tta[task], plain[task])


def test_tta_averages_over_the_transforms() -> None:
    x = asymmetric(n=2, c=1, size=3)

    def corner(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :, 0, 0]

    expected = torch.stack([corner(dihedral(x, k)) for k in range(8)]).mean(0)
    torch.testing.assert_close(tta_d4(corner, x), expected)
    with pytest.raises(ValueError, match="at least one D4 element"):
        tta_d4(corner, x, elements=[])


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize("shape", [(16, 3, 20, 24), (16, 1, 17, 17)])
def test_separable_resampling_gives_grid_sample_values(padding_mode: str, shape: tuple[int, ...]) -> None:
    import torch.nn.functional as F

    from cellclass.data.augment import _resample

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(*shape, generator=gen) * 4 - 1
    n = shape[0]
    sx, sy = 0.4 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64), 0.4 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    tx, ty = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5, torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, list(shape), align_corners=False)
    expected = F.grid_sample(x.double(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    torch.testing.assert_close(_resample(x, sx, sy, tx, ty, padding_mode=padding_mode), expected.float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(12, 12), (10, 14)])
@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_batch_augment_folds_dihedral_and_jitter_into_the_crop(size: tuple[int, int], jitter: float) -> None:
    # BatchAugment applies crop, D4 and jitter in one resampling; the result must be the
    # crop, then the D4 element drawn next (every one of the eight), then the jitter.
    x = torch.rand(64, 2, *size, generator=torch.Generator().manual_seed(5))
    config = AugmentConfig(crop_scale=(0.5, 1.0), intensity_scale=jitter, intensity_shift=jitter / 2)
    fused = BatchAugment(config, seed=11)(x)
    gen = torch.Generator().manual_seed(11)
    crop = random_resized_crop(x, config.crop_scale, config.crop_ratio, gen)
    sequential = random_dihedral(crop, gen)
    if jitter:
        sequential = intensity_jitter(sequential, config.intensity_scale, config.intensity_shift, gen)
    torch.testing.assert_close(fused, sequential, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(fused, crop)


CONFIGS = {
    "crop, D4, jitter": AugmentConfig(crop_scale=(0.5, 1.0), intensity_scale=0.2, intensity_shift=0.1),
    "crop only": AugmentConfig(dihedral=False, crop_scale=(0.5, 1.0), intensity_scale=0, intensity_shift=0),
    "D4 and jitter": AugmentConfig(crop_scale=None, intensity_scale=0.2, intensity_shift=0.1),
    "jitter only": AugmentConfig(dihedral=False, crop_scale=None, intensity_scale=0.2, intensity_shift=0.1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(64, 1, 16, 16), (32, 3, 12, 12), (32, 2, 10, 14)])
def test_compiled_kernel_gives_the_values_of_the_torch_operations(name: str, shape: tuple[int, ...]) -> None:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2)) * 3 - 1
    compiled = BatchAugment(CONFIGS[name], seed=4)(x)
    augmenter = BatchAugment(CONFIGS[name], seed=4)
    reference = augmenter._apply_torch(x, augmenter._draw(x.shape))  # what runs on other devices and dtypes
    torch.testing.assert_close(compiled, reference, atol=1e-6, rtol=1e-6)
    assert compiled.dtype == torch.float32 and compiled.shape == x.shape
    assert not torch.equal(compiled, x)
    if name == "D4 and jitter" and shape[-1] == shape[-2]:
        # pixels land exactly on pixels: the D4 part permutes values, without rounding
        no_jitter = AugmentConfig(crop_scale=None, intensity_scale=0, intensity_shift=0)
        turned = BatchAugment(no_jitter, seed=4)(x)
        assert torch.equal(turned.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_take_reads_rows_in_place_with_the_same_draws_and_values() -> None:
    import numpy as np

    source = np.random.default_rng(0).random((50, 2, 12, 12), dtype=np.float32)
    rows = np.array([7, 3, 49, 0, 3, -1])
    taken = BatchAugment(seed=9).take(source, rows)
    assert torch.equal(taken, BatchAugment(seed=9)(torch.from_numpy(source[rows])))
    # a source the kernel cannot read in place (float64 here) is read first, then augmented
    wide = source.astype(np.float64)
    assert torch.equal(BatchAugment(seed=9).take(wide, rows), taken)
    with pytest.raises(IndexError, match="indices into 50 images"):
        BatchAugment(seed=9).take(source, [1, 50])
    untouched = BatchAugment(AugmentConfig(dihedral=False, crop_scale=None, intensity_scale=0,
                                           intensity_shift=0)).take(source, rows)
    assert torch.equal(untouched, torch.from_numpy(source[rows]))


def test_rotation_by_right_angles_moves_pixels_exactly() -> None:
    x = asymmetric(n=2, c=2, size=6)
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-4)
    quarter = rotate(x, 90.0)
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate(x, [90.0, -90.0])[1], torch.rot90(x[1], -1, dims=(-2, -1)), atol=1e-4)
    wide = torch.rand(1, 1, 8, 12)  # a half turn of a non-square image: no shear, both mirrors
    assert torch.allclose(rotate(wide, 180.0), torch.flip(wide, dims=(-2, -1)), atol=1e-5)


def test_rotation_keeps_a_centred_disc_and_its_mass() -> None:
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 64).float()[None, None]
    turned = rotate(disc, 33.0)
    assert torch.allclose(turned.sum(), disc.sum(), rtol=0.02)
    bar = torch.zeros(1, 1, 32, 32)
    bar[..., 14:18, 4:28] = 1  # a horizontal bar turns away from its rows
    assert rotate(bar, 45.0)[..., 14:18, 4:28].sum() < 0.5 * bar.sum()


def test_batch_augment_rotation_is_drawn_after_the_other_transforms() -> None:
    x = torch.rand(8, 2, 16, 16)
    plain, turned = AugmentConfig(), AugmentConfig(rotate=30.0)
    a, b = BatchAugment(turned, seed=5)(x), BatchAugment(turned, seed=5)(x)
    assert torch.equal(a, b)
    base = BatchAugment(plain, seed=5)(x)
    assert not torch.allclose(a, base)
    # the same crops, elements and jitter as without rotation: the centre pixel, which a
    # rotation does not move, is the one of the unrotated batch
    assert torch.allclose(a[..., 7:9, 7:9].mean((-2, -1)), base[..., 7:9, 7:9].mean((-2, -1)), atol=0.15)
    source = x.numpy().copy()
    assert torch.equal(BatchAugment(turned, seed=5).take(source, range(8)), a)
    assert AugmentConfig.from_dict(turned.to_dict()) == turned
