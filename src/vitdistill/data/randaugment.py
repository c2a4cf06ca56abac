"""RandAugment on whole uint8 batches, every draw a pure function of the sample's seed.

Cubuk et al., *RandAugment: Practical automated data augmentation with a reduced search space*,
CVPR Workshops 2020. DeiT and TinyViT train with timm's ``rand-m9-mstd0.5-inc1``: per image, N = 2
operations drawn uniformly from 15, each applied with probability p = 0.5 at magnitude
m ~ N(M, mstd) clipped to [0, mmax] (M = 9, mstd = 0.5, mmax = 10). With level l = m / 10 the
"increasing" operations (``inc1``: a larger magnitude is always a stronger change) are

    auto-contrast, equalize, invert                       (no magnitude)
    rotate by +-30 l degrees, shear x / y by +-0.3 l, translate x / y by +-0.45 l of the side
    posterize to 4 - floor(4 l) bits (at least 1), solarize above 256 - floor(256 l), add floor(110 l) below 128
    colour, contrast, brightness, sharpness: blend with their degenerate image by 1 +- 0.9 l

with the sign of each drawn at random. The pixel operations follow PIL's ``ImageOps`` and
``ImageEnhance`` (the tests find them equal to PIL's, pixel for pixel); the geometric ones are one
bilinear ``grid_sample`` about the image centre, filled with zeros like the padded crop. timm runs
PIL per image in worker processes; here each operation runs once on the samples of the batch
that drew it, so a teacher cache replays an augmented image from (run seed, epoch, index).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitdistill.data.augment import _MASK32, _fmix32, uniform

OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
_D_OP, _D_APPLY, _D_MAG1, _D_MAG2, _D_SIGN = 0x7F4A7C15, 0x94D049BB, 0xBF58476D, 0x1CE4E5B9, 0x133111EB


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's settings string ``rand-m9-n2-mstd0.5-mmax10-p0.5-inc1`` as values."""

    n: int = 2
    m: float = 9.0
    mstd: float = 0.0
    mmax: float = 10.0
    p: float = 0.5


def parse_spec(text: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``; unknown parts are errors."""
    parts = str(text).strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment setting starts with 'rand', as timm's do (e.g. rand-m9-mstd0.5-inc1), "
                         f"not {text!r}")
    values: dict[str, float] = {}
    for part in parts[1:]:
        found = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([0-9.]+)", part)
        if not found:
            raise ValueError(f"unknown RandAugment part {part!r} in {text!r}; the parts are m, n, mstd, mmax, p, inc")
        values[found.group(1)] = float(found.group(2))
    # timm reads a string without inc as inc0, so a default of inc1 here would train on other
    # operations than the same string gives under timm
    if "inc" not in values:
        raise ValueError(f"{text!r} has no inc part, which timm reads as inc0 (not implemented here); add -inc1, "
                         "the increasing operations DeiT and TinyViT use")
    if values.pop("inc") != 1.0:
        raise ValueError(f"only the increasing operations (inc1) are implemented, as DeiT and TinyViT use; "
                         f"change inc0 to inc1 in {text!r}")
    spec = RandAugmentSpec(n=int(values.pop("n", 2)), **values)
    if spec.n < 0 or not 0.0 <= spec.p <= 1.0 or spec.mstd < 0 or spec.mmax <= 0:
        raise ValueError(f"RandAugment {text!r}: n must be >= 0, p in [0, 1], mstd >= 0 and mmax > 0")
    return spec


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: ITU-R 601-2 luma, [K, 1, H, W] float; a grey image is its own."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).float()[:, None]  # PIL's fixed point


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: degenerate + factor * (x - degenerate), truncated
    and clipped as PIL does."""
    f = factor.view(-1, 1, 1, 1).float()
    return (degenerate + f * (x.float() - degenerate)).floor_().clamp_(0, 255)


def _sharpen_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, the rest 1, over 13) with the 1-pixel border kept as is."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, dtype=torch.float32, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = F.conv2d(x.float(), kernel / 13.0, groups=c).round()
    out = x.float().clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out


def _auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.autocontrast``: each channel stretched to [0, 255] (a flat channel is kept)."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    flat = hi <= lo
    # tensor over tensor: a Python float over a tensor is computed through a reciprocal, one ulp off
    scale = torch.full_like(hi, 255.0) / torch.where(flat, torch.ones_like(hi), hi - lo)
    out = (x.double() * scale - lo * scale).trunc().clamp(0, 255)  # PIL's float64 expression, bit for bit
    return torch.where(flat, x.double(), out).float()


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.equalize`` per channel: lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels at the top value) // 255; identity where step is 0."""
    k, c, h, w = x.shape
    flat = x.reshape(k * c, h * w).long()
    hist = torch.zeros(k * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(dim=1, keepdim=True))
    step = (h * w - top) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand(k * c, 256))
    return lut.gather(1, flat).view(k, c, h, w).float()


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each image at ``theta @ [x, y, 1]`` (pixel coordinates about the centre), zero fill."""
    k, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=x.device) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float32, device=x.device) - (w - 1) / 2, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, h * w, 3)
    src = pts @ theta.float().transpose(1, 2)  # [K, HW, 2] source x, y for every output pixel
    gx = (src[..., 0] + (w - 1) / 2) * 2 / w - (1 - 1 / w)  # pixel index -> grid_sample's [-1, 1]
    gy = (src[..., 1] + (h - 1) / 2) * 2 / h - (1 - 1 / h)
    grid = torch.stack([gx, gy], dim=-1).view(k, h, w, 2)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometric(op: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    k, _, h, w = x.shape
    theta = torch.zeros(k, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if op == "rotate":  # counter-clockwise on screen for a positive sign, as PIL's rotate
        a = torch.deg2rad(30.0 * level * sign)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
        theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    elif op == "shear_x":
        theta[:, 0, 1] = 0.3 * level * sign
    elif op == "shear_y":
        theta[:, 1, 0] = 0.3 * level * sign
    elif op == "translate_x":  # content moves right by 0.45 l of the width for a positive sign
        theta[:, 0, 2] = -0.45 * level * sign * w
    else:
        theta[:, 1, 2] = -0.45 * level * sign * h
    return _affine(x, theta)


def apply_op(op: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One operation on uint8 images ``x`` [K, C, H, W] with a level in [0, 1] and a sign (+-1) per
    image; returns uint8."""
    f = (1.0 + 0.9 * level * sign).clamp(min=0.1)  # colour, contrast, brightness, sharpness; timm's floor
    if op == "auto_contrast":
        out = _auto_contrast(x)
    elif op == "equalize":
        out = _equalize(x)
    elif op == "invert":
        out = 255.0 - x.float()
    elif op == "posterize":
        bits = (4 - (4 * level).floor()).clamp(1, 8).long()
        mask = (255 - (2 ** (8 - bits) - 1)).view(-1, 1, 1, 1)
        out = (x.long() & mask).float()
    elif op == "solarize":
        threshold = (256 - (256 * level).floor()).view(-1, 1, 1, 1)
        out = torch.where(x.float() >= threshold, 255.0 - x.float(), x.float())
    elif op == "solarize_add":
        add = (110 * level).floor().clamp(max=128).view(-1, 1, 1, 1)
        out = torch.where(x < 128, (x.float() + add).clamp(max=255), x.float())
    elif op == "color":
        out = _blend(_grey(x).expand_as(x), x, f)
    elif op == "contrast":
        mean = (_grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
        out = _blend(mean.expand_as(x), x, f)
    elif op == "brightness":
        out = _blend(torch.zeros_like(x, dtype=torch.float32), x, f)
    elif op == "sharpness":
        out = _blend(_sharpen_degenerate(x), x, f)
    elif op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        out = _geometric(op, x, level, sign)
    else:
        raise ValueError(f"unknown RandAugment operation {op!r}; the operations are {', '.join(OPS)}")
    return out.round().clamp_(0, 255).to(torch.uint8)


def rand_augment_batch(images: torch.Tensor, seeds: torch.Tensor, spec: RandAugmentSpec) -> torch.Tensor:
    """``spec.n`` rounds; in each, every sample draws an operation, whether it applies (``spec.p``),
    a magnitude and a sign from its seed, and each operation runs once on the samples that drew it."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
    out = images.clone()
    s = seeds.to(torch.int64).cpu()
    for r in range(spec.n):
        h = _fmix32((s + r * 0x61C88647) & _MASK32)  # a fresh stream per round
        op = _fmix32((h ^ _D_OP) & _MASK32) % len(OPS)
        on = uniform(h, _D_APPLY) < spec.p
        # Box-Muller from two uniforms: the magnitude's Gaussian noise without a global generator
        u1, u2 = uniform(h, _D_MAG1).clamp(min=1e-12), uniform(h, _D_MAG2)
        noise = (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)
        level = ((spec.m + spec.mstd * noise).clamp(0, spec.mmax) / 10.0).float()
        sign = torch.where(uniform(h, _D_SIGN) < 0.5, -1.0, 1.0)
        for k, name in enumerate(OPS):
            sel = ((op == k) & on).nonzero().flatten()
            if len(sel):
                dev_sel = sel.to(out.device)
                out[dev_sel] = apply_op(name, out[dev_sel], level[sel].to(out.device), sign[sel].to(out.device))
    return out
