"""``co-advise``: cross inductive bias distillation (Ren, Gao, Hua, Xue, Tian, He, Zhao, "Co-advise: Cross
Inductive Bias Distillation", CVPR 2022, arXiv:2106.12378).

Teachers of different inductive biases (the paper: a CNN and an involution network, RedNet) see the
data differently; each teaches its own token of the student. The student ViT carries a class token
and one distillation token per teacher, each with its own linear head. With z_cls, z_1 .. z_n the
heads' logits and z_t1 .. z_tn the teachers', the loss (paper eq. for CivT, official weights
lambda_0 = lambda_1 = lambda_2 = 1 and tau = 1) is

    L = CE(psi(z_cls), y) + w * sum_i tau^2 * KL(psi(z_ti / tau) || psi(z_i / tau))

with psi the softmax and the KL averaged over the batch. ``kd="hard"`` replaces each KL by
CE(psi(z_i), argmax z_ti) (DeiT's hard distillation, an option the paper compares against). At
evaluation the student returns the mean of all 1 + n heads, the paper's inference rule.

Assumption: the paper's "token inductive-bias alignment" derives the convolution and involution
tokens from convolution and involution stems; here the extra tokens are learned parameters (as
DeiT's distillation token) so any timm ViT student can be adapted. Teacher i's logits arrive as
``t{i}.logits``; the engine names the student's heads ``logits``, ``dist_logits``, ``dist_logits.1``...
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import UserError
from vitdistill.methods.base import METHODS, Method, Outputs, soft_kl
from vitdistill.models.taps import ModelInfo


def head_key(i: int) -> str:
    """The engine's name for the head of distillation token ``i`` (0-based)."""
    return "dist_logits" if i == 0 else f"dist_logits.{i}"


class MultiTokenViT(nn.Module):
    """A timm ViT re-tokenised for Co-advise: class token, ``n_tokens`` distillation tokens, patches.

    It reuses the ViT's patch embedding, blocks and norms (the same modules, not copies) and owns the
    new parts: the distillation tokens, a position embedding extended for them, and one head per
    token. Train mode returns ``(z_cls, z_1, ..., z_n)``; eval mode their mean.
    """

    def __init__(self, vit: nn.Module, n_tokens: int) -> None:
        super().__init__()
        embed_dim = vit.embed_dim
        num_classes = vit.num_classes
        old_prefix = vit.num_prefix_tokens
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.dist_tokens = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        nn.init.trunc_normal_(self.dist_tokens, std=0.02)
        extra_pos = torch.zeros(1, n_tokens, embed_dim)
        nn.init.trunc_normal_(extra_pos, std=0.02)
        with torch.no_grad():  # keep the class and patch positions, add fresh ones for the new tokens
            pos = torch.cat([vit.pos_embed[:, :1], extra_pos, vit.pos_embed[:, old_prefix:]], dim=1)
        self.pos_embed = nn.Parameter(pos)
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.heads_dist = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(n_tokens))
        for h in self.heads_dist:
            nn.init.trunc_normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)
        self.embed_dim, self.num_classes, self.n_tokens = embed_dim, num_classes, n_tokens
        self.num_prefix_tokens = 1 + n_tokens
        cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        cfg["classifier"] = ("head", *(f"heads_dist.{i}" for i in range(n_tokens)))
        self.pretrained_cfg = self.default_cfg = cfg

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_tokens"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_tokens.expand(b, -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm_pre(self.patch_drop(x))
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.head_drop(self.fc_norm(self.forward_features(x)[:, : self.num_prefix_tokens]))
        outs = (self.head(x[:, 0]), *(h(x[:, 1 + i]) for i, h in enumerate(self.heads_dist)))
        if self.training:
            return outs
        return torch.stack(outs).mean(dim=0)


def _check_vit(student: nn.Module, name: str) -> None:
    from vitdistill.models.taps import is_vit

    problem = None
    if not is_vit(student) or getattr(student, "cls_token", None) is None or not hasattr(student, "pos_embed"):
        problem = "is not a timm ViT with a class token"
    elif getattr(student, "num_reg_tokens", 0) or getattr(student, "no_embed_class", False):
        problem = "has register tokens or position embeddings without the class token"
    elif getattr(student, "dynamic_img_size", False) or getattr(student, "global_pool", "token") != "token":
        problem = "uses dynamic image sizes or pooled (not class-token) heads"
    if problem:
        raise UserError(f"method 'co-advise' needs a timm ViT student with class-token heads; '{name}' {problem}; "
                        "use vit_femto_patch4_16, deit_femto_distilled_patch4_16 or a timm vit_*/deit_* model")


@METHODS.register("co-advise")
class CoAdvise(Method):
    name = "co-advise"
    summary = "one distillation token and head per teacher of another inductive bias (CNN, involution)"
    paper = "Ren et al. 2022, Co-advise: Cross Inductive Bias Distillation"
    teacher_outputs = ("logits",)
    teachers_needed = 2
    teachers_most = None

    def __init__(self, teachers: int = 2, kd: str = "soft", tau: float = 1.0, kd_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        if not isinstance(teachers, int) or teachers < 2:
            raise ValueError(f"teachers must be an integer of at least 2, not {teachers!r}")
        if kd not in ("soft", "hard"):
            raise ValueError(f"kd must be 'soft' or 'hard', not {kd!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, not {tau}")
        if kd_weight < 0:
            raise ValueError(f"kd_weight must be non-negative, not {kd_weight}")
        self.teachers, self.kd, self.tau, self.kd_weight = teachers, kd, tau, kd_weight

    def adapt_student(self, student: nn.Module, student_name: str) -> nn.Module:
        """Give the ViT one distillation token and head per teacher (a DeiT distillation token, if any,
        is replaced by them)."""
        _check_vit(student, student_name)
        return MultiTokenViT(student, self.teachers)

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        if len(teachers) != self.teachers:
            raise UserError(f"method 'co-advise' was set for {self.teachers} teachers (method.teachers) and got "
                            f"{len(teachers)}; pass --set method.teachers={len(teachers)} or give {self.teachers} "
                            "teachers comma-separated")

    def distill(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """One token's loss against its teacher."""
        teacher_logits = teacher_logits.detach()
        if self.kd == "hard":
            return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
        return soft_kl(student_logits, teacher_logits, self.tau)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        parts = {f"kd{i}": self.distill(student[head_key(i)], teacher[f"t{i}.logits"]) for i in range(self.teachers)}
        loss = ce + self.kd_weight * sum(parts.values())
        return {"loss": loss, "ce": ce.detach(), **{k: v.detach() for k, v in parts.items()}}
