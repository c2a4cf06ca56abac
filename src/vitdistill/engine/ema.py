"""Model EMA: an exponential moving average of the student's weights, the one evaluated and saved.

Polyak and Juditsky, *Acceleration of Stochastic Approximation by Averaging*, SIAM J. Control
Optim. 1992; DeiT (Touvron et al., ICML 2021) and timm's training script keep one (``--model-ema``).
After optimizer step t the averaged weights are

    W_ema(1) = W(1),        W_ema(t) = d_t * W_ema(t-1) + (1 - d_t) * W(t),
    d_t = min(ema_decay, 1 - t ** (-2/3))      (with train.ema_warmup; d_t = ema_decay without)

The warm-up is timm's (``ModelEmaV3(use_warmup=True)``, gamma 1, power 2/3, the same d_t at the
same step): a short CPU run of a few thousand steps would otherwise average mostly the untrained
start at DeiT's decay. The
average runs through torch's ``AveragedModel``, whose ``parameters()`` lists a weight shared
between blocks (MiniViT) once, so it is averaged once per step, and whose ``n_averaged`` buffer
carries t through a checkpoint. Buffers (BatchNorm statistics) are averaged the same way.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from vitdistill.config import TrainConfig
from vitdistill.errors import UserError


def check_ema(cfg: TrainConfig) -> None:
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise UserError(f"train.ema_decay {cfg.ema_decay} is outside (0, 1); DeiT's is 0.99996, or leave it "
                        "null for no EMA")


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """d_t of the module docstring for the t-th update (t = 1 is the first, which copies)."""
    if step <= 1:
        return 0.0
    return min(decay, 1.0 - step ** (-2.0 / 3.0)) if warmup else decay


def make_ema(student: torch.nn.Module, cfg: TrainConfig) -> AveragedModel | None:
    """The averaged copy of ``student``, or ``None`` when ``train.ema_decay`` is unset."""
    if cfg.ema_decay is None:
        return None
    decay, warmup = cfg.ema_decay, cfg.ema_warmup

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = ema_decay_at(int(n_averaged) + 1, decay, warmup)
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's batch count) follow the model
            for a, c in zip(averaged, current):
                a.copy_(c)

    # n_averaged stays on the CPU (no device given), so reading t costs no host-device sync
    ema = AveragedModel(student, multi_avg_fn=update, use_buffers=True)
    ema.module.eval()
    return ema
