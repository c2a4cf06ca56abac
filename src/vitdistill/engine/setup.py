"""Building a run's parts from its config: data, augmentation, and the teacher source.

The teacher source is where the two teacher kinds meet: a live frozen teacher, or a TinyViT-style
cache replayed without running the teacher. The loop and the methods see the same call either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitdistill.config import Config
from vitdistill.data import DataSplit, Dataset, load_data
from vitdistill.engine.evaluate import predict
from vitdistill.engine.runtime import pick_device, seed_everything, set_threads
from vitdistill.data.mix import Augment
from vitdistill.engine.trainer import LiveTeacher, TeacherSource
from vitdistill.errors import UserError
from vitdistill.methods.base import Method
from vitdistill.models import Teacher, create_model
from vitdistill import teacher_cache as tc


def _subset(split: DataSplit, limit: int | None) -> DataSplit:
    if not limit or limit >= len(split):
        return split
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(split), generator=g)[:limit].sort().values
    return DataSplit(split.images[keep], split.labels[keep])


def load_run_data(cfg: Config) -> Dataset:
    d = cfg.data
    data = load_data(d.source, cache_dir=d.cache_dir, img_size=d.img_size, val_fraction=d.val_fraction)
    data.train = _subset(data.train, d.train_limit)
    data.test = _subset(data.test, d.test_limit)
    return data


def augment_for(cfg: Config, data: Dataset) -> Augment:
    pad = data.pad if cfg.data.pad is None else cfg.data.pad
    hflip = data.hflip if cfg.data.hflip is None else cfg.data.hflip
    if not 0.0 <= cfg.data.mix_prob <= 1.0 or not 0.0 <= cfg.data.cutmix_share <= 1.0:
        raise UserError("data.mix_prob and data.cutmix_share must lie in [0, 1]")
    return Augment(cfg.train.seed, pad, hflip, cfg.data.mix_prob, cfg.data.cutmix_share)


def build_teacher(cfg: Config, data: Dataset, why: str) -> tuple[Teacher, dict]:
    m = cfg.model
    if not m.teacher:
        raise UserError(f"{why} needs a teacher; pass --teacher NAME --teacher-weights FILE")
    img_size = None if m.pretrained else data.img_size
    model, spec = create_model(m.teacher, data.num_classes, img_size, m.teacher_kwargs, m.pretrained, m.teacher_weights)
    return Teacher(model), spec


def cache_header(cfg: Config, data: Dataset, teacher_name: str, teacher_hash: str) -> dict:
    aug = augment_for(cfg, data)
    return tc.make_header(
        teacher=teacher_name, teacher_hash=teacher_hash, data_fingerprint=data.fingerprint,
        train_limit=cfg.data.train_limit, num_samples=len(data.train), num_classes=data.num_classes,
        pad=aug.pad, hflip=aug.hflip, mix_prob=aug.mix_prob, cutmix_share=aug.cutmix_share,
        seed=cfg.train.seed, epochs=cfg.train.epochs,
        topk=min(cfg.cache.topk, data.num_classes), value_dtype=cfg.cache.value_dtype)


@dataclass
class TeacherSide:
    source: TeacherSource
    test_logits: torch.Tensor | None
    model: Teacher | None  # None when a cache stands in and no teacher was named
    spec: dict | None


def teacher_side(cfg: Config, data: Dataset, method: Method, device: torch.device) -> TeacherSide:
    """The live teacher, or the cache in ``cache.dir``; plus the teacher's logits on the test split."""
    teacher, spec = (None, None)
    if cfg.model.teacher or not cfg.cache.dir:
        teacher, spec = build_teacher(cfg, data, f"method '{method.name}'")
        teacher.to(device)
    if not cfg.cache.dir:
        assert teacher is not None
        logits = predict(lambda x: teacher(x)["logits"], data.test, cfg.train.eval_batch_size, device)
        return TeacherSide(LiveTeacher(teacher), logits, teacher, spec)
    missing = set(method.teacher_outputs) - set(tc.CachedTeacher.provides)
    if missing:
        raise UserError(f"method '{method.name}' needs teacher outputs {sorted(missing)} that a teacher cache does "
                        "not hold; drop --teacher-cache to run the teacher live")
    cache_dir = Path(cfg.cache.dir)
    found = tc.read_header(cache_dir)
    name = cfg.model.teacher or found["teacher"]
    thash = tc.state_hash(teacher.model) if teacher is not None else found["teacher_hash"]
    source = tc.CachedTeacher(cache_dir, cache_header(cfg, data, name, thash), device)
    test_logits = source.test_logits()
    if test_logits is not None and len(test_logits) != len(data.test):
        test_logits = None  # made for another test subset: no teacher figures rather than wrong ones
    return TeacherSide(source, test_logits, teacher, spec)


def cache_teacher(cfg: Config, cache_dir: str) -> dict:
    """``vitdistill cache-teacher``: run the teacher once over every planned epoch and store it."""
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    data = load_run_data(cfg)
    teacher, _ = build_teacher(cfg, data, "cache-teacher")
    teacher.to(device)
    header = cache_header(cfg, data, cfg.model.teacher, tc.state_hash(teacher.model))
    return tc.write_cache(Path(cache_dir), header, teacher, DataSplit(data.train.images.to(device),
                          data.train.labels), augment_for(cfg, data), cfg.train.eval_batch_size, device,
                          progress=cfg.train.progress, test=data.test)
