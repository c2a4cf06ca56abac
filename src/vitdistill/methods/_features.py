"""Shared pieces of the feature-based methods: layer maps from knobs, tokens from feature maps,
projectors.

A ViT block gives tokens ``[B, N, D]`` (prefix tokens first); a CNN stage gives a feature map
``[B, C, H, W]``. Feature methods compare them on a common footing: the student's patch tokens on
their ``h x w`` grid, and the teacher's output brought to that grid (a CNN map is average-pooled
to the student's grid and flattened to tokens, as CNN-to-ViT feature distillation does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import UserError
from vitdistill.models.taps import LayerInfo, ModelInfo, resolve_layer_map


def layer_pairs(method: str, student: ModelInfo, teachers: list[ModelInfo], student_layers: list[int] | None,
                teacher_layers: list[int] | None, default_student: list[int] | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for a feature method, from its knobs or the uniform map.

    ``default_student``: the method's own student layers, which ``teacher_layers`` alone pairs with
    (all blocks when None)."""
    if not teachers:
        raise UserError(f"method '{method}' reads the teacher's intermediate outputs; run it with a live teacher "
                        "(--teacher NAME --teacher-weights FILE), not a teacher cache")
    if student_layers is None and teacher_layers is not None:
        student_layers = default_student
    return resolve_layer_map(student, teachers[0], student_layers, teacher_layers)


def check_layer_knobs(student_layers: object, teacher_layers: object) -> None:
    """``student_layers`` / ``teacher_layers``: unset, or a non-empty list of layer indices."""
    for knob, layers in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if layers is not None and (not isinstance(layers, list | tuple) or not layers
                                   or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"{knob} must be a non-empty list of layer indices, not {layers!r}")


def require_vit(method: str, info: ModelInfo, role: str, serves: str) -> None:
    """One-line error when a method that reads attention or tokens is given a model of feature maps."""
    if info.kind != "vit":
        raise UserError(f"method '{method}' needs a ViT {role} ({info.name} gives feature maps, not tokens, as a CNN "
                        f"or Swin does); it serves {serves}")


def grid_of(layer: LayerInfo, num_prefix_tokens: int) -> tuple[int, int]:
    """The spatial grid of a layer: a feature map's (H, W), or the square grid of a ViT's patch tokens."""
    if len(layer.shape) == 3:
        return layer.shape[1], layer.shape[2]
    n = layer.shape[0] - num_prefix_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(f"layer {layer.path} has {n} patch tokens, not a square grid; feature methods need square "
                        "inputs")
    return side, side


def patch_tokens(x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """A ViT block's patch tokens ``[B, N - prefix, D]`` (class, distillation and register tokens dropped)."""
    return x[:, num_prefix_tokens:]


def to_tokens(x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Any layer output as patch tokens ``[B, h*w, C]`` on ``grid``.

    A CNN map ``[B, C, H, W]`` is average-pooled (or bilinearly resized, when it is smaller) to
    ``grid``; a ViT's tokens lose their prefix and are resized on their own grid when it differs.
    """
    if x.ndim == 3:
        x = patch_tokens(x, num_prefix_tokens)
        side = math.isqrt(x.shape[1])
        if (side, side) == tuple(grid):
            return x
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    if x.shape[-2:] != tuple(grid):
        if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
            x = F.adaptive_avg_pool2d(x, grid)
        else:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def projector(d_in: int, d_out: int, identity_when_equal: bool = False) -> nn.Module:
    """A learned linear map from student width to teacher width (FitNets' regressor)."""
    if identity_when_equal and d_in == d_out:
        return nn.Identity()
    return nn.Linear(d_in, d_out)


class StepRandom(nn.Module):
    """One ``torch.Generator`` per training step, seeded from ``(seed, step)``.

    ``step`` is a buffer, so it is saved in the checkpoint and a resumed run replays the same draws.
    A Python copy is what the draws read, so no step waits on a device-to-host copy of the buffer.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        if not 0 <= seed < 2**31:
            raise ValueError(f"seed must lie in [0, 2^31), not {seed}")
        self.seed = seed
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._step = 0
        self.register_load_state_dict_post_hook(StepRandom._after_load)

    @staticmethod
    def _after_load(module: "StepRandom", incompatible_keys: object) -> None:
        module._step = int(module.step)

    def next(self) -> torch.Generator:
        """The generator of this step; advances the counter.

        torch's CPU generator keeps only the low 32 bits of its seed, so the seed moves the start
        of the step counter, by a multiple of 2654435761 (Knuth's multiplicative hash) modulo 2^32:
        two seeds' streams would meet only after about 2^31 steps. Seed 0 draws as it always has."""
        g = torch.Generator().manual_seed((self.seed * 2654435761 + self._step) % 2**32)
        self._step += 1
        self.step.fill_(self._step)
        return g


def relation_heads(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Queries, keys or values ``[..., H, N, d]`` regrouped into ``heads`` relation heads
    ``[..., heads, N, H * d / heads]``: the model's heads are concatenated along channels, then split
    again, as MiniLMv2 (Wang et al., Findings of ACL 2021, arXiv:2012.15828) and MiniViT's official
    code do. Both sides then have ``heads`` heads, whatever their own counts."""
    *lead, h, n, d = qkv.shape
    if (h * d) % heads:
        raise UserError(f"{h} heads of width {d} ({h * d} channels) do not split into {heads} relation heads; set "
                        "method.relation_heads to a divisor of both models' widths")
    return qkv.transpose(-3, -2).reshape(*lead, n, heads, h * d // heads).transpose(-3, -2)


def check_relation_heads(method: str, heads: int, pairs: list[tuple[LayerInfo, LayerInfo]]) -> None:
    """One-line error at setup when a layer's width does not split into ``heads`` relation heads."""
    for layer in (x for pair in pairs for x in pair):
        if layer.width % heads:
            raise UserError(f"method '{method}': {layer.path} is {layer.width} wide, which does not split into "
                            f"{heads} relation heads; set method.relation_heads to a divisor of both models' widths")
