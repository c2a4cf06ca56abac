"""Mixup and CutMix, seeded per sample so a teacher cache can replay them.

Mixup: Zhang et al., *mixup: Beyond Empirical Risk Minimization*, ICLR 2018.
CutMix: Yun et al., *CutMix: Regularization Strategy to Train Strong Classifiers*, ICCV 2019.
DeiT trains with both, and its hard-label distillation gains most there: on a mixed image the
teacher's decision is a crisper target than the area-weighted label.

    mixup:   x = lam * x_i + (1 - lam) * x_j,          y = lam * y_i + (1 - lam) * y_j
    cutmix:  x = x_i with a box of x_j pasted in,      y = lam' * y_i + (1 - lam') * y_j,
             box area (1 - lam) of the image, lam' = 1 - (clipped box area) / (H * W)

lam ~ Beta(1, 1) (uniform; timm's default alpha for CutMix). Unlike timm, which mixes a batch with
its own reverse, the partner j of sample i is drawn from the whole training split by a hash of
(run seed, epoch, i), and every draw comes from the sample's own hash: a mixed image is a pure
function of (run seed, epoch, i), whatever batch it lands in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vitdistill.data.augment import _MASK32, _fmix32, augment_batch, erase_batch, resized_crop_batch, sample_seeds
from vitdistill.data.augment import uniform as _uniform
from vitdistill.data.randaugment import RandAugmentSpec, rand_augment_batch

_D_MIX, _D_PARTNER, _D_LAM, _D_CUT, _D_CX, _D_CY = 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19


@dataclass
class MixPlan:
    """Per-sample mixing decisions for one batch."""

    partner: torch.Tensor  # [B] partner sample index (only meaningful where mixed)
    lam: torch.Tensor  # [B] weight of the sample's own label after mixing (1.0 where not mixed)
    box: torch.Tensor  # [B, 4] cutmix box y0, y1, x0, x1 (empty where not cutmix)
    cutmix: torch.Tensor  # [B] bool
    mixed: torch.Tensor  # [B] bool


def plan_mix(run_seed: int, epoch: int, indices: torch.Tensor, n: int, size: tuple[int, int],
             mix_prob: float, cutmix_share: float) -> MixPlan:
    """Decide, per sample, whether and how it is mixed, and with which partner."""
    h = sample_seeds(run_seed, epoch, indices)
    idx = indices.to(torch.int64)
    mixed = (_uniform(h, _D_MIX) < mix_prob) & (n > 1)
    partner = (idx + 1 + (_fmix32((h ^ _D_PARTNER) & _MASK32) % max(1, n - 1))) % max(1, n)
    lam = _uniform(h, _D_LAM)
    cutmix = mixed & (_uniform(h, _D_CUT) < cutmix_share)
    height, width = size
    cut = (1.0 - lam).sqrt()
    ch, cw = (cut * height).floor().long(), (cut * width).floor().long()
    cy, cx = (_uniform(h, _D_CY) * height).long(), (_uniform(h, _D_CX) * width).long()
    y0, y1 = (cy - ch // 2).clamp(0, height), (cy + ch - ch // 2).clamp(0, height)
    x0, x1 = (cx - cw // 2).clamp(0, width), (cx + cw - cw // 2).clamp(0, width)
    box = torch.stack([y0, y1, x0, x1], dim=1)
    area = ((y1 - y0) * (x1 - x0)).double() / (height * width)
    lam = torch.where(cutmix, 1.0 - area, lam)
    lam = torch.where(mixed, lam, torch.ones_like(lam))
    box = torch.where(cutmix[:, None], box, torch.zeros_like(box))
    return MixPlan(partner, lam.float(), box, cutmix, mixed)


def mix_images(own: torch.Tensor, other: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Apply a plan to uint8 batches ``own`` and ``other`` (the partners, already augmented)."""
    dev = own.device
    lam = plan.lam.to(dev)[:, None, None, None]
    blend = (own.float() * lam + other.float() * (1 - lam)).round_().clamp_(0, 255).to(torch.uint8)
    h, w = own.shape[-2:]
    box = plan.box.to(dev)
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])
    in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [B, 1, H, W]
    pasted = torch.where(inside, other, own)
    cut = plan.cutmix.to(dev)[:, None, None, None]
    mixed = plan.mixed.to(dev)[:, None, None, None]
    return torch.where(mixed, torch.where(cut, pasted, blend), own)


def mix_targets(labels: torch.Tensor, partner_labels: torch.Tensor, plan: MixPlan, num_classes: int) -> torch.Tensor:
    """Soft targets ``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``, shape [B, C]."""
    lam = plan.lam.to(labels.device)[:, None]
    own = torch.nn.functional.one_hot(labels, num_classes).float()
    other = torch.nn.functional.one_hot(partner_labels, num_classes).float()
    return lam * own + (1 - lam) * other


@dataclass
class Augment:
    """The training input pipeline of one run, in timm's order: crop (padded, or random-resized) and
    flip, optional RandAugment, optional random erasing, then optional Mixup / CutMix.

    ``images`` and ``targets`` are pure functions of (seed, epoch, sample index), so the cache
    writer, a resumed run and a second process all see the same batch.
    """

    seed: int
    pad: int
    hflip: bool
    mix_prob: float = 0.0
    cutmix_share: float = 0.5
    crop_scale: float | None = None  # random-resized crop in place of the padded crop when set
    erase_prob: float = 0.0
    randaugment: RandAugmentSpec | None = None

    def _aug(self, all_images: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        batch = all_images[idx.to(all_images.device)]
        seeds = sample_seeds(self.seed, epoch, idx).to(batch.device)
        if self.crop_scale is not None:
            batch = resized_crop_batch(batch, seeds, self.crop_scale, self.hflip)
        else:
            batch = augment_batch(batch, seeds, self.pad, self.hflip)
        if self.randaugment is not None:
            batch = rand_augment_batch(batch, seeds, self.randaugment)
        return erase_batch(batch, seeds, self.erase_prob) if self.erase_prob > 0 else batch

    def plan(self, n: int, size: tuple[int, int], idx: torch.Tensor, epoch: int) -> MixPlan:
        return plan_mix(self.seed, epoch, idx, n, size, self.mix_prob, self.cutmix_share)

    def images(self, all_images: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The augmented (and mixed) uint8 batch: what the teacher cache writer stores outputs for."""
        return self.batch(all_images, None, idx, epoch, 0)[0]

    def batch(self, all_images: torch.Tensor, all_labels: torch.Tensor | None, idx: torch.Tensor, epoch: int,
              num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images and targets: class indices without mixing (the cheap, exact path), soft [B, C] with it."""
        own = self._aug(all_images, idx, epoch)
        labels = all_labels[idx.to(all_labels.device)] if all_labels is not None else None
        if self.mix_prob <= 0:
            return own, labels
        plan = self.plan(len(all_images), tuple(all_images.shape[-2:]), idx, epoch)
        # only mixed samples need their partner's view, and each view is a pure function of the
        # partner's index, so the rest keep their own (mix_images never reads them)
        rows = plan.mixed.nonzero().squeeze(1)
        other = own.clone()
        if len(rows):
            other[rows.to(own.device)] = self._aug(all_images, plan.partner[rows], epoch)
        images = mix_images(own, other, plan)
        if labels is None:
            return images, None
        return images, mix_targets(labels, all_labels[plan.partner.to(all_labels.device)], plan, num_classes)
