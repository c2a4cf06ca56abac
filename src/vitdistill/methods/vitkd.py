"""``vitkd``: ViTKD (Yang, Li, Zeng, Li, Yuan, Li, *ViTKD: Practical Guidelines for ViT feature Knowledge
Distillation*, arXiv:2209.02432, 2022; CVPR workshops 2024).

The paper's guidelines: mimic the teacher's shallow layers directly, and *generate* its deep layer
from a masked copy of the student's, rather than mimicking it. With ``F^S_k``, ``F^T_k`` the patch
tokens [B, N, D] of layer k (class and distillation tokens dropped), ``f_k`` a linear projector from
student to teacher width (the identity when the widths agree, as in the authors' code):

    L_lr  = alpha / B * sum_k sum_{b,i,j} (f_k(F^S_k) - F^T_k)^2_{b,i,j}       (k: the first `shallow` layers)
    X     = M * m + (1 - M) * f(F^S_last)          M: N - int(N (1 - r)) random tokens per image
    L_gen = beta / (B r) * sum_{b,i,j} M_{b,i} (G(X) - F^T_last)^2_{b,i,j}    (masked tokens only)

``m`` is a learned mask token and ``G`` the generator: the convolutional block of the authors' code
(3x3 conv, ReLU, 3x3 conv at the teacher's width on the student's h x w patch grid). Losses are
*sums* over tokens and channels averaged over the batch, and the deep term is divided by the mask
ratio r, as the authors' reference implementation does; the defaults alpha = 3e-5, beta = 3e-6,
r = 0.5 were tuned for that convention (DeiT widths 192-768, 196 patches).

The logit part: CE on the label plus the logit KD the paper combines ViTKD with, NKD (Yang et al.,
ICCV 2023, arXiv:2303.13005), whose normalised non-target term is taken over the non-target classes:

    L_nkd = -mean_b p^T_y log p^S_y - gamma tau^2 mean_b sum_{c != y} q^T_c log q^S_c
    q_c   = softmax over the non-target classes of z_c / tau

with ``y`` the label (the argmax of a mixed soft target), ``gamma`` = 1 and ``tau`` = 1 as in the
authors' DeiT configs. ``logit="none"`` drops it (ViTKD alone, the paper's first table). In all:

    L = CE_ls(z, y) + L_nkd + L_lr + L_gen

The student must be a ViT. Teachers: a ViT as in the paper; a CNN teacher is served too, its stage
maps brought to the student's patch grid by ``_features.to_tokens`` (an extension, not the paper's
setting). The mask is drawn from a generator seeded by ``seed`` and a step counter saved with the
method, so a resumed run masks the same tokens as an uninterrupted one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import UserError
from vitdistill.methods._features import (check_layer_knobs, StepRandom, grid_of, layer_pairs, patch_tokens, projector,
                                          require_vit, to_tokens)
from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, heads
from vitdistill.models.taps import ModelInfo, Tap

SERVES = "a ViT student with a ViT teacher (the paper's pairing) or a CNN teacher"


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label: torch.Tensor, tau: float,
             gamma: float) -> torch.Tensor:
    """NKD: the target term weighted by the teacher's target probability, plus the teacher's
    normalised non-target distribution matched by the student's (that one at temperature ``tau``;
    the target term uses the plain softmax)."""
    s, t = student_logits.float(), teacher_logits.detach().float()
    y = label.unsqueeze(1)
    target = -(F.softmax(t, dim=1).gather(1, y) * F.log_softmax(s, dim=1).gather(1, y)).mean()
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, y, False)
    b, c = s.shape
    s_non, t_non = s[keep].reshape(b, c - 1), t[keep].reshape(b, c - 1)
    q_t = F.softmax(t_non / tau, dim=1)
    non = -(q_t * F.log_softmax(s_non / tau, dim=1)).sum(dim=1).mean()
    return target + gamma * tau * tau * non


def conv_generator(width: int) -> nn.Module:
    """The generation block of the authors' code: two 3x3 convolutions with a ReLU between, width kept."""
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(width, width, 3, padding=1))


@METHODS.register("vitkd")
class ViTKD(Method):
    name = "vitkd"
    summary = "mimic the teacher's shallow layers, generate its last layer from masked student tokens (+ NKD)"
    paper = "Yang et al. 2022, ViTKD: Practical Guidelines for ViT feature Knowledge Distillation"
    teacher_outputs = ("logits", "features")

    def __init__(
        self,
        alpha: float = 3e-5,
        beta: float = 3e-6,
        mask_ratio: float = 0.5,
        shallow: int = 2,
        logit: str = "nkd",
        tau: float = 1.0,
        gamma: float = 1.0,
        seed: int = 0,
        student_layers: list[int] | None = None,
        teacher_layers: list[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(label_smoothing)
        if alpha < 0 or beta < 0 or gamma < 0:
            raise ValueError(f"alpha, beta and gamma must be >= 0, not {alpha}, {beta}, {gamma}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), not {mask_ratio}")
        if int(shallow) != shallow or shallow < 0:
            raise ValueError(f"shallow (layers mimicked) must be a non-negative integer, not {shallow}")
        if logit not in ("nkd", "none"):
            raise ValueError(f"logit must be 'nkd' or 'none', not {logit!r}")
        check_weights(0.0, tau)
        self.alpha, self.beta, self.mask_ratio, self.shallow = alpha, beta, mask_ratio, int(shallow)
        self.logit, self.tau, self.gamma = logit, tau, gamma
        check_layer_knobs(student_layers, teacher_layers)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.draws = StepRandom(seed)
        self.pairs: list[tuple[int, int]] = []
        self.deep: tuple[int, int] = (0, 0)
        self.grid: tuple[int, int] = (0, 0)
        self.s_prefix = self.t_prefix = 0
        self.mimic = nn.ModuleList()
        self.align: nn.Module = nn.Identity()
        self.generator: nn.Module = nn.Identity()
        self.mask_token: nn.Parameter | None = None

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        require_vit(self.name, student, "student", SERVES)
        teacher = teachers[0] if teachers else None
        if self.student_layers is None and self.teacher_layers is None:
            layer_pairs(self.name, student, teachers, None, None)  # the live-teacher check
            assert teacher is not None
            for i in range(self.shallow):  # one-line errors for layers either model lacks
                student.layer(i)
                teacher.layer(i)
            self.pairs = [(i, i) for i in range(self.shallow)]
        else:
            self.pairs = layer_pairs(self.name, student, teachers, self.student_layers, self.teacher_layers,
                                     default_student=list(range(self.shallow)))
            assert teacher is not None
        self.pairs = [(s % student.depth, t % teacher.depth) for s, t in self.pairs]
        self.deep = (student.depth - 1, teacher.depth - 1)
        self.grid = grid_of(student.layer(-1), student.num_prefix_tokens)
        self.s_prefix, self.t_prefix = student.num_prefix_tokens, teacher.num_prefix_tokens
        n = self.grid[0] * self.grid[1]
        if self.n_keep(n) >= n:
            raise UserError(f"mask_ratio {self.mask_ratio} masks none of the student's {n} patch tokens")
        self.mimic = nn.ModuleList(projector(student.layer(s).width, teacher.layer(t).width, identity_when_equal=True)
                                   for s, t in self.pairs)
        width = teacher.layer(-1).width
        self.align = projector(student.layer(-1).width, width, identity_when_equal=True)
        self.generator = conv_generator(width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        layers_s = dict.fromkeys([s for s, _ in self.pairs] + [self.deep[0]])
        layers_t = dict.fromkeys([t for _, t in self.pairs] + [self.deep[1]])
        self.student_taps = tuple(Tap("block", i) for i in layers_s)
        self.teacher_taps = tuple(Tap("block", i) for i in layers_t)

    def n_keep(self, n: int) -> int:
        """Tokens left unmasked per image (the reference code's ``int(N * (1 - r))``)."""
        return int(n * (1 - self.mask_ratio))

    def draw_mask(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        """[B, N] booleans, True where a token is masked: the highest-ranked ``N - keep`` of a uniform draw."""
        noise = torch.rand(b, n, generator=self.draws.next())
        rank = noise.argsort(dim=1).argsort(dim=1)
        return (rank >= self.n_keep(n)).to(device)

    def feature_losses(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_lr, L_gen) before their weights alpha and beta."""
        deep_s = patch_tokens(student[f"block.{self.deep[0]}"], self.s_prefix).float()
        b = deep_s.shape[0]
        lr = torch.zeros((), device=deep_s.device)
        for proj, (s, t) in zip(self.mimic, self.pairs):
            fs = patch_tokens(student[f"block.{s}"], self.s_prefix).float()
            ft = to_tokens(teacher[f"block.{t}"].detach(), self.grid, self.t_prefix).float()
            lr = lr + (proj(fs) - ft).pow(2).sum() / b
        ft = to_tokens(teacher[f"block.{self.deep[1]}"].detach(), self.grid, self.t_prefix).float()
        x = self.align(deep_s)
        n, d = x.shape[1:]
        mask = self.draw_mask(b, n, x.device).unsqueeze(-1)
        assert self.mask_token is not None
        x = torch.where(mask, self.mask_token.to(x.dtype).expand(b, n, d), x)
        x = x.transpose(1, 2).reshape(b, d, *self.grid)
        gen = self.generator(x).flatten(2).transpose(1, 2)
        gen = ((gen - ft).pow(2) * mask).sum() / (b * self.mask_ratio)
        return lr, gen

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        outs = heads(student)
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        lr, gen = self.feature_losses(student, teacher)
        loss = ce + self.alpha * lr + self.beta * gen
        parts = {"ce": ce.detach(), "lr": lr.detach(), "gen": gen.detach()}
        if self.logit == "nkd":
            label = target.argmax(dim=1) if target.ndim == 2 else target
            nkd = sum(nkd_loss(z, teacher["logits"], label, self.tau, self.gamma) for z in outs) / len(outs)
            loss = loss + nkd
            parts["nkd"] = nkd.detach()
        return {"loss": loss, **parts}
