"""The training loop. It fits on a screen and never names a method or a teacher kind.

Per step: augment a batch of uint8 images from per-sample seeds, ask the teacher source for what
the method declared it needs, run the student, let the method compute its loss, step.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from vitdistill.config import TrainConfig
from vitdistill.data import DataSplit, epoch_batches
from vitdistill.data.mix import Augment
from vitdistill.engine import distributed as dist
from vitdistill.engine.runtime import RunningFigures, autocast, epoch_seed
from vitdistill.errors import UserError
from vitdistill.methods.base import Method, Outputs
from vitdistill.models.taps import FeatureTaps


class TeacherSource(Protocol):
    """Gives the method the teacher's outputs for a batch: a live teacher now, a cache later."""

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> Outputs: ...


class LiveTeacher:
    """Runs the frozen teacher on the same augmented images the student sees.

    With a CUDA ``stream`` (``train.teacher_stream``) the teacher's kernels are queued on that side
    stream, so that on a GPU they can run beside the student's forward instead of before it; the
    train step calls :meth:`consume` between the student's forward and the method's loss, which
    makes the training stream wait for the teacher there and not earlier.
    """

    def __init__(self, teacher: torch.nn.Module, stream: "torch.cuda.Stream | None" = None) -> None:
        self.teacher = teacher
        self.stream = stream

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> Outputs:
        if self.stream is None:
            return self.teacher(images)
        self.stream.wait_stream(torch.cuda.current_stream(images.device))  # the augmented batch is ready
        with torch.cuda.stream(self.stream):
            out = self.teacher(images)
        images.record_stream(self.stream)  # the allocator must not reuse the batch before the teacher is done
        return out

    def consume(self, outputs: Outputs) -> None:
        """Make the current stream wait for the teacher's outputs (no-op without a side stream)."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for value in outputs.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(current)


def warmup_cosine(total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> Callable[[int], float]:
    """Multiplier of the base lr at each step: linear warmup, then cosine down to ``min_lr``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))) / lr

    return factor


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings (1-d or timm's no_weight_decay)."""
    decay, no_decay = [], []
    for module in modules:
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _forward(step_module: torch.nn.Module, teacher: TeacherSource | None, augment: Augment, split: DataSplit,
             idx: torch.Tensor, epoch: int, num_classes: int, device: torch.device,
             amp: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The loss parts, the student's detached logits and the hard labels of the samples ``idx``."""
    images, target = augment.batch(split.images, split.labels, idx, epoch, num_classes)
    hard = target.argmax(dim=1) if target.ndim == 2 else target
    with autocast(device, amp):
        t_out = teacher(images, idx, epoch) if teacher is not None else None
        parts = step_module(images, t_out, target)
    return parts, parts.pop("_logits"), hard


def check_accum(cfg: TrainConfig, world: int = 1) -> None:
    """A one-line error when the micro-batches of ``train.accum_steps`` would hold no image."""
    local = cfg.batch_size // max(1, world)
    if cfg.accum_steps > local:
        raise UserError(f"train.accum_steps {cfg.accum_steps} splits a batch of {local} images per process into "
                        f"micro-batches of less than one image; use at most {local}")


def check_micro_batch(method: Method, cfg: TrainConfig, n_train: int, world: int = 1) -> None:
    """A one-line error when the smallest micro-batch a step trains on holds fewer samples than the
    method's loss needs (``Method.batch_least``). A step is a whole batch, or the whole split when
    that is smaller (a ragged last batch is dropped), cut over the processes and then into
    ``train.accum_steps`` micro-batches."""
    if method.batch_least <= 1:
        return
    step = min(cfg.batch_size, n_train)
    local = step // max(1, world)
    smallest = max(1, local // cfg.accum_steps)  # empty micro-batches of a short step are skipped
    if smallest < method.batch_least:
        raise UserError(f"method '{method.name}' relates the samples of a batch, so each micro-batch needs at least "
                        f"{method.batch_least}; this run's hold {smallest} ({step} images a step, {world} process(es), "
                        f"{cfg.accum_steps} micro-batches); raise train.batch_size or lower train.accum_steps")


def train_epoch(
    *,
    student: torch.nn.Module,
    prep: torch.nn.Module,
    method: Method,
    teacher: TeacherSource | None,
    split: DataSplit,
    augment: Augment,
    taps: FeatureTaps | None = None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    num_classes: int,
    desc: str = "",
    step_module: torch.nn.Module | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> dict:
    """One epoch; returns the mean of every loss part, train accuracy, the lr of its last step and
    images per second.

    ``step_module`` is the student and method as one :class:`~vitdistill.engine.distributed.TrainStep`,
    wrapped in ``DistributedDataParallel`` under several processes; built here when not given. Under
    several processes each rank trains on its slice of every global batch and the metrics are summed
    over the ranks, so every rank returns the same figures a single process would. ``ema``, when
    given, averages the student's weights after every step (engine/ema.py).
    """
    rank, world = dist.rank(), dist.world_size()
    # dropout and drop-path draw from the global generator: a pure function of (seed, epoch), per rank
    torch.manual_seed((epoch_seed(cfg.seed, epoch) + rank * 1_000_000_007) % 2**63)
    step_module = step_module if step_module is not None else dist.TrainStep(student, prep, method, taps, teacher)
    student.train()
    method.train()
    method.on_epoch_start(epoch)
    batches = epoch_batches(len(split), cfg.batch_size, epoch, cfg.seed, shuffle=True, drop_last=len(split) > cfg.batch_size)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    running = RunningFigures(device)  # the bar's loss and accuracy, without a host-device sync on CUDA
    bar = tqdm(batches, desc=desc, leave=False, disable=not (cfg.progress and rank == 0), dynamic_ncols=True)
    # a rank's slice, split in train.accum_steps micro-batches: each view is a pure function of its
    # sample's index, so the split changes the memory held, not the images or targets
    no_sync = getattr(step_module, "no_sync", None)
    for step, batch in enumerate(bar):
        idx = dist.local_slice(batch, rank, world)  # the sampler: this rank's contiguous slice
        micro = [m for m in idx.tensor_split(cfg.accum_steps) if len(m)]
        optimizer.zero_grad(set_to_none=True)
        for i, part in enumerate(micro):
            # DDP reduces the gradients once per step, on the last micro-batch's backward
            with (no_sync() if no_sync is not None and i < len(micro) - 1 else contextlib.nullcontext()):
                parts, logits, hard = _forward(step_module, teacher, augment, split, part, epoch, num_classes,
                                               device, cfg.amp)
                # DDP averages the ranks' gradients: each micro-batch's mean loss is weighted by its share
                # of the global batch, so the sum is the gradient of the global batch mean whatever the
                # ranks' slices and the micro-batches (only a split smaller than the batch is uneven)
                scale = len(part) * world / len(batch)
                (parts["loss"] if scale == 1 else parts["loss"] * scale).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0) + value.detach().float() * len(part)
            correct += (logits.argmax(dim=1) == hard).sum()
            seen += len(part)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad, foreach=True)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        scheduler.step()
        if ema is not None:
            ema.update_parameters(student)
        if cfg.progress and rank == 0 and (step % 10 == 0 or step == len(batches) - 1):
            shown = running.update(sums["loss"], correct, seen)
            figures = {"loss": f"{shown[0]:.3f}", "acc": f"{shown[1]:.3f}"} if shown else {}
            bar.set_postfix(**figures, img_s=f"{seen * world / (time.perf_counter() - start):.0f}")
    bar.close()
    elapsed = dist.all_reduce_max(time.perf_counter() - start)
    total = dist.all_reduce_sums({**{f"part/{k}": v for k, v in sums.items()}, "correct": correct, "seen": seen})
    seen_all = total["seen"]
    out = {("train_loss" if k == "loss" else f"loss_{k}"): total[f"part/{k}"] / seen_all for k in sums}
    out.update(train_top1=total["correct"] / seen_all, lr=lr,
               img_s=seen_all / elapsed, epoch_s=elapsed)
    return out
