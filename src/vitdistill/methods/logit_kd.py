"""``logit-kd``: classic knowledge distillation (Hinton, Vinyals, Dean, 2015, arXiv:1503.02531).

    L = (1 - alpha) * CE(psi(Z_s), y) + alpha * tau^2 * KL(psi(Z_t / tau) || psi(Z_s / tau))

with psi the softmax, CE smoothed by ``train.label_smoothing`` and the KL averaged over the batch. Knobs: ``alpha`` (weight of the KD term,
default 0.5) and ``tau`` (temperature, default 4.0). A student with a distillation token gets the
same loss on both heads.
"""
from __future__ import annotations

import torch

from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, heads, soft_kl


@METHODS.register("logit-kd")
class LogitKD(Method):
    name = "logit-kd"
    summary = "KL between temperature-softened teacher and student logits"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network"
    teacher_outputs = ("logits",)

    def __init__(self, alpha: float = 0.5, tau: float = 4.0, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha, tau)
        self.alpha, self.tau = alpha, tau

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        outs = heads(student)
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        kd = sum(soft_kl(z, teacher["logits"], self.tau) for z in outs) / len(outs)
        loss = (1 - self.alpha) * ce + self.alpha * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}
