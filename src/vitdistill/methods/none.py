"""``none``: plain supervised training, the no-KD baseline every method is measured against.

    L = CE(psi(Z_s), y)      (CE smoothed by train.label_smoothing)

averaged over the student's heads when it carries a distillation token, so both heads learn
the labels and the averaged prediction at evaluation stays meaningful.
"""
from __future__ import annotations

import torch

from vitdistill.methods.base import METHODS, Method, Outputs, heads


@METHODS.register("none")
class NoKD(Method):
    name = "none"
    summary = "Supervised training on labels only (the no-KD baseline; also trains teachers)"
    paper = "-"

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        outs = heads(student)
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        return {"loss": ce, "ce": ce.detach()}
