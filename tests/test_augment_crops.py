"""Random-resized crop and random erasing: the boxes the papers define, per-sample pure, on batches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, run_cli_fast, run_cli_here

from vitdistill.data import sample_seeds
from vitdistill.data.augment import erase_batch, resized_crop_batch


def _ramps(n: int, size: int = 32) -> torch.Tensor:
    """Channel 0 is 4x + 2 along the columns, channel 1 is 4y + 2 along the rows: bilinear
    resampling of a linear function is exact, so each output reveals the box it was cut from."""
    ramp = 4 * torch.arange(size) + 2
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[0] = ramp[None, :]
    img[1] = ramp[:, None]
    return img.expand(n, -1, -1, -1).contiguous()


def _fit(line: torch.Tensor) -> tuple[float, float]:
    """Slope and intercept of a least-squares line through the interior points (the edges clamp)."""
    y = line[2:-2].double()
    x = torch.arange(2, len(line) - 2, dtype=torch.float64)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return float(slope), float(y.mean() - slope * x.mean())


def test_full_box_is_the_identity_and_flip_is_a_mirror() -> None:
    x = torch.randint(0, 256, (8, 3, 12, 12), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    seeds = sample_seeds(0, 0, torch.arange(8))
    assert torch.equal(resized_crop_batch(x, seeds, 1.0, hflip=False, ratio=(1.0, 1.0)), x)
    y = resized_crop_batch(x, seeds, 1.0, hflip=True, ratio=(1.0, 1.0))
    mirrored = [torch.equal(y[i], x[i].flip(-1)) for i in range(8)]
    assert all(m or torch.equal(y[i], x[i]) for i, m in enumerate(mirrored)) and any(mirrored)


def test_boxes_follow_the_scale_and_ratio_ranges() -> None:
    n, size, scale = 400, 32, 0.3
    out = resized_crop_batch(_ramps(n, size), sample_seeds(4, 1, torch.arange(n)), scale, hflip=False)
    areas = []
    for i in range(n):
        sx, ix = _fit(out[i, 0, size // 2].float())  # a row: 4 * (x0 + (j + 1/2) w / W - 1/2) + 2
        sy, iy = _fit(out[i, 1, :, size // 2].float())
        w, h = sx / 4 * size, sy / 4 * size
        x0, y0 = (ix - 2) / 4 + 0.5 - sx / 8, (iy - 2) / 4 + 0.5 - sy / 8
        assert -0.3 <= x0 and x0 + w <= size + 0.3 and -0.3 <= y0 and y0 + h <= size + 0.3  # inside the image
        area = w * h / size**2
        assert scale - 0.03 <= area <= 1.03
        if w < size - 0.5 and h < size - 0.5:  # not clipped: the aspect ratio is within (3/4, 4/3)
            assert 0.75 - 0.03 <= w / h <= 4 / 3 + 0.03
        areas.append(area)
    areas = torch.tensor(areas)
    assert areas.min() < scale + 0.05 and areas.max() > 0.9  # the whole range is drawn
    assert abs(float(areas.median()) - (1 + scale) / 2) < 0.1  # area ~ U(scale, 1), before clipping


def test_resized_crop_is_per_sample_and_pure() -> None:
    x = torch.randint(0, 256, (10, 3, 16, 16), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    seeds = sample_seeds(2, 3, torch.arange(10))
    full = resized_crop_batch(x, seeds, 0.2, True)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resized_crop_batch(x[perm], seeds[perm], 0.2, True), full[perm])
    assert torch.equal(resized_crop_batch(x[4:6], seeds[4:6], 0.2, True), full[4:6])
    assert not torch.equal(resized_crop_batch(x, sample_seeds(2, 4, torch.arange(10)), 0.2, True), full)
    with pytest.raises(ValueError, match="scale"):
        resized_crop_batch(x, seeds, 0.0, True)


def test_erasing_paints_one_box_of_noise_in_the_papers_ranges() -> None:
    n, size = 600, 24
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    seeds = sample_seeds(9, 0, torch.arange(n))
    assert torch.equal(erase_batch(x, seeds, 0.0), x)
    out = erase_batch(x, seeds, 1.0)
    ratios = []
    for i in range(n):
        changed = (out[i] != 0).any(0)  # a pixel of noise is zero in all three channels 1 time in 2**24
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert changed.sum() == h * w  # one solid rectangle
        area = h * w / size**2
        assert 0.02 * 0.5 <= area <= 1 / 3 * 1.5  # area share ~ U(0.02, 1/3), up to rounding of the sides
        ratios.append(h / w)
    ratios = torch.tensor(ratios)
    assert ratios.min() < 0.6 and ratios.max() > 1 / 0.6  # aspect ratios spread over (0.3, 1/0.3)
    values = out[out != 0].float()
    assert 110 < float(values.mean()) < 145 and values.max() == 255  # uniform uint8 noise
    share = sum(not torch.equal(o, z) for o, z in zip(erase_batch(x, seeds, 0.25), x)) / n
    assert 0.2 < share < 0.3


def test_erasing_is_per_sample_and_pure() -> None:
    x = torch.randint(0, 256, (12, 3, 10, 10), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    seeds = sample_seeds(1, 1, torch.arange(12))
    full = erase_batch(x, seeds, 0.5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(erase_batch(x[perm], seeds[perm], 0.5), full[perm])
    assert torch.equal(erase_batch(x[5:8], seeds[5:8], 0.5), full[5:8])
    kept = [torch.equal(full[i], x[i]) for i in range(12)]
    assert any(kept) and not all(kept)


def test_cli_trains_with_resized_crops_randaugment_and_erasing(tmp_path: Path) -> None:
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "1", *TINY]
    assert run_cli_here(*args, "--out", str(tmp_path / "pad")) == 0
    heavy = ["--set", "data.crop_scale=0.35", "--set", "data.erase_prob=0.25",
             "--set", "data.randaugment=rand-m9-mstd0.5-inc1"]
    assert run_cli_here(*args, *heavy, "--out", str(tmp_path / "rrc")) == 0
    saved = yaml.safe_load((tmp_path / "rrc" / "config.yaml").read_text())["data"]
    assert saved["crop_scale"] == 0.35 and saved["erase_prob"] == 0.25
    assert saved["randaugment"] == "rand-m9-mstd0.5-inc1"
    loss = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])["train_loss"] for d in ("pad", "rrc")]
    assert loss[0] != loss[1]  # the settings reach the training batches
    for bad, says in (("data.crop_scale=1.5", "data.crop_scale"), ("data.erase_prob=-0.1", "data.erase_prob"),
                      ("data.randaugment=rand-m9-inc0", "inc1")):
        r = run_cli_fast(*args, "--set", bad, "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()
