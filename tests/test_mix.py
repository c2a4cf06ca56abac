"""Mixup / CutMix: per-sample pure functions, correct boxes and label weights."""
from __future__ import annotations

import torch

from vitdistill.data.mix import Augment, mix_images, mix_targets, plan_mix


def _images(n: int = 12, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0)).to(torch.uint8)


def test_no_mixing_is_plain_augmentation() -> None:
    imgs, labels = _images(), torch.arange(12) % 4
    aug = Augment(seed=1, pad=0, hflip=False)
    idx = torch.tensor([3, 1, 7])
    assert torch.equal(aug.images(imgs, idx, 0), imgs[idx])
    assert torch.equal(aug.batch(imgs, labels, idx, 0, 4)[1], labels[idx])  # class indices, not soft


def test_mixed_sample_is_pure_function_of_seed_epoch_index() -> None:
    imgs, labels = _images(), torch.arange(12) % 4
    aug = Augment(seed=3, pad=1, hflip=True, mix_prob=1.0, cutmix_share=0.5)
    a = aug.images(imgs, torch.tensor([0, 5, 9]), 2)
    b = aug.images(imgs, torch.tensor([9, 4, 0, 5]), 2)  # another batch holding the same samples
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[3]) and torch.equal(a[2], b[0])
    assert not torch.equal(aug.images(imgs, torch.tensor([0]), 3), a[:1])  # another epoch, another mix
    images, t = aug.batch(imgs, labels, torch.tensor([0, 5, 9]), 2, 4)
    assert torch.equal(images, a)
    assert t.shape == (3, 4) and torch.allclose(t.sum(1), torch.ones(3))


def test_only_mixed_samples_augment_a_partner_and_the_batch_is_unchanged() -> None:
    imgs, labels = _images(40), torch.arange(40) % 4
    aug = Augment(seed=5, pad=2, hflip=True, mix_prob=0.5, cutmix_share=0.5, erase_prob=0.5)
    idx = torch.arange(40).flip(0)
    plan = aug.plan(len(imgs), (8, 8), idx, 1)
    assert 0 < int(plan.mixed.sum()) < 40
    every_partner = mix_images(aug._aug(imgs, idx, 1), aug._aug(imgs, plan.partner, 1), plan)  # the plain way
    images, targets = aug.batch(imgs, labels, idx, 1, 4)
    assert torch.equal(images, every_partner)
    assert torch.equal(targets, mix_targets(labels[idx], labels[plan.partner], plan, 4))


def test_plan_boxes_and_weights() -> None:
    n, size = 50, (8, 8)
    idx = torch.arange(n)
    plan = plan_mix(0, 0, idx, n, size, mix_prob=1.0, cutmix_share=0.5)
    assert plan.mixed.all() and (plan.partner != idx).all() and ((plan.partner >= 0) & (plan.partner < n)).all()
    assert 0 < plan.cutmix.sum() < n  # both kinds occur
    y0, y1, x0, x1 = plan.box.unbind(1)
    area = ((y1 - y0) * (x1 - x0)).float() / 64
    assert torch.allclose(plan.lam[plan.cutmix], 1 - area[plan.cutmix])  # label weight = kept area
    assert ((plan.lam >= 0) & (plan.lam <= 1)).all()
    none = plan_mix(0, 0, idx, n, size, mix_prob=0.0, cutmix_share=0.5)
    assert not none.mixed.any() and torch.equal(none.lam, torch.ones(n))


def test_mix_images_by_hand() -> None:
    own = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    other = torch.full((2, 1, 4, 4), 200, dtype=torch.uint8)
    plan = plan_mix(0, 0, torch.arange(2), 2, (4, 4), 1.0, 0.0)  # all mixup
    out = mix_images(own, other, plan)
    want = (100 * plan.lam + 200 * (1 - plan.lam)).round()
    assert torch.equal(out[:, 0, 0, 0].float(), want)
    plan = plan_mix(0, 0, torch.arange(2), 2, (4, 4), 1.0, 1.0)  # all cutmix
    out = mix_images(own, other, plan)
    pasted = (out == 200).float().mean(dim=(1, 2, 3))
    assert torch.allclose(pasted, 1 - plan.lam)  # the pasted share of pixels is 1 - lam
    t = mix_targets(torch.tensor([0, 1]), torch.tensor([2, 2]), plan, 3)
    assert torch.allclose(t[:, 2], 1 - plan.lam) and torch.allclose(t[0, 0], plan.lam[0])
