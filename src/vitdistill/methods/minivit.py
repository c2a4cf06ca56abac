"""``minivit``: MiniViT, weight multiplexing plus weight distillation.

Zhang, Peng, Wu, Liu, Xiao, Fu, Yuan. *MiniViT: Compressing Vision Transformers with Weight
Multiplexing*. CVPR 2022, arXiv:2204.07154.

**Weight multiplexing** (:func:`multiplex`, run by :meth:`MiniViT.adapt_student`). Consecutive blocks
are grouped ``share`` at a time (the last group is shorter when the depth is not a multiple); all
blocks of a group use the same ``qkv``, ``proj``, ``fc1`` and ``fc2`` weights, initialised from the
first block of the group. Each block keeps its own LayerNorms (and LayerScale) and gets two cheap
weight transformations that make the blocks of a group differ:

- attention (talking-heads style), with per-block ``F1, F2`` in R^{H x H} mixing the heads:
  ``A'_h = sum_g F1[h, g] * Q_g K_g^T / sqrt(d)``,  ``P_h = sum_g F2[h, g] * softmax(A'_g)``,
  ``O_h = P_h V_h``;
- MLP: a per-block depth-wise ``k x k`` convolution ``C`` on the MLP's input tokens laid on their
  patch grid (prefix tokens bypass it), as a residual: ``MLP(Y + C(Y))``.

``F1 = F2 = I`` and ``C = 0`` at the start, so the multiplexed student first computes exactly what the
weight-shared student computes; the transformations then learn per block. (The official code starts
them from a small random init, and puts the convolution, with an extra LayerNorm, on the residual
stream before the MLP; inside the branch the residual path, and so a pretrained student, is kept.)

**Weight distillation** from a ViT teacher on the last block (or the pairs given by
``student_layers`` / ``teacher_layers``):

    L = ce_weight * CE(z_cls, y) + L_pred + beta * L_attn + gamma * L_hddn
    L_pred = tau^2 * KL(softmax(z_t / tau) || softmax(z_kd / tau))         (batch mean)
    L_attn = 1/9 sum_{i,j in {Q,K,V}} KL(R^t_ij || R^s_ij),  R_ij = softmax(X_i X_j^T / sqrt(d)) per head
    L_hddn = KL(R^t_H || R^s_H),  R_H = softmax(H_h H_h^T / sqrt(D / heads)), H split into the heads

Both relation terms are the paper's equations. L_attn is also what Mini-Swin's official code computes
(Cream's Mini-DeiT distils with DeiT's soft loss alone); for the hidden states that code uses another
form, the squared difference of cosine-similarity maps of the L2-normalised tokens, summed over a
row (its "* 49" is a Swin window's 49 tokens) and averaged over batch and rows:

    L_hddn (hidden_relation = "cosine") = 1/(B N) sum_{b,i,j} (cos_S(h_i, h_j) - cos_T(h_i, h_j))^2

``hidden_relation="cosine"`` selects it (no heads there; its gamma of 0.1 is the official weight for
this form, while for the KL form it is our default). The tau^2 of L_pred is Hinton's, not in
Mini-Swin's code, and changes nothing at the default tau = 1.
KLs are taken row by row and averaged over batch, heads and rows (the official code's mean). By
default the relations are per head of the models, which needs equal head counts; ``relation_heads=R``
concatenates each side's heads along channels and splits them into R relation heads (MiniLMv2's
relation heads, as MiniViT's official code does; its scripts use R = 1), so the head counts may
differ. The hidden states are split into the same R heads.
``z_kd`` is the distillation head when the student has DeiT's distillation token, else the class
head. The paper's objective is the last three terms (``ce_weight = 0``); the label term keeps a
class head trained. Relations compare the class token (when both models have one) and the patch
tokens; other prefix tokens (distillation token, registers) are left out, so the token sets match.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import UserError
from vitdistill.methods._features import (check_layer_knobs, check_relation_heads, layer_pairs,
                                          relation_heads as regroup, require_vit)
from vitdistill.methods.base import METHODS, Method, Outputs, soft_kl
from vitdistill.models.taps import ModelInfo, Tap

SERVES = ("a timm ViT student with a ViT teacher of the same patch grid (and the same head count, unless "
          "method.relation_heads is set)")


# ---------------------------------------------------------------- weight multiplexing


class SharedLinear(nn.Linear):
    """A block's handle on a Linear owned by its group: it computes and is hooked like its own Linear
    (``blocks[i].attn.qkv`` feeds the attention taps of block i only) but holds no parameters, so
    ``parameters()`` and ``state_dict()`` hold each shared weight once, under the group's key, and
    safetensors sees no tensors sharing memory."""

    def __init__(self, owner: nn.Linear) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "owner", owner)  # not a submodule: the group registers it once
        self.in_features, self.out_features = owner.in_features, owner.out_features

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self.owner.weight

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.owner.bias


class GroupWeights(nn.Module):
    """The weights one group of blocks shares, taken from the group's first block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj = block.attn.qkv, block.attn.proj
        self.fc1, self.fc2 = block.mlp.fc1, block.mlp.fc2


class MultiplexedAttention(nn.Module):
    """timm's Attention on shared qkv/proj, with MiniViT's head mixing before and after the softmax."""

    def __init__(self, attn: nn.Module, group: GroupWeights) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv = SharedLinear(group.qkv)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.proj = SharedLinear(group.proj)
        self.proj_drop = attn.proj_drop
        eye = torch.eye(self.num_heads, device=group.qkv.weight.device, dtype=group.qkv.weight.dtype)
        self.mix_logits = nn.Parameter(eye.clone())  # F1
        self.mix_probs = nn.Parameter(eye.clone())  # F2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError("MiniViT's multiplexed attention has no causal mode")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = torch.einsum("hg,bgnm->bhnm", self.mix_logits, (q * self.scale) @ k.transpose(-2, -1))
        if attn_mask is not None:  # after the mixing, so masked keys stay masked
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        probs = torch.einsum("hg,bgnm->bhnm", self.mix_probs, logits.softmax(dim=-1))
        out = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(self.norm(out)))


class MultiplexedMlp(nn.Module):
    """timm's Mlp on shared fc1/fc2, after a per-block depth-wise convolution of its input tokens."""

    def __init__(self, mlp: nn.Module, group: GroupWeights, kernel_size: int, num_prefix_tokens: int,
                 grid: tuple[int, int] | None) -> None:
        super().__init__()
        dim = group.fc1.in_features
        w = group.fc1.weight
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=w.device,
                                dtype=w.dtype)
        nn.init.zeros_(self.dwconv.weight)  # identity at the start: the shared MLP as it was
        nn.init.zeros_(self.dwconv.bias)
        self.fc1 = SharedLinear(group.fc1)
        self.act, self.drop1, self.norm = mlp.act, mlp.drop1, mlp.norm
        self.fc2 = SharedLinear(group.fc2)
        self.drop2 = mlp.drop2
        self.num_prefix_tokens, self.grid = num_prefix_tokens, grid

    def local(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        patches = x[:, p:]
        b, n, c = patches.shape
        h, w = self.grid if self.grid and self.grid[0] * self.grid[1] == n else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise RuntimeError(f"MiniViT's MLP transformation needs the patch tokens on a grid; got {n} tokens")
        mixed = self.dwconv(patches.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return torch.cat((x[:, :p], patches + mixed), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(self.local(x))))
        return self.drop2(self.fc2(self.norm(x)))


class MultiplexedBlock(nn.Module):
    """A pre-norm ViT block whose attention and MLP weights belong to its group; its norms are its own."""

    def __init__(self, block: nn.Module, attn: MultiplexedAttention, mlp: MultiplexedMlp) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, mlp, block.ls2, block.drop_path2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _check_blocks(model: nn.Module, name: str) -> list[nn.Module]:
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise UserError(f"method 'minivit' shares the weights of a ViT's blocks and '{name}' has none; it serves "
                        f"{SERVES} (e.g. vit_femto_patch4_16, deit_femto_distilled_patch4_16, timm vit_*/deit_*)")
    for i, blk in enumerate(blocks):
        plain = isinstance(blk, Block) and type(blk.attn) is Attention and type(blk.mlp) is Mlp \
            and getattr(blk.attn, "gate", None) is None
        if not plain:
            raise UserError(f"method 'minivit' needs timm's standard ViT blocks (Block, Attention, Mlp), and block {i} "
                            f"of '{name}' is a {type(blk).__name__}; it serves {SERVES}")
    shapes = {(b.attn.qkv.weight.shape, b.mlp.fc1.weight.shape, b.mlp.fc2.weight.shape) for b in blocks}
    if len(shapes) > 1:
        raise UserError(f"method 'minivit' shares weights between blocks of one shape, and '{name}' mixes block "
                        "widths; use a ViT whose blocks all have the same width")
    return list(blocks)


def multiplex(model: nn.Module, share: int = 2, kernel_size: int = 7, name: str = "student") -> nn.Module:
    """Make ``model``'s consecutive blocks share weights ``share`` at a time, in place, and return it.

    The shared Linears live once in ``model.minivit_groups[g]`` (keys ``minivit_groups.g.qkv.weight``
    ...); each block's ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` are handles on them.
    """
    if isinstance(getattr(model, "minivit_groups", None), nn.ModuleList):
        return model  # already multiplexed
    blocks = _check_blocks(model, name)
    groups = nn.ModuleList(GroupWeights(blocks[g]) for g in range(0, len(blocks), share))
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    grid = tuple(grid) if grid is not None else None
    new = []
    for i, blk in enumerate(blocks):
        group = groups[i // share]
        new.append(MultiplexedBlock(blk, MultiplexedAttention(blk.attn, group),
                                    MultiplexedMlp(blk.mlp, group, kernel_size, prefix, grid)))
    model.minivit_groups = groups
    model.blocks = nn.Sequential(*new)
    return model


# ---------------------------------------------------------------- weight distillation


def _row_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per row of the last axis, averaged over all rows."""
    log_s, log_t = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    rows = student_logits.numel() // student_logits.shape[-1]
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) / rows


def _relation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.transpose(-2, -1) / math.sqrt(a.shape[-1])  # relation logits; softmax is in _row_kl


def qkv_relation_kl(s_qkv: torch.Tensor, t_qkv: torch.Tensor) -> torch.Tensor:
    """MiniViT's self-attention distillation: the mean over the 9 pairs (i, j) of {Q, K, V} of the KL
    between the teacher's and the student's relations softmax(X_i X_j^T / sqrt(d)), per head.

    Inputs are ``[3, B, H, N, d]`` (the ``qkv`` tap); student and teacher may differ in ``d``.
    """
    with torch.autocast(s_qkv.device.type, enabled=False):
        s, t = s_qkv.float(), t_qkv.float()
        return sum(_row_kl(_relation(s[i], s[j]), _relation(t[i], t[j])) for i in range(3) for j in range(3)) / 9


def hidden_relation_kl(s_hidden: torch.Tensor, t_hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniViT's hidden-state distillation: KL between the relations softmax(H_h H_h^T / sqrt(D/heads))
    of the teacher's and the student's hidden states ``[B, N, D]``, split into ``heads`` heads."""
    def split(x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if d % heads:
            raise UserError(f"hidden width {d} does not split into {heads} heads")
        return x.reshape(b, n, heads, d // heads).transpose(1, 2)

    with torch.autocast(s_hidden.device.type, enabled=False):
        s, t = split(s_hidden.float()), split(t_hidden.float())
        return _row_kl(_relation(s, s), _relation(t, t))


def hidden_relation_cosine(s_hidden: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
    """Mini-Swin's official hidden-state loss on ``[B, N, D]`` tokens: the squared difference of the
    two models' cosine-similarity maps, summed over each row and averaged over batch and rows."""
    with torch.autocast(s_hidden.device.type, enabled=False):
        s, t = F.normalize(s_hidden.float(), dim=-1), F.normalize(t_hidden.float(), dim=-1)
        diff = s @ s.transpose(-2, -1) - t @ t.transpose(-2, -1)
        return diff.pow(2).sum(-1).mean()


def _tokens(x: torch.Tensor, prefix: int, keep_cls: bool) -> torch.Tensor:
    """The tokens the relations compare (axis -2): the class token when both models have one, and
    the patch tokens."""
    patches = x[..., prefix:, :]
    return torch.cat((x[..., :1, :], patches), dim=-2) if keep_cls else patches


@METHODS.register("minivit")
class MiniViT(Method):
    name = "minivit"
    summary = "weight multiplexing (blocks share weights, per-block transforms) + attention/hidden relation KD"
    paper = "Zhang et al. 2022, MiniViT: Compressing Vision Transformers with Weight Multiplexing"
    teacher_outputs = ("logits", "features")

    def __init__(
        self,
        share: int = 2,
        kernel_size: int = 7,
        tau: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.1,
        ce_weight: float = 1.0,
        student_layers: list[int] | None = None,
        teacher_layers: list[int] | None = None,
        relation_heads: int | None = None,
        hidden_relation: str = "kl",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(label_smoothing)
        if isinstance(share, bool) or not isinstance(share, int) or share < 1:
            raise ValueError(f"share must be an integer >= 1 (blocks per weight group), not {share!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, not {kernel_size!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, not {tau}")
        for knob, value in (("beta", beta), ("gamma", gamma), ("ce_weight", ce_weight)):
            if value < 0:
                raise ValueError(f"{knob} must be >= 0, not {value}")
        if relation_heads is not None and (isinstance(relation_heads, bool) or not isinstance(relation_heads, int)
                                           or relation_heads < 1):
            raise ValueError(f"relation_heads must be an integer >= 1 or null, not {relation_heads!r}")
        if hidden_relation not in ("kl", "cosine"):
            raise ValueError(f"hidden_relation must be 'kl' (the paper's) or 'cosine' (Mini-Swin's code), "
                             f"not {hidden_relation!r}")
        self.relation_heads, self.hidden_relation = relation_heads, hidden_relation
        self.share, self.kernel_size, self.tau = share, kernel_size, tau
        self.beta, self.gamma, self.ce_weight = beta, gamma, ce_weight
        check_layer_knobs(student_layers, teacher_layers)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.pairs: list[tuple[int, int]] = []
        self.heads = 0
        self.prefix = (0, 0)
        self.keep_cls = False

    def adapt_student(self, student: nn.Module, student_name: str) -> nn.Module:
        return multiplex(student, self.share, self.kernel_size, student_name)

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        if not teachers:
            raise UserError("method 'minivit' reads the teacher's queries, keys, values and hidden states; run it "
                            "with a live ViT teacher (--teacher NAME --teacher-weights FILE), not a teacher cache")
        teacher = teachers[0]
        require_vit(self.name, student, "student", SERVES)
        require_vit(self.name, teacher, "teacher", SERVES)
        if self.student_layers is None and self.teacher_layers is None:
            pairs = [(student.depth - 1, teacher.depth - 1)]
        else:
            pairs = layer_pairs(self.name, student, teachers, self.student_layers, self.teacher_layers,
                                default_student=[student.depth - 1])
        pairs = [(s % student.depth, t % teacher.depth) for s, t in pairs]
        if not pairs:
            raise UserError("method 'minivit' needs at least one layer pair; leave student_layers/teacher_layers unset "
                            "for the last block")
        s_pre, t_pre = student.num_prefix_tokens, teacher.num_prefix_tokens
        for s, t in pairs:
            sl, tl = student.layer(s), teacher.layer(t)
            if sl.heads != tl.heads and self.relation_heads is None:
                raise UserError(f"method 'minivit' compares attention relations head by head: student layer {s} has "
                                f"{sl.heads} heads, teacher layer {t} has {tl.heads}; set method.relation_heads=N to "
                                f"regroup both into N heads, or use a teacher with {sl.heads} heads")
            if sl.shape[0] - s_pre != tl.shape[0] - t_pre:
                raise UserError(f"method 'minivit' compares token relations: the student has {sl.shape[0] - s_pre} "
                                f"patch tokens, the teacher {tl.shape[0] - t_pre}; it serves {SERVES}")
        if self.relation_heads is not None:
            check_relation_heads(self.name, self.relation_heads, [(student.layer(s), teacher.layer(t)) for s, t in pairs])
        self.pairs = pairs
        self.heads = self.relation_heads or student.layer(pairs[0][0]).heads
        self.prefix, self.keep_cls = (s_pre, t_pre), min(s_pre, t_pre) >= 1
        self.student_taps = tuple(Tap(kind, s) for s, _ in pairs for kind in ("qkv", "block"))
        self.teacher_taps = tuple(Tap(kind, t) for _, t in pairs for kind in ("qkv", "block"))

    def _regroup(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv if self.relation_heads is None else regroup(qkv, self.relation_heads)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        teacher = {k: v.detach() for k, v in teacher.items()}
        z = student["logits"]
        ce = self.ce(z, target)
        pred = soft_kl(student.get("dist_logits", z), teacher["logits"], self.tau)
        (sp, tp), keep = self.prefix, self.keep_cls
        attn = sum(qkv_relation_kl(self._regroup(_tokens(student[f"qkv.{s}"], sp, keep)),
                                   self._regroup(_tokens(teacher[f"qkv.{t}"], tp, keep)))
                   for s, t in self.pairs) / len(self.pairs)
        def hidden(s_hidden: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
            if self.hidden_relation == "cosine":
                return hidden_relation_cosine(s_hidden, t_hidden)
            return hidden_relation_kl(s_hidden, t_hidden, self.heads)

        hddn = sum(hidden(_tokens(student[f"block.{s}"], sp, keep), _tokens(teacher[f"block.{t}"], tp, keep))
                   for s, t in self.pairs) / len(self.pairs)
        loss = self.ce_weight * ce + pred + self.beta * attn + self.gamma * hddn
        return {"loss": loss, "ce": ce.detach(), "pred": pred.detach(), "attn": attn.detach(),
                "hddn": hddn.detach()}
