"""``manifold``: fine-grained manifold distillation (Hao, Guo, Jia, Han, Tang, Zhang, Hu, Wang, *Learning
Efficient Vision Transformers via Fine-Grained Manifold Distillation*, NeurIPS 2022, arXiv:2107.01378).

For each mapped pair of layers the patch tokens ``F [B, N, D]`` of student and teacher are normalised
along D (``psi``) and compared through their relation ("manifold") maps, which are N x N, B x B or
K x K whatever the widths, so no projector is needed. The full map over all B*N patches is decoupled
into three cheap terms:

    M_intra(F)_b   = psi(F_b) psi(F_b)^T            per image b,            [N, N]
    M_inter(F)_n   = psi(F_:,n) psi(F_:,n)^T        per patch position n,   [B, B]
    M_random(F)    = psi(F_r) psi(F_r)^T            K patches r drawn from all B*N,  [K, K]

    L_mf,l = alpha * mean|M_intra(F_S) - M_intra(F_T)|^2 + beta * mean|M_inter(...) - ...|^2
             + gamma * mean|M_random(...) - ...|^2

``mean|.|^2`` is the squared Frobenius norm divided by the number of map entries (B N^2, N B^2 and
K^2), as the authors' released code reduces it. The layer terms are averaged over the pairs, and the
logit part is DeiT's (the authors build on DeiT's training code):

    hard:  L = (1 - a) * CE_ls(Z_cls, y) + a * CE(Z_dist, argmax Z_t)          (DeiT eq. 3)
    soft:  L = (1 - a) * CE_ls(Z_cls, y) + a * tau^2 * KL(psi(Z_t/tau) || psi(Z_dist/tau))
    total: L + lambda_mf * (1/|pairs|) * sum_l L_mf,l

``Z_dist`` is the distillation token's head when the student has one, else the class head (as DeiT's
loss does for a plain ViT). Defaults: alpha = 4, beta = 0.1, gamma = 0.2, K = 192, lambda_mf = 1
(the authors' DeiT-Tiny manifold weights); the logit part defaults to DeiT's hard variant at
a = 0.5, where the authors' released DeiT-Tiny command runs the soft one at a = 1 and tau = 1
(no label CE: ``distillation=soft, kd_alpha=1``); layers: the first and last third of the student
(DeiT-Tiny 0-3 and 8-11) against the teacher's first and last layers of the same count (CaiT-S24 0-3 and 20-23).

A CNN teacher's stage maps are brought to the student's patch grid by average pooling
(``_features.to_tokens``), so any timm teacher serves; the student must be a ViT. The random term
draws from a generator seeded by ``seed`` and a step counter saved with the method, so a resumed
run draws the same patches as an uninterrupted one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdistill.methods._features import check_layer_knobs, StepRandom, grid_of, layer_pairs, require_vit, to_tokens
from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, soft_kl
from vitdistill.models.taps import ModelInfo, Tap

SERVES = "a ViT student with any timm teacher, ViT or CNN"


def relation(f: torch.Tensor) -> torch.Tensor:
    """``f f^T`` over the last two axes: cosine similarities once ``f`` is normalised along D."""
    return f @ f.transpose(-1, -2)


def manifold_terms(fs: torch.Tensor, ft: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (intra, inter, random) terms of one layer pair; ``fs``, ``ft`` are [B, N, *] patch tokens and
    ``sample`` indexes the flattened B*N patches for the random term."""
    fs, ft = F.normalize(fs, dim=-1), F.normalize(ft, dim=-1)
    intra = (relation(fs) - relation(ft)).pow(2).mean()
    inter = (relation(fs.transpose(0, 1)) - relation(ft.transpose(0, 1))).pow(2).mean()
    rs, rt = fs.flatten(0, 1)[sample], ft.flatten(0, 1)[sample]
    rand = (relation(rs) - relation(rt)).pow(2).mean()
    return intra, inter, rand


def paper_layers(student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """The paper's choice generalised: the student's first and last third (at least one layer each)
    paired with the teacher's first and last layers of the same count."""
    k = max(1, student_depth // 3)
    if 2 * k > student_depth:  # a 1-layer student
        return [(0, teacher_depth - 1)]
    first = [(i, min(i, teacher_depth - 1)) for i in range(k)]
    last = [(student_depth - k + i, max(0, teacher_depth - k + i)) for i in range(k)]
    return first + last


@METHODS.register("manifold")
class ManifoldDistillation(Method):
    name = "manifold"
    summary = "patch relation maps (intra-image, inter-image, random patches) plus DeiT logit distillation"
    paper = "Hao et al. 2022, Learning Efficient Vision Transformers via Fine-Grained Manifold Distillation"
    teacher_outputs = ("logits", "features")

    def __init__(
        self,
        alpha: float = 4.0,
        beta: float = 0.1,
        gamma: float = 0.2,
        K: int = 192,
        lambda_mf: float = 1.0,
        distillation: str = "hard",
        kd_alpha: float = 0.5,
        tau: float = 1.0,
        seed: int = 0,
        student_layers: list[int] | None = None,
        teacher_layers: list[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(label_smoothing)
        for knob, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lambda_mf", lambda_mf)):
            if value < 0:
                raise ValueError(f"{knob} must be >= 0, not {value}")
        if int(K) != K or K < 1:
            raise ValueError(f"K (patches sampled for the random term) must be a positive integer, not {K}")
        if distillation not in ("hard", "soft"):
            raise ValueError(f"distillation must be 'hard' or 'soft', not {distillation!r}")
        check_weights(kd_alpha, tau, "kd_alpha")
        self.alpha, self.beta, self.gamma, self.K, self.lambda_mf = alpha, beta, gamma, int(K), lambda_mf
        self.distillation, self.kd_alpha, self.tau = distillation, kd_alpha, tau
        check_layer_knobs(student_layers, teacher_layers)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.draws = StepRandom(seed)
        self.pairs: list[tuple[int, int]] = []
        self.grid: tuple[int, int] = (0, 0)
        self.s_prefix = self.t_prefix = 0

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        require_vit(self.name, student, "student", SERVES)
        if self.student_layers is None and self.teacher_layers is None:
            layer_pairs(self.name, student, teachers, None, None)  # the live-teacher check
            self.pairs = paper_layers(student.depth, teachers[0].depth)
        else:
            own = [s for s, _ in paper_layers(student.depth, teachers[0].depth)] if teachers else None
            self.pairs = layer_pairs(self.name, student, teachers, self.student_layers, self.teacher_layers,
                                     default_student=own)
        self.pairs = [(s % student.depth, t % teachers[0].depth) for s, t in self.pairs]
        self.grid = grid_of(student.layer(self.pairs[0][0]), student.num_prefix_tokens)
        self.s_prefix, self.t_prefix = student.num_prefix_tokens, teachers[0].num_prefix_tokens
        self.student_taps = tuple(Tap("block", s) for s in dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = tuple(Tap("block", t) for t in dict.fromkeys(t for _, t in self.pairs))

    def logit_loss(self, student: Outputs, teacher_logits: torch.Tensor,
                   target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeiT's distillation: CE on the class head, the teacher on the distillation head (or the class
        head of a student without one)."""
        ce = self.ce(student["logits"], target)
        z = student.get("dist_logits", student["logits"])
        if self.distillation == "hard":
            kd = F.cross_entropy(z, teacher_logits.argmax(dim=-1))
        else:
            kd = soft_kl(z, teacher_logits, self.tau)
        return ce, kd

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        ce, kd = self.logit_loss(student, teacher["logits"].detach(), target)
        g = self.draws.next()
        sums = [torch.zeros((), device=ce.device) for _ in range(3)]
        for s, t in self.pairs:
            # float32: relation maps of normalised half-precision tokens lose the small differences
            fs = to_tokens(student[f"block.{s}"], self.grid, self.s_prefix).float()
            ft = to_tokens(teacher[f"block.{t}"].detach(), self.grid, self.t_prefix).float()
            b, n = fs.shape[:2]
            sample = torch.randperm(b * n, generator=g)[: self.K].to(fs.device)
            for i, term in enumerate(manifold_terms(fs, ft, sample)):
                sums[i] = sums[i] + term
        intra, inter, rand = (x / len(self.pairs) for x in sums)
        mf = self.alpha * intra + self.beta * inter + self.gamma * rand
        loss = (1 - self.kd_alpha) * ce + self.kd_alpha * kd + self.lambda_mf * mf
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "mf_intra": intra.detach(),
                "mf_inter": inter.detach(), "mf_random": rand.detach()}
