"""``tat``: knowledge distillation via the Target-aware Transformer (Lin, Xie, Wang, Yu, Chang, Liang, Wang,
"Knowledge Distillation via the Target-aware Transformer", CVPR 2022, arXiv:2205.10793).

One-to-all spatial matching. With the student's feature map f^s and the teacher's f^t as N tokens
(the teacher brought to the student's h x w grid), the student is *reconfigured* so that each
teacher position i gathers all student positions j by their similarity (paper eqs. 3-5):

    w^i_j     = softmax_j( <theta(f^t_i), gamma(f^s_j)> )
    f^{s'}_i  = sum_j w^i_j * phi(f^s_j)
    L_TaT     = MSE(f^{s'}, f^t)                         (mean over positions and channels)

The softmax takes the raw dot product, with no 1/sqrt(C) scale: the official code's ``MaskedFM`` loss
(``sim.softmax(dim=-1)`` with ``heads: 1`` in its ImageNet configs) does the same. At ViT widths the
weights are then close to one-hot; ``temperature`` T divides the scores (softmax_j(<., .> / T)), and
``heads`` splits the teacher's width into that many equal groups that match independently (the
official code's ``heads``: the channels of q, k and v are cut into ``heads`` slices, each slice runs the
one-to-all matching on its own, and the MSE is over all of them). Both default to the official 1.

gamma and phi are learned 1x1 maps from the student's width to the teacher's followed by batch norm.
The official ImageNet code's "Embed" (torchdistill) is a 3x3 convolution without bias + BN; a 1x1
map is kept here because it acts on each token alone, so it needs no spatial grid. theta is the
identity (the official classification code keeps the teacher's features as they are).
``query="student"`` swaps the roles of query and key, w_ij = softmax_j(<gamma(f^s_i), f^t_j>), the order of the official implementation's
einsum (sigma(gamma(f^s) theta(f^t)^T) phi(f^s) with a row softmax).

Hierarchical distillation (paper Sec. 3.3) cuts the N^2 cost on large maps:

- patch-group (``variant="patch_group"``): the grid is split into p x p patches (``patch_size``); the
  patches are stacked into ``groups`` groups along the channel axis (each token of a group
  concatenates the same in-patch position of its patches), and the matching runs inside each group
  over its p*p positions; L_pg = MSE over all groups;
- anchor-point (``variant="anchor"``): projected student, teacher and values are average-pooled to an
  ``anchor`` x ``anchor`` grid of anchor points, and the matching runs over all anchors; L_anchor;
- ``variant="hierarchical"``: L_TaT = L_pg + ``anchor_weight`` * L_anchor.

Total, with the official ImageNet recipe's weights (KD at tau = 1 with equal halves, TaT factor 0.1):

    L = (1 - alpha) * CE(z_s, y) + alpha * tau^2 * KL(psi(z_t / tau) || psi(z_s / tau)) + beta * L_TaT

Default layers: the student's last block against the teacher's last layer (a CNN's last stage is
brought to the student's grid by ``_features.to_tokens``); ``student_layers``/``teacher_layers`` map
several pairs, each with its own gamma/phi, and L_TaT is their mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import UserError
from vitdistill.methods._features import check_layer_knobs, grid_of, layer_pairs, to_tokens
from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, heads, soft_kl
from vitdistill.models.taps import ModelInfo, Tap

VARIANTS = ("full", "patch_group", "anchor", "hierarchical")


class Embed(nn.Module):
    """1x1 map to the teacher's width, then batch norm over all positions of the batch."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)
        self.norm = nn.BatchNorm1d(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return self.norm(y.reshape(-1, y.shape[-1])).view_as(y)


def one_to_all(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """softmax_j(<q_i, k_j> / T) weighted sum of v_j, per leading index; float32 for a stable softmax."""
    w = torch.softmax(query.float() @ key.float().transpose(-2, -1) / temperature, dim=-1)
    return w @ value.float()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B*heads, N, C/heads]: each head's channel slice becomes its own matching problem, so
    the grouping and pooling of the variants apply to every head alike."""
    if heads == 1:
        return x
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2).reshape(b * heads, n, c // heads)


def group_patches(x: torch.Tensor, grid: tuple[int, int], patch: int, groups: int) -> torch.Tensor:
    """[B, H*W, C] -> [B*groups, patch*patch, (n_patches/groups)*C]: patches (row-major) stacked into
    groups along channels, so a group's token concatenates one in-patch position of each of its patches."""
    b, _, c = x.shape
    h, w = grid
    n, m = h // patch, w // patch
    x = x.reshape(b, n, patch, m, patch, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n * m, patch * patch, c)
    x = x.reshape(b, groups, (n * m) // groups, patch * patch, c).permute(0, 1, 3, 2, 4)
    return x.reshape(b * groups, patch * patch, -1)


def pool_anchors(x: torch.Tensor, grid: tuple[int, int], anchor: int) -> torch.Tensor:
    """[B, H*W, C] average-pooled to [B, anchor*anchor, C]."""
    b, _, c = x.shape
    x = x.transpose(1, 2).reshape(b, c, *grid)
    x = F.avg_pool2d(x, (grid[0] // anchor, grid[1] // anchor))
    return x.flatten(2).transpose(1, 2)


@METHODS.register("tat")
class TaT(Method):
    name = "tat"
    summary = "target-aware transformer: each teacher position gathers all student positions by similarity"
    paper = "Lin et al. 2022, Knowledge Distillation via the Target-aware Transformer"
    teacher_outputs = ("logits", "features")

    def __init__(self, beta: float = 0.1, alpha: float = 0.5, tau: float = 1.0, variant: str = "full",
                 query: str = "teacher", patch_size: int = 2, groups: int | None = None, anchor: int = 2,
                 anchor_weight: float = 1.0, heads: int = 1, temperature: float = 1.0,
                 student_layers: list[int] | None = None, teacher_layers: list[int] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha, tau)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        if query not in ("teacher", "student"):
            raise ValueError(f"query must be 'teacher' or 'student', not {query!r}")
        if beta < 0 or anchor_weight < 0:
            raise ValueError("beta and anchor_weight must be non-negative")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, not {temperature!r}")
        for knob, value in (("patch_size", patch_size), ("anchor", anchor), ("groups", groups), ("heads", heads)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{knob} must be a positive integer, not {value!r}")
        self.beta, self.alpha, self.tau, self.variant, self.query = beta, alpha, tau, variant, query
        self.patch_size, self.groups, self.anchor, self.anchor_weight = patch_size, groups, anchor, anchor_weight
        self.heads, self.temperature = heads, temperature
        check_layer_knobs(student_layers, teacher_layers)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.gamma = nn.ModuleList()
        self.phi = nn.ModuleList()
        self.pairs: list[tuple[int, int]] = []
        self.grids: list[tuple[int, int]] = []
        self.prefix = (0, 0)

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        if self.student_layers is None and self.teacher_layers is None:
            layer_pairs(self.name, student, teachers, None, None)  # the one-line error without a live teacher
            pairs = [(student.depth - 1, teachers[0].depth - 1)]
        else:
            pairs = layer_pairs(self.name, student, teachers, self.student_layers, self.teacher_layers,
                                default_student=[student.depth - 1])
        teacher = teachers[0]
        self.pairs = [(s % student.depth, t % teacher.depth) for s, t in pairs]
        self.prefix = (student.num_prefix_tokens, teacher.num_prefix_tokens)
        self.gamma, self.phi, self.grids = nn.ModuleList(), nn.ModuleList(), []
        for s, t in self.pairs:
            s_layer, t_layer = student.layer(s), teacher.layer(t)
            grid = grid_of(s_layer, student.num_prefix_tokens)
            self._check_grid(grid)
            if t_layer.width % self.heads:
                raise UserError(f"method 'tat': {self.heads} heads do not divide the teacher's width "
                                f"{t_layer.width} at layer {t}; set method.heads to a divisor of {t_layer.width}")
            self.grids.append(grid)
            self.gamma.append(Embed(s_layer.width, t_layer.width))
            self.phi.append(Embed(s_layer.width, t_layer.width))
        self.student_taps = tuple(Tap("block", s) for s in dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = tuple(Tap("block", t) for t in dict.fromkeys(t for _, t in self.pairs))

    def _check_grid(self, grid: tuple[int, int]) -> None:
        h, w = grid
        if self.variant in ("patch_group", "hierarchical"):
            p = self.patch_size
            if h % p or w % p:
                raise UserError(f"method 'tat': patch_size {p} does not divide the student's {h}x{w} grid; use a "
                                f"divisor of {h} (method.patch_size) or variant full/anchor")
            n_patches = (h // p) * (w // p)
            if self.groups is not None and n_patches % self.groups:
                raise UserError(f"method 'tat': {self.groups} groups do not divide the {n_patches} patches of "
                                f"{p}x{p}; set method.groups to a divisor of {n_patches}")
        if self.variant in ("anchor", "hierarchical") and (h % self.anchor or w % self.anchor):
            raise UserError(f"method 'tat': an {self.anchor}x{self.anchor} anchor grid does not divide the "
                            f"student's {h}x{w} grid; set method.anchor to a divisor of {h}")

    def match(self, key: torch.Tensor, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE between the reconfigured student and the teacher; ``key`` is gamma(f^s), ``value`` phi(f^s)."""
        q, k = (target, key) if self.query == "teacher" else (key, target)
        return F.mse_loss(one_to_all(q, k, value, self.temperature), target.float())

    def tat_loss(self, key: torch.Tensor, value: torch.Tensor, target: torch.Tensor,
                 grid: tuple[int, int]) -> torch.Tensor:
        key, value, target = (split_heads(x, self.heads) for x in (key, value, target))
        if self.variant == "full":
            return self.match(key, value, target)
        parts = []
        if self.variant in ("patch_group", "hierarchical"):
            p = self.patch_size
            groups = self.groups or (grid[0] // p) * (grid[1] // p)
            parts.append(self.match(*(group_patches(x, grid, p, groups) for x in (key, value, target))))
        if self.variant in ("anchor", "hierarchical"):
            weight = self.anchor_weight if self.variant == "hierarchical" else 1.0
            parts.append(weight * self.match(*(pool_anchors(x, grid, self.anchor) for x in (key, value, target))))
        return sum(parts)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        outs = heads(student)
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        kd = sum(soft_kl(z, teacher["logits"].detach(), self.tau) for z in outs) / len(outs)
        tat = 0.0
        for (s, t), grid, gamma, phi in zip(self.pairs, self.grids, self.gamma, self.phi):
            f_s = to_tokens(student[f"block.{s}"], grid, self.prefix[0])
            f_t = to_tokens(teacher[f"block.{t}"].detach(), grid, self.prefix[1])
            tat = tat + self.tat_loss(gamma(f_s), phi(f_s), f_t, grid)
        tat = tat / len(self.pairs)
        loss = (1 - self.alpha) * ce + self.alpha * kd + self.beta * tat
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "tat": tat.detach()}
