"""The few runtime verbs the loop needs: device, threads, seeds, autocast."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from vitdistill.errors import UserError


def pick_device(name: str) -> torch.device:
    """The run's device; under torchrun ``auto`` / ``cuda`` mean this process's ``cuda:LOCAL_RANK``."""
    from vitdistill.engine.distributed import pick_device_name

    name = pick_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # torch knows more (mps, meta, xpu...), but these are what is tested
        raise UserError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but no CUDA GPU is visible; use --device cpu (--set train.device=cpu in a config)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' asked for but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                        "use cuda:0 or another visible index")
    return dev


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed for one epoch (dropout, drop-path): a pure function, so resume replays it."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where it pays: on CUDA by default; on CPU only when asked (it is slower on most CPUs)."""
    if amp not in ("auto", "bf16", "off"):
        raise UserError(f"train.amp must be auto, bf16 or off, not '{amp}'")
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class RunningFigures:
    """The progress bar's running loss and accuracy, read without a host-device sync.

    On CUDA, ``.item()`` would make the host wait for the whole queue of kernels every time the bar
    is refreshed. Instead the sums are copied to pinned host memory without blocking, and a copy is
    shown once its event reports it landed (a refresh or two later); on CPU they are read at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: tuple | None = None
        self.shown: tuple[float, float] | None = None

    def update(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float] | None:
        """Offer the current sums; returns the latest (mean loss, accuracy) known on the host."""
        if not self.cuda:
            self.shown = (loss_sum.item() / seen, correct.item() / seen)
            return self.shown
        if self.pending is not None and self.pending[0].query():
            _, host, n = self.pending
            self.shown = (host[0].item() / n, host[1].item() / n)
            self.pending = None
        if self.pending is None:
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(torch.stack([loss_sum.float(), correct.float()]), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (event, host, seen)
        return self.shown
