"""RandAugment: each operation against PIL (or its definition), per-sample purity, timm's settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vitdistill.data import sample_seeds
from vitdistill.data.randaugment import OPS, RandAugmentSpec, apply_op, parse_spec, rand_augment_batch


def _smooth_images(n: int = 4, size: int = 24, lo: int = 30, hi: int = 220) -> torch.Tensor:
    """RGB images of low-frequency patterns in [lo, hi], so resampling and filters act gently."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    imgs = []
    for i in range(n):
        chans = [torch.sin(xx / (3 + i + c) + c) * torch.cos(yy / (4 + c) - i) for c in range(3)]
        imgs.append(torch.stack(chans))
    x = torch.stack(imgs)
    return (lo + (x + 1) / 2 * (hi - lo)).round().to(torch.uint8)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def _back(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _ours(op: str, x: torch.Tensor, level: float, sign: float = 1.0) -> torch.Tensor:
    n = len(x)
    return apply_op(op, x, torch.full((n,), level), torch.full((n,), sign))


PIL_REFERENCES = [
    ("auto_contrast", 0.5, 1.0, lambda im: ImageOps.autocontrast(im)),
    ("equalize", 0.5, 1.0, lambda im: ImageOps.equalize(im)),
    ("invert", 0.5, 1.0, lambda im: ImageOps.invert(im)),
    ("posterize", 0.5, 1.0, lambda im: ImageOps.posterize(im, 2)),  # 4 - floor(4 * 0.5) bits
    ("solarize", 0.5, 1.0, lambda im: ImageOps.solarize(im, 128)),  # above 256 - floor(256 * 0.5)
    ("color", 0.5, -1.0, lambda im: ImageEnhance.Color(im).enhance(0.55)),  # 1 - 0.9 * 0.5
    ("color", 0.9, 1.0, lambda im: ImageEnhance.Color(im).enhance(1.81)),
    ("contrast", 0.5, -1.0, lambda im: ImageEnhance.Contrast(im).enhance(0.55)),
    ("contrast", 0.9, 1.0, lambda im: ImageEnhance.Contrast(im).enhance(1.81)),
    ("brightness", 0.5, 1.0, lambda im: ImageEnhance.Brightness(im).enhance(1.45)),
    ("sharpness", 0.9, 1.0, lambda im: ImageEnhance.Sharpness(im).enhance(1.81)),
    ("sharpness", 0.5, -1.0, lambda im: ImageEnhance.Sharpness(im).enhance(0.55)),
]


@pytest.mark.parametrize("op, level, sign, reference", PIL_REFERENCES, ids=[f"{r[0]}-{r[1]}{'+' if r[2] > 0 else '-'}"
                                                                               for r in PIL_REFERENCES])
def test_pixel_operations_equal_pil(op: str, level: float, sign: float, reference) -> None:  # noqa: ANN001
    x = torch.cat([_smooth_images(), torch.randint(0, 256, (2, 3, 24, 24), generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.uint8)])
    ours = _ours(op, x, level, sign)
    for i in range(len(x)):
        want = _back(reference(_pil(x[i])))
        diff = (ours[i].int() - want.int()).abs()
        assert int(diff.max()) == 0, f"{op} image {i}: {int(diff.max())} grey levels from PIL"


def test_solarize_add_follows_its_definition() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    out = _ours("solarize_add", x, 0.5)  # add floor(110 * 0.5) = 55 below 128
    v = torch.arange(256)
    want = torch.where(v < 128, (v + 55).clamp(max=255), v)
    assert torch.equal(out[0, 0].flatten().long(), want)


def test_translation_by_whole_pixels_is_an_exact_shift() -> None:
    x = _smooth_images(n=2, size=20)
    level = 2 / (0.45 * 20)  # 0.45 * level * 20 = 2 pixels
    right = _ours("translate_x", x, level, 1.0)
    assert torch.equal(right[..., 2:], x[..., :-2]) and (right[..., :2] == 0).all()
    up = _ours("translate_y", x, level, -1.0)
    assert torch.equal(up[..., :-2, :], x[..., 2:, :]) and (up[..., -2:, :] == 0).all()


def test_shear_moves_each_row_in_proportion_to_its_distance_from_the_centre() -> None:
    x = _smooth_images(n=1, size=21)  # centre row 10; shear 0.3 moves rows 0 and 20 by 3 pixels
    out = _ours("shear_x", x, 1.0, 1.0)[0]
    assert torch.equal(out[:, 10], x[0, :, 10])
    assert torch.equal(out[:, 0, 3:], x[0, :, 0, :-3])  # the top row, content moved right
    assert torch.equal(out[:, 20, :-3], x[0, :, 20, 3:])  # the bottom row, moved left


def test_rotation_matches_pil_inside_the_image() -> None:
    x = _smooth_images(n=2, size=32)
    yy, xx = torch.meshgrid(torch.arange(32) - 15.5, torch.arange(32) - 15.5, indexing="ij")
    inner = (yy**2 + xx**2).sqrt() < 13  # away from the corners that turn into fill
    for sign in (1.0, -1.0):
        ours = _ours("rotate", x, 0.5, sign)  # 15 degrees
        for i in range(2):
            # counter-clockwise for a positive sign, like PIL's rotate (which timm calls)
            want = _back(_pil(x[i]).rotate(15 * sign, resample=Image.BILINEAR))
            err = (ours[i].float() - want.float()).abs()[:, inner]
            assert float(err.mean()) < 1.0 and float(err.max()) <= 3


def test_rand_augment_is_per_sample_pure_and_off_when_it_should_be() -> None:
    x = torch.randint(0, 256, (40, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    seeds = sample_seeds(5, 2, torch.arange(40))
    spec = parse_spec("rand-m9-mstd0.5-inc1")
    full = rand_augment_batch(x, seeds, spec)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rand_augment_batch(x[perm], seeds[perm], spec), full[perm])
    assert torch.equal(rand_augment_batch(x[7:11], seeds[7:11], spec), full[7:11])
    changed = sum(not torch.equal(a, b) for a, b in zip(full, x)) / 40
    # two rounds at p = 0.5: a quarter of the images get no operation
    assert 0.55 < changed < 0.9
    always = rand_augment_batch(x, seeds, RandAugmentSpec(n=1, m=9, p=1.0))
    assert sum(not torch.equal(a, b) for a, b in zip(always, x)) / 40 > 0.85
    for off in (RandAugmentSpec(n=0), RandAugmentSpec(p=0.0)):
        assert torch.equal(rand_augment_batch(x, seeds, off), x)
    assert len(OPS) == 15


def test_timms_settings_strings() -> None:
    assert parse_spec("rand-m9-mstd0.5-inc1") == RandAugmentSpec(n=2, m=9.0, mstd=0.5, mmax=10.0, p=0.5)
    assert parse_spec("rand-n3-m5-p1-inc1") == RandAugmentSpec(n=3, m=5.0, p=1.0)
    # timm reads a string without inc as inc0: refused, not silently read as inc1
    for bad, says in (("auto-m9", "starts with 'rand'"), ("rand-x9", "unknown RandAugment part 'x9'"),
                      ("rand-m9-inc0", "inc1"), ("rand-p2-inc1", r"p in \[0, 1\]"),
                      ("rand-m9-mstd0.5", "no inc part")):
        with pytest.raises(ValueError, match=says):
            parse_spec(bad)
