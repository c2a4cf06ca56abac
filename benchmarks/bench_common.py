"""Helpers shared by the benchmark scripts (timing, rounding, the optimizer and schedule of the loop)."""
from __future__ import annotations

import sys
import time

import torch

from vitdistill.engine.trainer import param_groups, warmup_cosine


def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rnd(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def optimizer_and_schedule(cfg, modules: list[torch.nn.Module], total_steps: int):
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(modules, t.weight_decay), lr=t.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, max(1, total_steps // 10), t.lr,
                                                                 t.min_lr))
    return opt, sched



def timed(step, steps: int, warmup: int, batch: int, device: torch.device, repeats: int) -> float:
    """Images/s of ``step`` (one batch of ``batch``): the median of ``repeats`` timings of ``steps``
    calls, after ``warmup`` calls (at least one)."""
    for _ in range(max(1, warmup)):
        step()
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return median(rates)
