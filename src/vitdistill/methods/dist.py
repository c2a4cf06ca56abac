"""``dist``: DIST (Huang, You, Wang, Qian, Xu, *Knowledge Distillation from A Stronger Teacher*,
NeurIPS 2022, arXiv:2205.10536).

DIST matches relations rather than values: the student need only rank the classes as the teacher
does, which a much stronger teacher makes easier to ask of a small student than an exact KL match.
With Y = softmax(Z / tau) row-wise, a [B, C] matrix for student (S) and teacher (T):

    L_inter = tau^2 * (1 - 1/B sum_i rho(Y^S_i,:, Y^T_i,:))     inter-class: each sample's row over classes
    L_intra = tau^2 * (1 - 1/C sum_j rho(Y^S_:,j, Y^T_:,j))     intra-class: each class's column over the batch
    L = CE_ls(Z_cls, y) + beta * L_inter + gamma * L_intra

with rho the Pearson correlation, computed as the authors' code does: the cosine similarity of the
mean-centred vectors with eps = 1e-8 added to the product of norms (a constant vector correlates 0).
Defaults beta = gamma = tau = 1: the paper's ImageNet setting and the defaults of the authors'
released loss.

A student with DeiT's distillation token gets CE on the class head and the DIST terms on the
distillation head; any other student gets all of it on its class head. Only the teacher's logits
are read, so DIST runs from a teacher cache. The intra-class term is a batch statistic: it needs
batches of at least two samples (``batch_least``; a run of micro-batches of one is refused).
"""
from __future__ import annotations

import torch

from vitdistill.methods.base import METHODS, Method, Outputs

EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: [N, M] x [N, M] -> [N]."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_inter, L_intra) of DIST, each with its tau^2 factor."""
    dt = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    y_s = torch.softmax(student_logits.to(dt) / tau, dim=1)
    y_t = torch.softmax(teacher_logits.to(dt) / tau, dim=1)
    inter = tau * tau * (1 - pearson_rows(y_s, y_t).mean())
    intra = tau * tau * (1 - pearson_rows(y_s.t(), y_t.t()).mean())
    return inter, intra


@METHODS.register("dist")
class DIST(Method):
    name = "dist"
    summary = "Pearson correlation of softened predictions, per sample (inter-class) and per class (intra-class)"
    paper = "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher"
    teacher_outputs = ("logits",)
    batch_least = 2  # the intra-class term correlates each class's column over the batch

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        for knob, value in (("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"{knob} must be >= 0, not {value}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, not {tau}")
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        z = student.get("dist_logits", student["logits"])
        inter, intra = dist_terms(z, teacher["logits"].detach(), self.tau)
        loss = ce + self.beta * inter + self.gamma * intra
        return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}
