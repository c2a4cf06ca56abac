"""Data layer: sources decoded once to uint8 tensors, and seeded per-sample batch augmentation.

``load_data("digits")``, ``load_data("cifar10:DIR")``, ``load_data("imagefolder:PATH")`` return a
:class:`Dataset`; :func:`epoch_batches` gives the index order of an epoch, :func:`sample_seeds` and
:func:`augment_batch` turn a batch of indices into augmented uint8 images reproducibly.
"""
from .augment import augment_batch, epoch_batches, sample_seeds
from .dataset import DataSplit, Dataset
from .sources import DATA_SOURCES, load_data

__all__ = ["DataSplit", "Dataset", "load_data", "sample_seeds", "augment_batch", "epoch_batches", "DATA_SOURCES"]
