"""timm's own KD path for benchmarks/throughput.py: ``timm.task.TokenDistillationTask`` fed by a
``DataLoader`` over a torchvision ``ImageFolder`` (or synthetic PIL images) with timm's train transforms.

Kept apart from throughput.py so the reference path reads on its own (docs/benchmarks.md, "timm's
path, exactly").
"""
from __future__ import annotations

import hashlib
import math
import os
import tarfile
import time
from pathlib import Path

import torch

from bench_common import log, median, optimizer_and_schedule, sync
from vitdistill.data import Dataset
from vitdistill.data.cache import default_cache_dir
from vitdistill.engine.runtime import autocast


def extracted_train_folder(spec: str, extract_dir: str | None) -> Path:
    """Extract the source's training archive once (outside timing) and return its ImageFolder root."""
    kind, _, arg = spec.partition(":")
    path = Path(arg.strip()).expanduser().resolve()
    if kind in ("cifar10", "cifar100"):
        archive = path / "train.tar.gz"
        if not archive.is_file():
            raise FileNotFoundError(f"{archive} not found (timm's path needs the JPEG copy's train.tar.gz)")
    elif kind == "imagefolder" and path.is_dir():
        return path / "train" if (path / "train").is_dir() else path
    elif kind == "imagefolder":
        archive = path
    else:
        raise ValueError(f"timm's ImageFolder path needs cifar10:, cifar100: or imagefolder: data, not '{spec}'")
    st = archive.stat()
    key = hashlib.sha256(f"{archive}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(extract_dir).expanduser() if extract_dir else default_cache_dir() / "bench"
    dest = root / f"{kind}-{archive.name.split('.')[0]}-{key}"
    if not (dest / ".complete").is_file():
        log(f"extracting {archive} to {dest} (once, outside timing)")
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(tmp)  # noqa: S202 - the project's own data archive
        (tmp / ".complete").write_text(str(archive) + "\n")
        if dest.exists():  # another run finished first
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    dirs = [p for p in dest.iterdir() if p.is_dir()]
    return dest / "train" if (dest / "train").is_dir() else (dirs[0] if len(dirs) == 1 else dest)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled sample order like ``shuffle=True``, with an epoch length the benchmark sets per epoch
    (a warm-up epoch, then the measured one), so every epoch ends naturally and nothing prefetched
    for one epoch is worked off inside the next."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch, self.length = n, seed, 0, n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(self.length / self.n))])
        return iter(order[:self.length].tolist())

    def __len__(self) -> int:
        return self.length


class SyntheticPIL(torch.utils.data.Dataset):
    """The synthetic uint8 images as PIL images, so timm's transforms run on them as on decoded JPEGs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, 3]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def timm_transform(student: torch.nn.Module, native: int, img_size: int, native_pad: int, prefetcher: bool):
    """timm's train transform (``create_transform(is_training=True)``) kept to our augmentation: a
    random crop with zero padding at the images' native size and a horizontal flip.

    ``create_transform`` has no padded crop, so torchvision's ``RandomCrop(native, padding)`` goes first;
    timm's RandomResizedCrop is pinned to the whole image (scale and ratio 1, bilinear), which only
    resizes to ``img_size``; no colour jitter, AutoAugment or random erasing. With ``prefetcher`` the
    transform stops at a uint8 tensor and timm's PrefetchLoader normalizes on the device, timm's
    default on GPUs.
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    dc = resolve_data_config({}, model=student)
    tf = create_transform(input_size=img_size, is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5,
                          color_jitter=None, auto_augment=None, re_prob=0.0, interpolation="bilinear",
                          mean=dc["mean"], std=dc["std"], use_prefetcher=prefetcher)
    head = [T.RandomCrop(native, padding=native_pad)] if native_pad else []
    return T.Compose(head + list(tf.transforms)), dc


def timm_img_s(s, data: Dataset, teacher_model: torch.nn.Module, dataset_kind: str, native: int,
               native_pad: int, warmup: int, folder: Path | None) -> tuple[float, dict]:
    """Images/s of ``TokenDistillationTask`` fed by a DataLoader with timm's transforms, stepped like ours."""
    from timm.data.loader import PrefetchLoader, fast_collate
    from timm.task import TokenDistillationTask
    from timm.task.distillation import DistillationTeacher

    args, cfg, device = s.args, s.cfg, s.device
    batch = cfg.train.batch_size
    prefetcher = args.timm_prefetcher == "on" or (args.timm_prefetcher == "auto" and device.type == "cuda")
    student = s.student(data).to(device)
    tf, dc = timm_transform(student, native, data.img_size, native_pad, prefetcher)
    if dataset_kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(folder), transform=tf)
    else:
        dataset = SyntheticPIL(data.train.images, data.train.labels, tf)
    workers = args.workers if args.workers is not None else args.threads
    sampler = EpochSampler(len(dataset))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=device.type == "cuda", drop_last=True, collate_fn=fast_collate if prefetcher else None)
    feed = PrefetchLoader(loader, mean=dc["mean"], std=dc["std"], device=device) if prefetcher else loader

    alpha = float(s.method_opts.get("alpha", 0.5 if args.method == "deit-hard" else 0.1))
    task = TokenDistillationTask(
        student_model=student, teacher_model=DistillationTeacher(teacher_model, device=device),
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        distill_type="hard" if args.method == "deit-hard" else "soft", task_loss_weight=1 - alpha,
        temperature=float(s.method_opts.get("tau", 3.0)), device=device, verbose=False).to(device)
    task.train()
    steps = s.steps
    opt, sched = optimizer_and_schedule(cfg, [student], steps * args.repeats + warmup)
    params = [p for grp in opt.param_groups for p in grp["params"]]

    def epoch(n_steps: int) -> None:
        sampler.length = n_steps * batch
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        for x, y in feed:
            if not prefetcher:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, cfg.train.amp):
                out = task(x, y)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.train.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad, foreach=True)
            opt.step()
            sched.step()
            for key in ("loss", "task_loss", "distill_loss"):  # the bookkeeping our loop does
                sums[key] = sums.get(key, 0) + out[key].detach().float() * len(y)
            correct += (out["output"].argmax(dim=1) == y).sum()

    if warmup:
        epoch(warmup)  # also starts the persistent workers
    rates = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        epoch(steps)  # timed from the epoch's first batch request, as a real epoch's wall time
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    rate = median(rates)
    info = {"timm_workers": workers, "timm_prefetcher": prefetcher, "timm_dataset": dataset_kind,
            "timm_transform": " | ".join(type(t).__name__ for t in tf.transforms)}
    del feed, loader  # stops the workers
    return rate, info

