"""How the engine talks to models: input preparation, the student's outputs, the frozen teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdistill.models.factory import expected_input_size, normalization


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


def student_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the student in training mode and name its outputs for the method."""
    out = model(x)
    if isinstance(out, tuple):
        return {"logits": out[0], "dist_logits": out[1]}
    return {"logits": out}


class Teacher(torch.nn.Module):
    """A frozen teacher: always eval mode, no gradient, fed its own input preparation."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.prep = InputPrep.for_model(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Teacher":
        # The teacher never trains, whatever mode its owner is switched to.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(self.prep(images))
        if isinstance(out, tuple):  # a distilled DeiT teacher: its own inference rule
            out = (out[0] + out[1]) / 2
        return {"logits": out.float()}
