"""Capture intermediate outputs of timm models without editing them (torchdistill's forward hooks).

A model's *layers* are the points a method can tap, in order:

- a ViT (any timm model with ``blocks`` whose blocks carry ``attn.qkv``): each transformer block;
  a block's output is its token sequence ``[B, N, D]``, prefix tokens (class, distillation,
  registers) first;
- any other timm model (CNNs): the stages named by timm's ``feature_info``, whose outputs are
  feature maps ``[B, C, H, W]``.

Three things can be tapped per layer, named ``"<kind>.<layer>"`` in the outputs a method receives:

- ``block.i``: the layer's output;
- ``attn.i``: the attention probabilities ``softmax(q k^T / sqrt(d))``, ``[B, heads, N, N]``;
- ``qkv.i``: queries, keys and values per head, ``[3, B, heads, N, d]`` (MiniViT's relations).

timm computes attention with fused kernels that never materialise the probabilities, so attention
is rebuilt from the ``qkv`` projection's output, which a hook sees; gradients flow through it to the
student's weights as they do through the model's own attention.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from vitdistill.errors import UserError

KINDS = ("block", "attn", "qkv")


@dataclass(frozen=True)
class Tap:
    """One requested capture: ``kind`` at ``layer`` (an index into the model's layers)."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tap kind must be one of {KINDS}, not {self.kind!r}")

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"


def is_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0 and all(
        hasattr(getattr(b, "attn", None), "qkv") for b in blocks)


def layer_paths(model: nn.Module) -> list[str]:
    """Module paths of the model's tappable layers, in forward order."""
    if is_vit(model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    info = getattr(model, "feature_info", None)
    if info:
        paths = [f["module"] for f in info if isinstance(f, dict) and f.get("module")]
        # timm lists the stem first; distillation taps stages, whose outputs are the usual "features"
        stages = [p for p in paths if not p.startswith(("act", "bn", "conv", "stem"))]
        return stages or paths
    raise UserError(f"cannot find the layers of a {type(model).__name__}: it is neither a timm ViT nor a model "
                    "with timm's feature_info; choose a timm ViT or CNN")


@dataclass
class LayerInfo:
    """Shape facts of one layer, from a probe forward pass."""

    path: str
    shape: tuple[int, ...]  # without the batch dimension
    heads: int | None = None  # ViT layers only

    @property
    def width(self) -> int:
        """Channels of a feature map, or the token width of a ViT block."""
        return self.shape[-1] if len(self.shape) == 2 else self.shape[0]


@dataclass
class ModelInfo:
    """What a method may know of a model when it sets itself up: its kind and its layers' shapes."""

    name: str
    kind: str  # "vit", "cnn", or "cache" (a replayed teacher cache: logits only, no layers)
    layers: list[LayerInfo]
    num_prefix_tokens: int = 0
    num_classes: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> LayerInfo:
        if not -self.depth <= index < self.depth:
            raise UserError(f"layer {index} does not exist in '{self.name}', which has {self.depth} layers "
                            f"(0..{self.depth - 1})")
        return self.layers[index]


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UserError(f"'{type(model).__name__}' has no module '{path}'") from None


def _attention_parts(attn: nn.Module, qkv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = qkv_out.shape
    heads = attn.num_heads
    q, k, v = qkv_out.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the last axis, in float32 for a stable softmax under autocast."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-2, -1)) * scale, dim=-1)


class FeatureTaps:
    """Forward hooks that collect the requested taps of ``model`` on each forward pass.

    Use as ``taps = FeatureTaps(model, [Tap("block", 3)])``, then
    ``with taps.capture(): model(x)`` and ``feats = taps.pop()``.
    Negative layer indices count from the last layer. ``remove()`` detaches the hooks.
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap]) -> None:
        self.taps = tuple(dict.fromkeys(taps))
        self.paths = layer_paths(model)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        self.active = False
        vit = is_vit(model)
        # timm's Swin (and other NHWC models) give stage outputs channels-last; methods read [B, C, H, W]
        self.nhwc = not vit and getattr(model, "output_fmt", "NCHW") == "NHWC"
        for tap in self.taps:
            if not -len(self.paths) <= tap.layer < len(self.paths):
                raise UserError(f"cannot tap layer {tap.layer} of a model with {len(self.paths)} layers "
                                f"({type(model).__name__}); use 0..{len(self.paths) - 1}")
            path = self.paths[tap.layer]
            if tap.kind == "block":
                self._handles.append(_module(model, path).register_forward_hook(self._keep(tap.key)))
            elif not vit:
                raise UserError(f"'{tap.kind}' taps need a ViT (attention maps); {type(model).__name__} is not one")
            else:
                attn = _module(model, path).attn
                if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "q_norm", "k_norm")):
                    raise UserError(f"'{tap.kind}' taps read timm's plain self-attention, and {type(model).__name__}'s "
                                    f"is a {type(attn).__name__}; use block features (hidden, manifold) or another ViT")
                self._handles.append(attn.qkv.register_forward_hook(self._keep_attention(tap, attn)))

    @contextlib.contextmanager
    def capture(self):
        """Capture only inside this block, so evaluation and profiling pay nothing for the hooks."""
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def _keep(self, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.active:
                if self.nhwc and isinstance(output, torch.Tensor) and output.dim() == 4:
                    output = output.permute(0, 3, 1, 2)
                self._store[key] = output
        return hook

    def _keep_attention(self, tap: Tap, attn: nn.Module):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.active:
                return
            q, k, v = _attention_parts(attn, output)
            self._store[tap.key] = attention_probs(q, k) if tap.kind == "attn" else torch.stack((q, k, v))
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The captures of the last forward pass, keyed ``kind.layer`` as requested; clears the store."""
        out, self._store = self._store, {}
        missing = [t.key for t in self.taps if t.key not in out]
        if missing:
            raise RuntimeError(f"taps {missing} saw no forward pass")
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def describe(model: nn.Module, name: str, input_size: tuple[int, int, int], num_classes: int = 0) -> ModelInfo:
    """Probe ``model`` with one zero image to learn its layers' shapes, for a method's set-up."""
    vit = is_vit(model)
    paths = layer_paths(model)
    taps = FeatureTaps(model, [Tap("block", i) for i in range(len(paths))])
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with taps.capture():
            try:
                model(torch.zeros((1, *input_size), device=device))
            except RuntimeError as exc:  # e.g. a CNN whose strides leave nothing of a tiny image
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"'{name}' cannot run on {'x'.join(map(str, input_size))} inputs: {why}; use a larger "
                                "data.img_size or other model overrides") from None
        feats = taps.pop()
    finally:
        taps.remove()
        model.train(was_training)
    layers = []
    for i, path in enumerate(paths):
        out = feats[f"block.{i}"]
        out = out[0] if isinstance(out, (tuple, list)) else out
        heads = _module(model, path).attn.num_heads if vit else None
        layers.append(LayerInfo(path, tuple(out.shape[1:]), heads))
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if vit else 0
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if vit and grid is not None and layers and len(layers[0].shape) == 2:
        # measured, not trusted: CaiT and XCiT count a class token their `blocks` never carry (a probe
        # at another size than the model's grid, under dynamic_img_size, keeps timm's count)
        measured = layers[0].shape[0] - int(grid[0]) * int(grid[1])
        prefix = measured if 0 <= measured <= prefix else prefix
    return ModelInfo(name=name, kind="vit" if vit else "cnn", layers=layers, num_prefix_tokens=prefix,
                     num_classes=num_classes)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each of ``student_layers`` student layers, spread evenly, last to last.

    Student layer i of S takes teacher layer round((i + 1) * T / S) - 1, the uniform strategy of
    TinyBERT and MiniLM; with S == T it is the identity. Halves round up, in integers: Python's
    round() sends them to the even neighbour, which spaces 4 layers onto 6 as [1, 2, 3, 5].
    """
    if student_layers < 1 or teacher_layers < 1:
        raise UserError("a layer mapping needs at least one layer on each side")
    s, t = student_layers, teacher_layers
    return [max(0, (2 * (i + 1) * t + s) // (2 * s) - 1) for i in range(s)]


def resolve_layer_map(
    student: ModelInfo, teacher: ModelInfo, student_layers: list[int] | None, teacher_layers: list[int] | None
) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer) from the config, or the uniform map when not given.

    ``student_layers`` alone maps those student layers uniformly onto the teacher's; both given must
    have the same length. Indices may be negative. Impossible maps are one-line errors.
    """
    s_layers = list(range(student.depth)) if student_layers is None else list(student_layers)
    for i in s_layers:
        student.layer(i)
    if teacher_layers is None:
        # several student layers may share one teacher layer when the student is deeper
        full = uniform_layer_map(student.depth, teacher.depth)
        return [(i, full[i % student.depth]) for i in s_layers]
    t_layers = list(teacher_layers)
    if len(t_layers) != len(s_layers):
        raise UserError(f"layer map: {len(s_layers)} student layers but {len(t_layers)} teacher layers; give lists "
                        "of the same length")
    for j in t_layers:
        teacher.layer(j)
    return list(zip(s_layers, t_layers))
