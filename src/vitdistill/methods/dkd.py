"""``dkd``: Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, *Decoupled Knowledge
Distillation*, CVPR 2022, arXiv:2203.08679).

The classic KD loss splits into a target-class part and a non-target part:
KD = TCKD + (1 - p_t^T) NCKD. DKD drops the coupling factor and weighs the parts freely:

    L = CE_ls(Z_cls, y) + w(e) * (alpha * TCKD + beta * NCKD)

    TCKD = tau^2 * KL(b^T || b^S),        b = [p_t, 1 - p_t],  p = softmax(Z / tau),  t the target class
    NCKD = tau^2 * KL(p^T_\\t || p^S_\\t),  p_\\t = softmax over the C - 1 non-target logits of Z / tau

both summed over classes and averaged over the batch, and w(e) = min(1, (e + 1) / warmup_epochs) the
linear warm-up of the KD terms over the first epochs (the authors' code; epoch e counts from 0).
Defaults alpha = 1, beta = 8, tau = 4, warm-up 20 epochs: the paper's CIFAR-100 setting (its ImageNet
setting is alpha = 1, beta = 0.5, tau = 1, warm-up 1 epoch).

The target class t is the label, or the argmax of the soft target under Mixup / CutMix (the label
the mixed image mostly carries). A student with DeiT's distillation token gets CE on the class head
and the KD terms on the distillation head; any other student gets all of it on its class head.
Only the teacher's logits are read, so DKD runs from a teacher cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdistill.methods.base import METHODS, Method, Outputs


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each tau^2 * batch-mean KL, for class indices ``target`` [B].

    Computed in log space: log p_t = lse(z_t) - lse(z) and log(1 - p_t) = lse(z_\\t) - lse(z), so a
    confident teacher (p_t near 1) gives no log(0); the non-target logits are gathered, not masked
    with a large negative constant, so NCKD is exact.
    """
    dt = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    b, c = student_logits.shape
    is_target = F.one_hot(target, c).bool()

    def parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.to(dt) / tau
        rest = z[~is_target].view(b, c - 1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        log_binary = torch.cat((z.gather(1, target[:, None]), torch.logsumexp(rest, dim=-1, keepdim=True)), 1) - lse
        return log_binary, F.log_softmax(rest, dim=-1)

    s_bin, s_rest = parts(student_logits)
    t_bin, t_rest = parts(teacher_logits)
    tckd = F.kl_div(s_bin, t_bin, reduction="sum", log_target=True) * tau * tau / b
    nckd = F.kl_div(s_rest, t_rest, reduction="sum", log_target=True) * tau * tau / b
    return tckd, nckd


@METHODS.register("dkd")
class DKD(Method):
    name = "dkd"
    summary = "KD split into target-class (TCKD) and non-target-class (NCKD) terms, weighted apart"
    paper = "Zhao et al. 2022, Decoupled Knowledge Distillation"
    teacher_outputs = ("logits",)

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0, warmup_epochs: int = 20,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        for knob, value in (("alpha", alpha), ("beta", beta)):
            if value < 0:
                raise ValueError(f"{knob} must be >= 0, not {value}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, not {tau}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, not {warmup_epochs}")
        self.alpha, self.beta, self.tau, self.warmup_epochs = alpha, beta, tau, int(warmup_epochs)
        self.warmup = self.ramp(0)

    def ramp(self, epoch: int) -> float:
        """The KD weight w(e) of epoch ``epoch`` (from 0); 1 throughout without warm-up."""
        return 1.0 if self.warmup_epochs == 0 else min(1.0, (epoch + 1) / self.warmup_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        # a function of the epoch alone, so a resumed run recomputes it: nothing to checkpoint
        self.warmup = self.ramp(epoch)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        hard = target.argmax(dim=-1) if target.ndim == 2 else target
        z = student.get("dist_logits", student["logits"])
        tckd, nckd = dkd_terms(z, teacher["logits"].detach(), hard, self.tau)
        loss = ce + self.warmup * (self.alpha * tckd + self.beta * nckd)
        return {"loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}
