"""sharpness.data.Augmentation: crop / flip / cutout geometry, determinism, argument checks."""

from __future__ import annotations

import pytest
import torch

from sharpness.data import Augmentation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _position_coded(batch: int, channels: int = 3, height: int = 32, width: int = 32) -> torch.Tensor:
    """Each pixel holds 1 + its flat position (the same in every channel), so 0 can only be padding."""
    codes = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    return codes.expand(batch, channels, height, width).clone()


def test_shape_dtype_preserved_and_input_untouched() -> None:
    x = torch.randn(16, 3, 32, 32)
    before = x.clone()
    out = Augmentation(cutout=8)(x, _gen(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(x, before)
    assert not torch.equal(out, x)  # 16 images: some crop, flip or hole certainly changed something
    odd = torch.randn(5, 1, 8, 12)  # non-square, one channel
    assert Augmentation(crop_padding=1, cutout=3)(odd, _gen(0)).shape == (5, 1, 8, 12)


def test_same_generator_seed_same_output_and_seed_matters() -> None:
    x = torch.randn(32, 3, 32, 32)
    aug = Augmentation(cutout=8)
    a, b, c = aug(x, _gen(7)), aug(x, _gen(7)), aug(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the generator advances: two calls in a row differ
    g = _gen(7)
    assert not torch.equal(aug(x, g), aug(x, g))


def test_flip_really_flips_about_half_the_images() -> None:
    x = _position_coded(64, height=4, width=6)
    out = Augmentation(crop_padding=0, flip=True)(x, _gen(1))
    mirrored = x.flip(-1)
    same = (out == x).flatten(1).all(1)
    flipped = (out == mirrored).flatten(1).all(1)
    assert bool((same ^ flipped).all())  # every image is either untouched or exactly mirrored
    assert 16 <= int(flipped.sum()) <= 48  # Binomial(64, 1/2): both outcomes occur
    assert out[flipped][0, 0, 0].tolist() == [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]


def test_crop_shifts_content_by_at_most_padding_pixels() -> None:
    height = width = 12
    x = _position_coded(256, channels=2, height=height, width=width)
    out = Augmentation(crop_padding=4, flip=False)(x, _gen(2))
    shifts = set()
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    for image in out:
        assert torch.equal(image[0], image[1])  # both channels moved together
        visible = image[0] > 0
        source = image[0][visible].long() - 1
        dy = rows[visible] - source // width
        dx = cols[visible] - source % width
        # one rigid shift per image, with |dy|, |dx| <= 4
        assert dy.unique().numel() == 1 and dx.unique().numel() == 1
        shift = (int(dy[0]), int(dx[0]))
        assert max(abs(shift[0]), abs(shift[1])) <= 4
        # exactly the pixels shifted in from outside are zero padding
        src_r, src_c = rows - shift[0], cols - shift[1]
        inside = (src_r >= 0) & (src_r < height) & (src_c >= 0) & (src_c < width)
        assert torch.equal(visible, inside)
        shifts.add(shift)
    assert len(shifts) > 60  # 81 possible shifts, about 77 distinct expected in 256 draws
    assert {dy for dy, _ in shifts} == set(range(-4, 5)) == {dx for _, dx in shifts}  # the full range is used


def test_cutout_zeros_one_square_of_the_right_size() -> None:
    size, height, width = 8, 32, 32
    x = torch.ones(200, 3, height, width)
    out = Augmentation(crop_padding=0, flip=False, cutout=size)(x, _gen(3))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    full_squares = 0
    for image in out:
        hole = image == 0
        assert torch.equal(hole[0], hole[1]) and torch.equal(hole[0], hole[2])  # same hole in every channel
        hole = hole[0]
        hole_rows, hole_cols = hole.any(1), hole.any(0)
        assert torch.equal(hole, hole_rows[:, None] & hole_cols[None, :])  # a rectangle
        r = hole_rows.nonzero().flatten()
        c = hole_cols.nonzero().flatten()
        assert r.numel() >= 1 and c.numel() >= 1  # the centre is inside the image, so the hole is never empty
        assert torch.equal(r, torch.arange(r[0], r[-1] + 1)) and torch.equal(c, torch.arange(c[0], c[-1] + 1))
        # the side is `size` unless the hole is clipped at an edge of the image
        assert r.numel() == size or r[0] == 0 or r[-1] == height - 1
        assert c.numel() == size or c[0] == 0 or c[-1] == width - 1
        assert r.numel() <= size and c.numel() <= size
        full_squares += int(hole.sum()) == size * size
    assert full_squares > 80  # centre at least 4 px from the edges in (24/32)**2 of the draws


def test_repr_and_argument_checks() -> None:
    assert repr(Augmentation()) == "Augmentation(crop_padding=4, flip=True, cutout=0)"
    assert (
        repr(Augmentation(crop_padding=1, flip=False, cutout=5)) == "Augmentation(crop_padding=1, flip=False, cutout=5)"
    )
    for kwargs in ({"cutout": -1}, {"crop_padding": -2}, {"crop_padding": 1.5}, {"flip": 1}, {"cutout": True}):
        with pytest.raises(ValueError, match="Augmentation"):
            Augmentation(**kwargs)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Augmentation()(torch.zeros(4, 40), _gen(0))


def test_no_op_configuration_returns_a_copy() -> None:
    x = torch.randn(3, 1, 4, 4)
    out = Augmentation(crop_padding=0, flip=False, cutout=0)(x, _gen(0))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
