"""A method from outside vitdistill: logit matching, loaded with ``--plugin`` (docs/plugins.md).

Ba and Caruana, *Do Deep Nets Really Need to be Deep?*, NeurIPS 2014, arXiv:1312.6184, train the
student to regress the teacher's logits; Hinton et al. 2015 (section 2.1) show that this is the
high-temperature limit of KD when the logits are zero-meaned. On zero-meaned logits
z' = z - mean_c(z):

    L = (1 - alpha) * CE(z_s, y) + alpha * 1/(2B) * sum_b || z'_s(b) - z'_t(b) ||_2^2

Zero-meaning also makes the term blind to a constant added to the teacher's logits, so a teacher
cache (which stores log-probabilities) gives the same target as the live teacher when it keeps
every class.

    vitdistill distill --plugin examples/plugins/logit_l2.py --method logit-l2 \
        --teacher resnet_micro_cnn --teacher-weights runs/demo/teacher --student vit_femto_patch4_16
"""
from __future__ import annotations

import torch

from vitdistill.methods import METHODS, Method
from vitdistill.methods.base import Outputs, check_weights, heads


@METHODS.register("logit-l2")
class LogitL2(Method):
    name = "logit-l2"
    summary = "squared error between zero-meaned student and teacher logits (a plugin example)"
    paper = "Ba and Caruana, NeurIPS 2014, Do Deep Nets Really Need to be Deep?"
    teacher_outputs = ("logits",)  # logits only: a teacher cache can feed it too

    def __init__(self, alpha: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha)
        self.alpha = alpha

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        z_t = teacher["logits"].detach().float()
        z_t = z_t - z_t.mean(dim=1, keepdim=True)
        outs = heads(student)  # a distillation-token student: the same loss on both heads
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        match = sum(0.5 * ((z.float() - z.float().mean(dim=1, keepdim=True) - z_t) ** 2).sum(1).mean()
                    for z in outs) / len(outs)
        loss = (1 - self.alpha) * ce + self.alpha * match
        return {"loss": loss, "ce": ce.detach(), "match": match.detach()}
