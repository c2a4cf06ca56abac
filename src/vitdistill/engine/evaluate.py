"""Evaluation: top-1, top-5 and agreement with the teacher, in the model's inference mode."""
from __future__ import annotations

from typing import Callable

import torch

from vitdistill.data import DataSplit


@torch.inference_mode()
def predict(
    forward: Callable[[torch.Tensor], torch.Tensor], split: DataSplit, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits for a whole split; ``forward`` takes uint8 images (it owns the input preparation)."""
    outs = []
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        outs.append(forward(images).float().cpu())
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, teacher_pred: torch.Tensor | None = None) -> dict:
    """top1 / top5 as fractions; ``agreement``: share of samples where student and teacher agree."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    labels = labels.to(topk.device)
    out = {
        "top1": (topk[:, 0] == labels).float().mean().item(),
        "top5": (topk == labels[:, None]).any(dim=1).float().mean().item(),
    }
    if teacher_pred is not None:
        out["agreement"] = (topk[:, 0] == teacher_pred).float().mean().item()
    return out
