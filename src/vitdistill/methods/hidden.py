"""``hidden``: hidden-state distillation, FitNets hints through a learned regressor, TinyBERT style.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio. *FitNets: Hints for Thin Deep Nets*. ICLR 2015,
arXiv:1412.6550. Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu. *TinyBERT: Distilling BERT for
Natural Language Understanding*. Findings of EMNLP 2020, arXiv:1909.10351.

For each mapped pair (student block m, teacher layer l), the student's block output H^s_m is mapped
to the teacher's width by a learned linear regressor W_m (one per pair; TinyBERT's W_h, FitNets'
regressor r), and compared with the teacher's layer output H^t_l on a chosen set of tokens:

    L_hidden = 1 / |pairs| * sum_{(m, l)} d( H^s_m W_m + b_m , H^t_l )
    d = MSE (mean over tokens and channels; TinyBERT's loss, FitNets' 1/2 ||.||^2 up to scale)
        or cosine: mean over tokens of 1 - cos(., .)

    L = (1 - alpha) * CE(z_s, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)) + beta * L_hidden

with CE smoothed by ``train.label_smoothing`` and the soft-logit term (Hinton et al. 2015) off by default (``alpha = 0``). FitNets trains the hint
first in a separate stage; here, as in TinyBERT's joint variant, everything trains together.

Tokens (knob ``tokens``): ``"all"`` every token (ViT teacher with the same token layout), ``"cls"``
the first token (the class token) of each side, ``"patch"`` the patch tokens: the student's on its
``h x w`` grid and the teacher's brought to that grid by :func:`_features.to_tokens` (a CNN stage's
map ``[B, C, H, W]`` average-pooled, or bilinearly resized when smaller, then flattened; a ViT's
patch tokens resized on their own grid when it differs). ``"auto"`` (default) is ``"all"`` when the
teacher is a ViT with the student's token layout and ``"patch"`` otherwise. A CNN teacher serves
``"patch"`` only. Default layers: every student block, mapped uniformly onto the teacher's layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import UserError
from vitdistill.methods._features import (check_layer_knobs, grid_of, layer_pairs, patch_tokens, projector, require_vit,
                                          to_tokens)
from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, heads, soft_kl
from vitdistill.models.taps import ModelInfo, Tap

TOKENS = ("auto", "all", "cls", "patch")


def hidden_distance(s: torch.Tensor, t: torch.Tensor, loss: str) -> torch.Tensor:
    """MSE over every element, or the mean over tokens of 1 - cosine similarity along the channels."""
    dt = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
    s, t = s.to(dt), t.to(dt)
    if loss == "mse":
        return F.mse_loss(s, t)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


@METHODS.register("hidden")
class HiddenDistill(Method):
    name = "hidden"
    summary = "student block outputs, through learned linear projectors, regressed onto teacher layer outputs"
    paper = ("Romero et al. 2015, FitNets: Hints for Thin Deep Nets; Jiao et al. 2020, TinyBERT: Distilling BERT "
             "for Natural Language Understanding")
    teacher_outputs = ("logits", "features")

    def __init__(self, beta: float = 1.0, loss: str = "mse", tokens: str = "auto", alpha: float = 0.0,
                 tau: float = 4.0, student_layers: list[int] | None = None, teacher_layers: list[int] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha, tau)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, not {beta}")
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', not {loss!r}")
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(TOKENS)}; not {tokens!r}")
        check_layer_knobs(student_layers, teacher_layers)
        self.beta, self.loss, self.tokens, self.alpha, self.tau = beta, loss, tokens, alpha, tau
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        # set by setup
        self.pairs: list[tuple[int, int]] = []
        self.mode = tokens
        self.grid: tuple[int, int] = (0, 0)
        self.prefix: tuple[int, int] = (0, 0)  # prefix tokens of (student, teacher)
        self.projectors = nn.ModuleList()

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        require_vit(self.name, student, "student", "a ViT student with a ViT or CNN teacher")
        pairs = layer_pairs(self.name, student, teachers, self.student_layers, self.teacher_layers)
        teacher = teachers[0]
        self.pairs = [(i % student.depth, j % teacher.depth) for i, j in pairs]
        self.prefix = (student.num_prefix_tokens, teacher.num_prefix_tokens)
        self.mode = self._token_mode(student, teacher)
        if self.mode == "patch":
            self.grid = grid_of(student.layer(self.pairs[0][0]), student.num_prefix_tokens)
        # created here, before the optimizer exists, so they train and land in the checkpoint
        self.projectors = nn.ModuleList(
            projector(student.layer(i).width, teacher.layer(j).width) for i, j in self.pairs)
        self.student_taps = tuple(dict.fromkeys(Tap("block", i) for i, _ in self.pairs))
        self.teacher_taps = tuple(dict.fromkeys(Tap("block", j) for _, j in self.pairs))

    def _token_mode(self, student: ModelInfo, teacher: ModelInfo) -> str:
        ps, pt = self.prefix
        if teacher.kind != "vit":
            if self.tokens in ("all", "cls"):
                raise UserError(f"method '{self.name}' with tokens={self.tokens} needs a ViT teacher, and "
                                f"{teacher.name} gives feature maps, not tokens (a CNN or Swin); set "
                                "method.tokens=patch (or auto) to compare "
                                "patch tokens with the CNN's map pooled to the student's grid")
            return "patch"
        s_len, t_len = student.layer(self.pairs[0][0]).shape[0], teacher.layer(self.pairs[0][1]).shape[0]
        same_layout = ps == pt and s_len == t_len
        if self.tokens == "auto":
            return "all" if same_layout else "patch"
        if self.tokens == "all" and not same_layout:
            raise UserError(f"method '{self.name}' with tokens=all needs the same tokens on both sides; the student "
                            f"has {s_len} ({ps} prefix), the teacher {t_len} ({pt} prefix); set method.tokens=patch "
                            "(or cls)")
        if self.tokens == "cls" and (ps < 1 or pt < 1):
            raise UserError(f"method '{self.name}' with tokens=cls needs a class token on both sides; the student has "
                            f"{ps} prefix tokens, the teacher {pt}; set method.tokens=patch")
        return self.tokens

    def select(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's tokens compared for one pair, ``[B, n, D_s]`` and ``[B, n, D_t]``."""
        ps, pt = self.prefix
        if self.mode == "all":
            return s, t
        if self.mode == "cls":
            return s[:, :1], t[:, :1]
        return patch_tokens(s, ps), to_tokens(t, self.grid, pt)

    def pair_loss(self, k: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d(H^s W_k, H^t) for pair ``k`` from the raw tapped outputs (teacher detached)."""
        s, t = self.select(s, t.detach())
        return hidden_distance(self.projectors[k](s), t, self.loss)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        feat = sum(self.pair_loss(k, student[f"block.{i}"], teacher[f"block.{j}"])
                   for k, (i, j) in enumerate(self.pairs)) / len(self.pairs)
        outs = heads(student)
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        loss = (1 - self.alpha) * ce + self.beta * feat
        parts = {"ce": ce.detach(), "hidden": feat.detach()}
        if self.alpha > 0:
            kd = sum(soft_kl(z, teacher["logits"].detach(), self.tau) for z in outs) / len(outs)
            loss = loss + self.alpha * kd
            parts["kd"] = kd.detach()
        return {"loss": loss, **parts}
