"""DeiT's distillation through a distillation token (Touvron et al., ICML 2021, arXiv:2012.12877).

The student carries a class token and a distillation token, each with its own head. The class head
learns from the label, the distillation head from the teacher; at evaluation the two heads are
averaged (timm's VisionTransformerDistilled does that in eval mode).

Soft distillation, DeiT eq. (2):

    L = (1 - lambda) * CE(psi(Z_s), y) + lambda * tau^2 * KL(psi(Z_t / tau) || psi(Z_d / tau))

with the KL normalised per element (sum / (batch * classes)) as DeiT's reference loss does.
The paper's defaults for soft distillation are tau = 3.0 and lambda = 0.1.

Hard-label distillation, DeiT eq. (3), with y_t = argmax_c Z_t(c):

    L = (1 - lambda) * CE(psi(Z_s), y) + lambda * CE(psi(Z_d), y_t),   lambda = 1/2 in the paper.

Label smoothing applies to the true label only, as in DeiT's training code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, soft_kl


@METHODS.register("deit-soft")
class DeiTSoft(Method):
    name = "deit-soft"
    summary = "DeiT distillation token trained on the teacher's softened distribution"
    paper = "Touvron et al. 2021, Training data-efficient image transformers & distillation through attention"
    teacher_outputs = ("logits",)
    needs_dist_token = True

    def __init__(self, alpha: float = 0.1, tau: float = 3.0, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha, tau)
        self.alpha, self.tau = alpha, tau

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        kd = soft_kl(student["dist_logits"], teacher["logits"], self.tau, normalize="elements")
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce.detach(), "kd": kd.detach()}


@METHODS.register("deit-hard")
class DeiTHard(Method):
    name = "deit-hard"
    summary = "DeiT distillation token trained on the teacher's hard decision"
    paper = DeiTSoft.paper
    teacher_outputs = ("logits",)
    needs_dist_token = True

    def __init__(self, alpha: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha)
        self.alpha = alpha

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        kd = F.cross_entropy(student["dist_logits"], teacher["logits"].argmax(dim=-1))
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce.detach(), "kd": kd.detach()}
