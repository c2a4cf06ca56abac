"""Evaluation: top-1, top-5, agreement with the teacher and calibration, in the model's inference mode."""
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
    # top-1 is argmax, what a deployed model's caller takes: topk orders exact ties (common in int8
    # logits) its own way, so its first column could score a prediction no caller makes
    pred = logits.argmax(dim=1)
    labels = labels.to(topk.device)
    out = {
        "top1": (pred == labels).float().mean().item(),
        "top5": (topk == labels[:, None]).any(dim=1).float().mean().item(),
    }
    if teacher_pred is not None:
        out["agreement"] = (pred == teacher_pred.to(pred.device)).float().mean().item()
    return out


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Negative log-likelihood and expected calibration error of the softmax of ``logits``.

    ECE (Guo, Pleiss, Sun and Weinberger, ICML 2017, arXiv:1706.04599), over ``bins`` equal-width
    bins of the confidence ``c_i = max_k p_ik``, bin ``m`` holding ``c`` in ``((m-1)/M, m/M]``:

        ECE = sum_m |B_m| / n * | acc(B_m) - conf(B_m) |

    Distillation moves it both ways (soft targets tend to calibrate a student, hard ones to make it
    over-confident), so a run reports it beside top-1. ``nll`` is the mean cross-entropy in nats.
    """
    logits = logits.float()
    labels = labels.to(logits.device)
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    bin_of = torch.bucketize(conf, torch.linspace(0, 1, bins + 1, device=logits.device)[1:-1])
    gap = torch.zeros(bins, dtype=torch.float64, device=logits.device)
    gap.index_add_(0, bin_of, (pred == labels).double() - conf.double())
    return {"nll": torch.nn.functional.cross_entropy(logits, labels).item(),
            "ece": (gap.abs().sum() / len(labels)).item()}
