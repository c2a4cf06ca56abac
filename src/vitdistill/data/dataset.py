"""The in-memory form of a data set: uint8 image tensors plus int64 labels.

Images stay uint8 until a batch is drawn, so a CIFAR-sized set costs 1 byte a pixel in memory and on
disk, and augmentation (which works on uint8) needs no float copy of the whole set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataSplit:
    """One split. ``images`` is uint8 ``[N, 3, H, W]``, ``labels`` int64 ``[N]``.

    A sample's position in the split is its *sample index*, which (with the run seed and the epoch)
    determines its augmentation; see :func:`vitdistill.data.sample_seeds`.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """A loaded data set with its identity and default augmentation.

    ``fingerprint`` identifies the decoded content (source, inputs, resize, split); a teacher cache
    records it so that replaying logits against other data is an error. ``pad`` and ``hflip`` are the
    source's customary augmentation (random crop with zero padding ``pad``, horizontal flip).
    """

    name: str
    classes: list[str]
    train: DataSplit
    test: DataSplit
    fingerprint: str
    pad: int
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def img_size(self) -> int:
        return int(self.train.images.shape[2])

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])
