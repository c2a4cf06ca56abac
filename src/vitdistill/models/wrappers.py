"""How the engine talks to models: input preparation, the student's outputs, the frozen teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdistill.models.factory import expected_input_size, normalization
from vitdistill.models.taps import FeatureTaps, Tap


class InputPrep(torch.nn.Module):
    """uint8 images -> the float input a model expects (its own resolution, mean and std).

    Student and teacher each get their own, so a teacher trained with other statistics or at
    another resolution than the student is fed what it was trained on.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int | None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.size = size
        # what a teacher cache records of its teacher: the same weights fed other input are another teacher
        self.spec = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "size": size}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "InputPrep":
        mean, std = normalization(model)
        return cls(mean, std, expected_input_size(model))


def has_dist_token(model: torch.nn.Module) -> bool:
    """True for students with DeiT's distillation token and head (timm's VisionTransformerDistilled)."""
    return hasattr(model, "head_dist") and hasattr(model, "set_distilled_training")


def prepare_student(model: torch.nn.Module) -> None:
    # timm returns both heads only when asked; at eval it averages them, which is DeiT's inference rule.
    if has_dist_token(model):
        model.set_distilled_training(True)


def name_heads(out: torch.Tensor | tuple | list) -> dict[str, torch.Tensor]:
    """Name a model's classifier outputs: the class head ``logits``, then ``dist_logits`` (DeiT's
    distillation token) and ``dist_logits.1``, ``dist_logits.2``... for students with more tokens."""
    if not isinstance(out, (tuple, list)):
        return {"logits": out}
    named = {"logits": out[0]}
    for i, extra in enumerate(out[1:]):
        named["dist_logits" if i == 0 else f"dist_logits.{i}"] = extra
    return named


def student_outputs(model: torch.nn.Module, x: torch.Tensor, taps: FeatureTaps | None = None) -> dict[str, torch.Tensor]:
    """Run the student in training mode and name its outputs (heads, then taps) for the method."""
    if taps is None or not taps.taps:
        return name_heads(model(x))
    with taps.capture():
        out = name_heads(model(x))
    out.update(taps.pop())
    return out


class Teacher(torch.nn.Module):
    """A frozen teacher: always eval mode, no gradient, fed its own input preparation.

    Returns ``{"logits"}`` plus the captures a method asked for with :meth:`tap`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.prep = InputPrep.for_model(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.taps: FeatureTaps | None = None
        self.channels_last = False
        self._compiled: tuple = ()  # a tuple, so the compiled module is not registered as a submodule

    def compile(self, **kwargs) -> None:  # type: ignore[override]
        """Run the model through ``torch.compile(model, **kwargs)``; ``self.model`` stays eager, so
        its state dict (and the teacher-cache hash of it) is unchanged."""
        self._compiled = (torch.compile(self.model, **kwargs),)

    def to_channels_last(self) -> None:
        """Keep a CNN teacher's weights and inputs in NHWC memory (faster convolutions on GPUs)."""
        self.model.to(memory_format=torch.channels_last)
        self.channels_last = True

    def _run(self, images: torch.Tensor):
        x = self.prep(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self._compiled[0] if self._compiled else self.model)(x)

    def tap(self, taps: tuple[Tap, ...]) -> None:
        """Capture ``taps`` on every forward from now on (replacing earlier ones)."""
        if self.taps is not None:
            self.taps.remove()
        self.taps = FeatureTaps(self.model, taps) if taps else None

    def train(self, mode: bool = True) -> "Teacher":
        # The teacher never trains, whatever mode its owner is switched to.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.taps is None:
            return {"logits": self._logits(self._run(images))}
        with self.taps.capture():
            out = {"logits": self._logits(self._run(images))}
        out.update(self.taps.pop())
        return out

    @staticmethod
    def _logits(out: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(out, (tuple, list)):  # a distilled DeiT teacher in train mode: its own inference rule
            out = sum(out) / len(out)
        return out.float()


class TeacherEnsemble(torch.nn.Module):
    """Several frozen teachers behind one call (Co-advise's teachers of different inductive biases).

    The first teacher's outputs keep their plain names (``logits``, ``block.3``...), so every
    single-teacher method works unchanged; teacher i's outputs are also given as ``t{i}.<name>``.
    """

    def __init__(self, teachers: list[Teacher]) -> None:
        super().__init__()
        self.teachers = torch.nn.ModuleList(teachers)

    def tap(self, taps: tuple[Tap, ...]) -> None:
        for t in self.teachers:
            t.tap(taps)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, teacher in enumerate(self.teachers):
            got = teacher(images)
            if i == 0:
                out.update(got)
            out.update({f"t{i}.{k}": v for k, v in got.items()})
        return out
