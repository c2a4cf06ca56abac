"""``attention``: attention distillation between ViTs, as attention maps or as MiniViT's Q/K/V relations.

**Attention transfer** (``target="attn"``, the default), as in TinyBERT (Jiao et al., Findings of
EMNLP 2020, arXiv:1909.10351) and MiniLM's self-attention distribution transfer: for each mapped
pair (student block m, teacher block l),

    L_attn = 1 / (B H N) * sum_{b, h, n} KL( A^t_{l,h}[b, n, :] || A^s_{m,h}[b, n, :] )

with A = softmax(Q K^T / sqrt(d)) the attention probabilities ``[B, H, N, N]``: the KL is summed over
keys and averaged over queries, heads and batch (:func:`attention_kl`). ``loss="mse"`` uses instead
the mean squared difference of the probabilities over all their elements (TinyBERT takes the MSE of
pre-softmax scores; the taps give probabilities, so this is the MSE of those).

**Relation transfer** (``target="qkv"``), MiniViT's attention-level weight distillation (Zhang, Peng,
Wu, Liu, Xiao, Fu, Yuan, *MiniViT: Compressing Vision Transformers with Weight Multiplexing*, CVPR
2022, arXiv:2204.07154; after MiniLMv2). With A_1, A_2, A_3 = Q, K, V per head,

    R_ij = softmax(A_i A_j^T / sqrt(d)),   L_attn = 1 / |P| * sum_{(i,j) in P} KL( R^t_ij || R^s_ij )

averaged like the attention KL (:func:`relation_kl`). ``relations="all"`` takes the nine pairs of
MiniViT's equation (and official code); ``relations="self"`` only Q-Q, K-K, V-V. Each side scales by
its own head width d, so the widths may differ; the relations are N x N, and they are compared head
by head, so by default the head counts must match. ``relation_heads=R`` instead concatenates each
side's heads along channels and splits them into R relation heads of width C / R (MiniLMv2's
relation heads, which MiniViT's official code uses), so the head counts may differ;
``heads="average"`` averages the relation maps over heads instead.

The objective, with the soft-logit term of Hinton et al. 2015 off by default (``alpha = 0``):

    L = (1 - alpha) * CE(z_s, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))
        + beta * mean over pairs of L_attn

**Heads.** ``heads="aligned"`` compares head h with head h (equal counts required); ``"average"``
averages the probability maps over heads on each side first (a mean of distributions is a
distribution); ``"auto"`` is aligned when the counts match, else average (for ``target="qkv"``,
unequal counts under ``auto`` are an error unless ``relation_heads`` is set).

**Tokens.** Both models need the same patch grid. When their prefix tokens differ (a DeiT student
with a distillation token under a plain ViT teacher), only patch-to-patch attention is compared:
prefix rows and columns are dropped and each row is renormalised to sum to 1 (for relations, the
prefix tokens are dropped before the softmax, which is the same thing).

**Layers.** By default every student block is mapped uniformly onto the teacher's (TinyBERT); for
``target="qkv"`` the default is the last block of each, as MiniViT distils the last layer only.
``student_layers`` / ``teacher_layers`` set the map explicitly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdistill.errors import UserError
from vitdistill.methods._features import (check_layer_knobs, check_relation_heads, layer_pairs, relation_heads,
                                          require_vit)
from vitdistill.methods.base import METHODS, Method, Outputs, check_weights, heads as head_outputs, soft_kl
from vitdistill.models.taps import ModelInfo, Tap

SERVES = "a ViT student with a ViT teacher on the same patch grid"


def attention_kl(s_attn: torch.Tensor, t_attn: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over batch, heads and queries of KL(A_t || A_s) summed over keys.

    Both are attention probabilities ``[B, H, N, N]`` (rows sum to 1) of the same shape. Computed in
    float32 at least; a student probability that underflowed to 0 is clamped to ``eps`` so the loss
    stays finite, while teacher zeros contribute exactly 0 (0 log 0 = 0).
    """
    if s_attn.shape != t_attn.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(s_attn.shape)}, "
                         f"teacher {tuple(t_attn.shape)}")
    dt = torch.promote_types(torch.promote_types(s_attn.dtype, t_attn.dtype), torch.float32)
    s, t = s_attn.to(dt), t_attn.to(dt)
    kl = torch.xlogy(t, t) - t * torch.log(s.clamp_min(eps))
    return kl.sum(-1).mean()


def relation_logits(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x y^T / sqrt(d) per head, ``[..., N, d] -> [..., N, N]`` (y defaults to x), in float32 at least."""
    y = x if y is None else y
    dt = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dt) @ y.to(dt).transpose(-2, -1)) * x.shape[-1] ** -0.5


def relation_pairs(pairs: str) -> list[tuple[int, int]]:
    """Indices (i, j) into (Q, K, V) of the relations: ``"self"`` the three diagonal, ``"all"`` all nine."""
    if pairs == "self":
        return [(i, i) for i in range(3)]
    if pairs == "all":
        return [(i, j) for i in range(3) for j in range(3)]
    raise ValueError(f"relations must be 'self' or 'all', not {pairs!r}")


def relation_kl(s_qkv: torch.Tensor, t_qkv: torch.Tensor, pairs: str = "self") -> torch.Tensor:
    """MiniViT's attention-relation loss between stacked queries, keys and values ``[3, B, H, N, d]``.

    R_ij = softmax(A_i A_j^T / sqrt(d)) per head, with A_1, A_2, A_3 = Q, K, V and d each side's own
    head width (so student and teacher may differ in d, not in B, H or N). Returns the mean over the
    relations of KL(R^t_ij || R^s_ij) (summed over the last axis, averaged over batch, heads, rows).
    ``pairs="self"``: the Q-Q, K-K, V-V relations; ``pairs="all"``: all nine (i, j), as in MiniViT's
    equation for L_attn and its official code.
    """
    ij = relation_pairs(pairs)
    if s_qkv.shape[:-1] != t_qkv.shape[:-1] or s_qkv.shape[0] != 3 or s_qkv.ndim != 5:
        raise ValueError(f"qkv stacks must be [3, B, H, N, d] with equal B, H, N: student {tuple(s_qkv.shape)}, "
                         f"teacher {tuple(t_qkv.shape)}")
    total = 0
    for i, j in ij:
        # log_softmax of the logits is exact where softmax-then-log would underflow
        log_s = F.log_softmax(relation_logits(s_qkv[i], s_qkv[j]), dim=-1)
        log_t = F.log_softmax(relation_logits(t_qkv[i], t_qkv[j]), dim=-1)
        total = total + F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean()
    return total / len(ij)


def patch_attention(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Patch-to-patch attention: prefix rows and columns dropped, rows renormalised to sum to 1."""
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


@METHODS.register("attention")
class AttentionDistill(Method):
    name = "attention"
    summary = "student self-attention maps (or MiniViT Q/K/V relations) matched to the teacher's by KL"
    paper = ("Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding; Zhang et al. 2022, "
             "MiniViT: Compressing Vision Transformers with Weight Multiplexing")
    teacher_outputs = ("logits", "features")

    def __init__(self, beta: float = 1.0, loss: str = "kl", heads: str = "auto", target: str = "attn",
                 relations: str = "all", relation_heads: int | None = None, alpha: float = 0.0, tau: float = 4.0,
                 student_layers: list[int] | None = None, teacher_layers: list[int] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        check_weights(alpha, tau)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, not {beta}")
        for knob, value, allowed in (("loss", loss, ("kl", "mse")), ("heads", heads, ("auto", "average", "aligned")),
                                     ("target", target, ("attn", "qkv"))):
            if value not in allowed:
                raise ValueError(f"{knob} must be one of {', '.join(allowed)}; not {value!r}")
        relation_pairs(relations)  # raises on a bad value
        self.relations = relations
        if relation_heads is not None:
            if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
                raise ValueError(f"relation_heads must be an integer >= 1 or null, not {relation_heads!r}")
            if target != "qkv" or heads == "average":
                raise ValueError("relation_heads regroups queries, keys and values into heads: it needs target=qkv "
                                 "and heads auto or aligned")
        self.relation_heads = relation_heads
        check_layer_knobs(student_layers, teacher_layers)
        self.beta, self.loss, self.heads, self.target = beta, loss, heads, target
        self.alpha, self.tau = alpha, tau
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        # set by setup
        self.pairs: list[tuple[int, int]] = []
        self.average_heads = False
        self.prefix: tuple[int, int] = (0, 0)  # prefix tokens dropped (student, teacher); (0, 0) when they match

    def setup(self, student: ModelInfo, teachers: list[ModelInfo]) -> None:
        require_vit(self.name, student, "student", SERVES)
        if teachers:  # none is an error of layer_pairs (a teacher cache)
            require_vit(self.name, teachers[0], "teacher", SERVES)
        s_layers, t_layers = self.student_layers, self.teacher_layers
        if self.target == "qkv" and s_layers is None and t_layers is None and teachers:
            s_layers, t_layers = [student.depth - 1], [teachers[0].depth - 1]
        pairs = layer_pairs(self.name, student, teachers, s_layers, t_layers,
                            default_student=[student.depth - 1] if self.target == "qkv" else None)
        teacher = teachers[0]
        self.pairs = [(i % student.depth, j % teacher.depth) for i, j in pairs]

        ps, pt = student.num_prefix_tokens, teacher.num_prefix_tokens
        s_layer, t_layer = student.layer(self.pairs[0][0]), teacher.layer(self.pairs[0][1])
        s_patches, t_patches = s_layer.shape[0] - ps, t_layer.shape[0] - pt
        if s_patches != t_patches:
            raise UserError(f"method '{self.name}' compares token-to-token attention, so both models need the same "
                            f"patch grid: the student has {s_patches} patch tokens, the teacher {t_patches}; it serves "
                            f"{SERVES} (same image size / patch size ratio)")
        self.prefix = (0, 0) if ps == pt else (ps, pt)

        if self.relation_heads is not None:
            check_relation_heads(self.name, self.relation_heads,
                                 [(student.layer(i), teacher.layer(j)) for i, j in self.pairs])
        counts = {(student.layer(i).heads, teacher.layer(j).heads) for i, j in self.pairs}
        unequal = [] if self.relation_heads is not None else [c for c in counts if c[0] != c[1]]
        if unequal and (self.heads == "aligned" or (self.heads == "auto" and self.target == "qkv")):
            hs, ht = unequal[0]
            why = ("MiniViT's relation distillation (target=qkv) compares head by head"
                   if self.target == "qkv" else "heads=aligned compares head by head")
            raise UserError(f"method '{self.name}': {why}, but the student has {hs} heads and the teacher {ht}; use a "
                            f"student with {ht} heads or set method.heads=average"
                            + (" or method.relation_heads=N (heads regrouped into N)" if self.target == "qkv" else ""))
        self.average_heads = self.heads == "average" or bool(unequal)

        kind = "attn" if self.target == "attn" else "qkv"
        self.student_taps = tuple(dict.fromkeys(Tap(kind, i) for i, _ in self.pairs))
        self.teacher_taps = tuple(dict.fromkeys(Tap(kind, j) for _, j in self.pairs))

    def maps(self, s: torch.Tensor, t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The probability maps ``[B, H, N, N]`` compared for one layer pair, student's then teacher's."""
        ps, pt = self.prefix
        if self.target == "attn":
            if ps or pt:
                return [(patch_attention(s, ps), patch_attention(t, pt))]
            return [(s, t)]
        s, t = s[..., ps:, :], t[..., pt:, :]
        return [(torch.softmax(relation_logits(s[i], s[j]), -1), torch.softmax(relation_logits(t[i], t[j]), -1))
                for i, j in relation_pairs(self.relations)]

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_attn for one layer pair from the student's and teacher's taps (``attn.*`` or ``qkv.*``)."""
        t = t.detach()
        if self.relation_heads is not None:
            s, t = relation_heads(s, self.relation_heads), relation_heads(t, self.relation_heads)
        if self.target == "qkv" and self.loss == "kl" and not self.average_heads:
            # the log-space path: exact even where a relation probability underflows
            ps, pt = self.prefix
            return relation_kl(s[..., ps:, :], t[..., pt:, :], self.relations)
        total = 0
        maps = self.maps(s, t)
        for a_s, a_t in maps:
            if self.average_heads:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            total = total + (attention_kl(a_s, a_t) if self.loss == "kl" else F.mse_loss(a_s.float(), a_t.float()))
        return total / len(maps)

    def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor) -> Outputs:
        assert teacher is not None
        kind = "attn" if self.target == "attn" else "qkv"
        feat = sum(self.pair_loss(student[f"{kind}.{i}"], teacher[f"{kind}.{j}"]) for i, j in self.pairs)
        feat = feat / len(self.pairs)
        outs = head_outputs(student)
        ce = sum(self.ce(z, target) for z in outs) / len(outs)
        loss = (1 - self.alpha) * ce + self.beta * feat
        parts = {"ce": ce.detach(), kind: feat.detach()}
        if self.alpha > 0:
            kd = sum(soft_kl(z, teacher["logits"].detach(), self.tau) for z in outs) / len(outs)
            loss = loss + self.alpha * kd
            parts["kd"] = kd.detach()
        return {"loss": loss, **parts}
