"""``dearkd``: DearKD (Chen, Cao, Zhong, Zhang, Gao, Tao, *DearKD: Data-Efficient Early Knowledge
Distillation for Vision Transformers*, CVPR 2022, arXiv:2204.12997).

Two stages. Stage 1 (epochs ``e < stage1_epochs``) distils the inductive biases of a CNN's early
layers into the early blocks of the transformer, together with DeiT's logit distillation; stage 2
trains the transformer on the labels alone, so it is free to grow past the CNN's locality:

    stage 1:  L = (1 - a) * CE_ls(Z_cls, y) + a * L_kd + lambda_feat * L_feat
    stage 2:  L = CE_ls(Z, y)            (both heads, averaged, for a student with a distillation token)

    L_kd   = CE(Z_kd, argmax Z_t)                                  hard (DeiT eq. 3, the paper's choice)
           = tau^2 * KL(softmax(Z_t / tau) || softmax(Z_kd / tau))  soft (batch mean)
    L_feat = 1/|P| sum_{(s, t) in P} MSE(W_s H^S_s, pool(H^T_t))

``Z_kd`` is the distillation token's head when the student has one, else the class head. ``H^S_s``
are the patch tokens of student block s ([B, N, D_s], prefix tokens dropped), ``W_s`` a learned
linear aligner per pair to the teacher's width, and ``pool(H^T_t)`` the teacher layer's output on the
student's patch grid (``_features.to_tokens``: a CNN stage map average-pooled, a ViT's patch tokens
resized only when its grid differs). The MSE is the mean over batch, tokens and channels; the layer terms are averaged.

Layers ``P``: by default the first half of the student's blocks, each mapped to the teacher layer the
uniform map gives it (so the student's early blocks meet the teacher's early stages); the knobs
``student_layers`` / ``teacher_layers`` override it. The current stage is a registered buffer, so a
checkpoint records it and a resumed run restores it.

Defaults: ``stage1_epochs = 250`` (the paper trains DeiT for 300 epochs and, as we read it, switches
the distillation off for the last 50 - a value not re-checked against the paper's text here; scale
it to about 5/6 of your run), ``kd_alpha = 0.5`` (DeiT's hard-distillation weight), ``lambda_feat = 1``
and a linear aligner (our choices where the paper's exact weight and aligner were not available).

Left out: the paper's student change (MHCA, multi-head attention with relative position terms that
let a head express a convolution; this method trains the timm student as it is) and its data-free
variant (DeepInversion images with a boundary-preserving intra-divergence loss).

Any timm teacher whose layers can be tapped serves, CNN (the paper's case) or ViT; the student
must be a ViT, and the teacher must run live (its intermediate outputs are not in a teacher cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.methods._features import (check_layer_knobs, grid_of, layer_pairs, patch_tokens, projector, require_vit,
                                          to_tokens)
from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, heads, soft_kl
from vitdistill.models.taps import ModelInfo, Tap

SERVES = "a ViT student with a live timm teacher, CNN or ViT"


@METHODS.register("dearkd")
class DearKD(Method):
    name = "dearkd"
    summary = "two stages: CNN early-layer features + DeiT logit distillation, then labels only"
    paper = "Chen et al. 2022, DearKD: Data-Efficient Early Knowledge Distillation for Vision Transformers"
    teacher_outputs = ("logits", "features")

    def __init__(
        self,
        stage1_epochs: int = 250,
        lambda_feat: float = 1.0,
        distillation: str = "hard",
        kd_alpha: float = 0.5,
        tau: float = 3.0,
        student_layers: list[int] | None = None,
        teacher_layers: list[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(label_smoothing)
        if int(stage1_epochs) != stage1_epochs or stage1_epochs < 0:
            raise ValueError(f"stage1_epochs must be an integer >= 0, not {stage1_epochs}")
        if lambda_feat < 0:
            raise ValueError(f"lambda_feat must be >= 0, not {lambda_feat}")
        if distillation not in ("hard", "soft"):
            raise ValueError(f"distillation must be 'hard' or 'soft', not {distillation!r}")
        check_weights(kd_alpha, tau, "kd_alpha")
        self.stage1_epochs, self.lambda_feat = int(stage1_epochs), lambda_feat
        self.distillation, self.kd_alpha, self.tau = distillation, kd_alpha, tau
        check_layer_knobs(student_layers, teacher_layers)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        # 1 or 2; a buffer so the checkpoint holds it, mirrored in Python so no step syncs on it
        self.register_buffer("stage", torch.tensor(1 if self.stage1_epochs > 0 else 2, dtype=torch.int64))
        self._stage = int(self.stage)
        self.register_load_state_dict_post_hook(DearKD._after_load)
        self.aligners = nn.ModuleList()
        self.pairs: list[tuple[int, int]] = []
        self.grid: tuple[int, int] = (0, 0)
        self.s_prefix = self.t_prefix = 0

    @staticmethod
    def _after_load(module: "DearKD", incompatible_keys) -> None:
        module._stage = int(module.stage)

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        require_vit(self.name, student, "student", SERVES)
        s_layers = self.student_layers
        if s_layers is None:
            s_layers = list(range(max(1, student.depth // 2)))  # the early half
        pairs = layer_pairs(self.name, student, teachers, s_layers, self.teacher_layers)
        teacher = teachers[0]
        self.pairs = [(s % student.depth, t % teacher.depth) for s, t in pairs]
        self.grid = grid_of(student.layer(self.pairs[0][0]), student.num_prefix_tokens)
        self.s_prefix, self.t_prefix = student.num_prefix_tokens, teacher.num_prefix_tokens
        self.aligners = nn.ModuleList(
            projector(student.layer(s).width, teacher.layer(t).width) for s, t in self.pairs)
        self.student_taps = tuple(Tap("block", s) for s in dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = tuple(Tap("block", t) for t in dict.fromkeys(t for _, t in self.pairs))

    def on_epoch_start(self, epoch: int) -> None:
        self._stage = 1 if epoch < self.stage1_epochs else 2
        self.stage.fill_(self._stage)

    def feature_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        # no pairs only before setup (a bare loss check); setup always makes at least one
        total = torch.zeros((), device=student["logits"].device)
        for (s, t), align in zip(self.pairs, self.aligners):
            hs = align(patch_tokens(student[f"block.{s}"], self.s_prefix)).float()
            ht = to_tokens(teacher[f"block.{t}"].detach(), self.grid, self.t_prefix).float()
            total = total + F.mse_loss(hs, ht)
        return total / max(1, len(self.pairs))

    def logit_loss(self, student: Outputs, teacher_logits: torch.Tensor) -> torch.Tensor:
        z = student.get("dist_logits", student["logits"])
        if self.distillation == "hard":
            return F.cross_entropy(z, teacher_logits.argmax(dim=-1))
        return soft_kl(z, teacher_logits, self.tau)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        if self._stage == 2:
            outs = heads(student)
            ce = sum(self.ce(z, target) for z in outs) / len(outs)
            zero = torch.zeros((), device=ce.device)
            return {"loss": ce, "ce": ce.detach(), "kd": zero, "feat": zero}
        assert teacher is not None
        ce = self.ce(student["logits"], target)
        kd = self.logit_loss(student, teacher["logits"].detach())
        feat = self.feature_loss(student, teacher)
        loss = (1 - self.kd_alpha) * ce + self.kd_alpha * kd + self.lambda_feat * feat
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "feat": feat.detach()}
