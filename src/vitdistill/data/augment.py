"""Seeded, per-sample, batched augmentation.

Every random choice for a sample comes from one 32-bit seed that is a pure function of
(run seed, epoch, sample index). A teacher cache therefore needs to store no seed at all: training
re-creates the exact augmented image the teacher saw (TinyViT stores the seed; we only check it).
Nothing here touches a global RNG, and a sample's result never depends on the batch it is in.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Domain constants, so the hash streams for different purposes never coincide.
_GOLDEN = 0x9E3779B9
_DOMAIN_SAMPLE = 0x5EED5EED
_DOMAIN_ORDER = 0x0BADC0DE
_DOMAIN_DX = 0x1B873593
_DOMAIN_DY = 0xCC9E2D51
_DOMAIN_FLIP = 0xE6546B64
_DOMAIN_AREA, _DOMAIN_RATIO, _DOMAIN_CY, _DOMAIN_CX = 0x2545F491, 0x4F1BBCDC, 0x6A09E667, 0xBB67AE85
_DOMAIN_ERASE, _DOMAIN_EAREA, _DOMAIN_ERATIO, _DOMAIN_EY, _DOMAIN_EX, _DOMAIN_NOISE = (
    0x3C6EF373, 0xA54FF53B, 0x9B05688D, 0x1F83D9AC, 0x5BE0CD1A, 0x428A2F98)

IntOrTensor = int | torch.Tensor


def _mul32(h: IntOrTensor, c: int) -> IntOrTensor:
    """``(h * c) mod 2**32`` for ``0 <= h < 2**32`` without ever overflowing int64.

    The constant is split into 16-bit halves so every partial product stays below 2**49.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: IntOrTensor) -> IntOrTensor:
    """MurmurHash3's finaliser: a bijection on uint32 with full avalanche.

    Works on Python ints and on int64 tensors holding uint32 values alike.
    """
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _absorb(h: IntOrTensor, x: IntOrTensor) -> IntOrTensor:
    """Fold a uint32 value into a running uint32 hash."""
    return _fmix32(h ^ _fmix32((x + _GOLDEN) & _MASK32))


def _absorb_int(h: int, x: int) -> int:
    """Fold an arbitrary Python int (negative or wider than 32 bits) into the hash."""
    h = _absorb(h, x & _MASK32)
    return _absorb(h, (x >> 32) & _MASK32)


def uniform(h: torch.Tensor, domain: int) -> torch.Tensor:
    """A float64 draw in [0, 1) per seed in ``h``, one independent stream per ``domain``."""
    return _fmix32((h ^ domain) & _MASK32).double() / 2**32


def sample_seeds(run_seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """Per-sample augmentation seeds: int64 tensor of uint32 values, same shape as ``indices``.

    A pure function of (run_seed, epoch, index). For one (run_seed, epoch) the seeds of distinct
    indices below 2**32 are distinct (the final step is a bijection of the index).
    """
    base = _absorb_int(_absorb_int(_DOMAIN_SAMPLE, int(run_seed)), int(epoch))
    idx = indices.to(torch.int64)
    h = _absorb(torch.full_like(idx, base), idx & _MASK32)
    return _absorb(h, (idx >> 32) & _MASK32)


def augment_batch(images: torch.Tensor, seeds: torch.Tensor, pad: int, hflip: bool) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and (if ``hflip``) horizontal flip with probability 1/2.

    ``images`` is uint8 ``[N, C, H, W]`` on any device, ``seeds`` ``[N]`` from :func:`sample_seeds`.
    The crop offsets are uniform in ``[0, 2*pad]``; a sample's output depends only on its image and
    its seed. Returns a new uint8 tensor of the same shape.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
    if seeds.shape != images.shape[:1]:
        raise ValueError(f"need one seed per image: {tuple(seeds.shape)} seeds for {images.shape[0]} images")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not hflip:
        return images.clone()
    n, c, h, w = images.shape
    s = seeds.to(torch.int64)
    dx = _fmix32(s ^ _DOMAIN_DX) % (2 * pad + 1)
    dy = _fmix32(s ^ _DOMAIN_DY) % (2 * pad + 1)
    flip = (_fmix32(s ^ _DOMAIN_FLIP) & 1).bool() if hflip else torch.zeros_like(s, dtype=torch.bool)
    dev = images.device
    dx, dy, flip = dx.to(dev), dy.to(dev), flip.to(dev)

    padded = images.new_zeros((n, c, h + 2 * pad, w + 2 * pad))
    padded[:, :, pad:pad + h, pad:pad + w] = images
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=dev)[None, :]  # [N, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def epoch_batches(
    n: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True, drop_last: bool = False
) -> list[torch.Tensor]:
    """Split ``range(n)`` into index batches for one epoch.

    The order comes from a private ``torch.Generator`` seeded by a hash of (seed, epoch), so a run
    resumed at epoch e sees exactly the order the uninterrupted run would have seen.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if shuffle:
        g = torch.Generator().manual_seed(_absorb_int(_absorb_int(_DOMAIN_ORDER, int(seed)), int(epoch)))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    batches = list(order.split(batch_size)) if n else []
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _box_sides(s: torch.Tensor, area: tuple[float, float], ratio: tuple[float, float], height: int, width: int,
               d_area: int, d_ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(a r) and sqrt(a / r) for a box of area a ~ U(area) of the image and log r ~ U(log ratio)."""
    a = (area[0] + (area[1] - area[0]) * uniform(s, d_area)) * height * width
    lo, hi = torch.tensor(ratio, dtype=torch.float64).log()
    r = (lo + (hi - lo) * uniform(s, d_ratio)).exp()
    return (a * r).sqrt(), (a / r).sqrt()


def resized_crop_batch(images: torch.Tensor, seeds: torch.Tensor, scale: float, hflip: bool,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized crop (Szegedy et al., *Going Deeper with Convolutions*, CVPR 2015; the
    ``RandomResizedCrop`` of DeiT's and TinyViT's recipes), then a horizontal flip if ``hflip``.

    Per sample: area share a ~ U(scale, 1), log aspect ratio ~ U(log ratio[0], log ratio[1]), box
    w = sqrt(a H W r), h = sqrt(a H W / r) (clipped to the image), its corner uniform where it fits;
    the box is resized back to H x W bilinearly (sample points at the pixel centres, as
    ``F.interpolate(align_corners=False)``). torchvision redraws an oversized box up to ten times;
    clipping it instead keeps the draw one pass over the batch. uint8 in, uint8 out.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
    if seeds.shape != images.shape[:1]:
        raise ValueError(f"need one seed per image: {tuple(seeds.shape)} seeds for {images.shape[0]} images")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"crop scale must lie in (0, 1], got {scale}")
    n, _, height, width = images.shape
    s = seeds.to(torch.int64)
    w, h = _box_sides(s, (scale, 1.0), ratio, height, width, _DOMAIN_AREA, _DOMAIN_RATIO)
    w, h = w.clamp(1.0, width), h.clamp(1.0, height)
    y0 = (height - h) * uniform(s, _DOMAIN_CY)
    x0 = (width - w) * uniform(s, _DOMAIN_CX)
    dev = images.device
    centres_y = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    centres_x = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    ys = y0[:, None] + centres_y[None, :] * h[:, None]  # [N, H] source rows, in pixels from the top edge
    xs = x0[:, None] + centres_x[None, :] * w[:, None]
    if hflip:
        flip = (_fmix32(s ^ _DOMAIN_FLIP) & 1).bool()
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    gy = (2 * ys / height - 1).float().to(dev)  # grid_sample's coordinates, align_corners=False
    gx = (2 * xs / width - 1).float().to(dev)
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], dim=-1)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def erase_batch(images: torch.Tensor, seeds: torch.Tensor, prob: float,
                area: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """Random erasing (Zhong et al., *Random Erasing Data Augmentation*, AAAI 2020), as DeiT uses it
    (probability 0.25, per-pixel random fill).

    With probability ``prob`` a sample gets one box of area share ~ U(area) and log aspect ratio ~
    U(log ratio), clipped to the image and placed uniformly, filled with uniform uint8 noise drawn
    from the sample's seed. The paper (and timm) redraw a box that does not fit; clipping keeps one
    pass. Returns a new uint8 tensor.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"erase probability must lie in [0, 1], got {prob}")
    if prob == 0.0:
        return images.clone()
    n, c, height, width = images.shape
    s = seeds.to(torch.int64)
    on = uniform(s, _DOMAIN_ERASE) < prob
    h, w = _box_sides(s, area, ratio, height, width, _DOMAIN_EAREA, _DOMAIN_ERATIO)
    h, w = h.round().clamp(1, height).long(), w.round().clamp(1, width).long()
    y0 = ((height - h + 1) * uniform(s, _DOMAIN_EY)).long()
    x0 = ((width - w + 1) * uniform(s, _DOMAIN_EX)).long()
    dev = images.device
    rows = torch.arange(height)[None, :]
    cols = torch.arange(width)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < (y0 + h)[:, None])
    in_cols = (cols >= x0[:, None]) & (cols < (x0 + w)[:, None])
    out = images.clone()
    hit = on.nonzero().flatten()
    if not len(hit):
        return out
    inside = in_rows[hit, :, None] & in_cols[hit, None, :]  # [K, H, W], the erased samples only
    k, yy, xx = inside.nonzero(as_tuple=True)
    # Noise is drawn for the box's pixels alone, each a hash of (sample seed, channel, pixel), so it
    # is the same on every device and in every batch; one finaliser per value keeps it cheap.
    flat = torch.arange(c)[None, :] * (height * width) + (yy * width + xx)[:, None]  # [P, C]
    base = _fmix32((s[hit] ^ _DOMAIN_NOISE) & _MASK32)[k]
    noise = _fmix32(base[:, None] ^ ((flat * _GOLDEN) & _MASK32)) & 0xFF
    out[hit[k].to(dev), :, yy.to(dev), xx.to(dev)] = noise.to(torch.uint8).to(dev)
    return out
