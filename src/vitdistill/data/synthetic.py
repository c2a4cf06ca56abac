"""The ``synthetic:DIR`` source: images made by ``vitdistill synthesize`` (DeepInversion), scored on
the test split of the real data set they were made for; ``synthetic:A,B`` pools several folders.

The folder's ``images.safetensors`` holds uint8 images, their labels and, as metadata, the spec of
the real data set (``test_data``). Training uses the synthetic images only; the test split, the class
names and the customary augmentation come from the real set, so a data-free student is scored on
real images exactly like any other student of that set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..errors import UserError
from .cache import file_stamp, fingerprint
from .dataset import DataSplit, Dataset

FORMAT = "vitdistill-synthetic-1"
IMAGES = "images.safetensors"


def read_synthetic(path: Path) -> tuple[dict[str, str], torch.Tensor, torch.Tensor]:
    """Metadata, uint8 images ``[N, C, H, W]`` and int64 labels of a synthetic folder (or its file)."""
    file = path / IMAGES if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no {IMAGES} in '{path}'; make one with `vitdistill synthesize --out {path}`")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            # clone: get_tensor maps the file, and the file may be replaced while we train
            images, labels = f.get_tensor("images").clone(), f.get_tensor("labels").clone()
    except Exception as e:  # noqa: BLE001 - safetensors reports damage in several exception types
        raise UserError(f"'{file}' is not a readable synthetic data set ({type(e).__name__}); make it again "
                        "with `vitdistill synthesize`") from None
    if (meta.get("format") != FORMAT or images.dtype != torch.uint8 or images.dim() != 4 or labels.dim() != 1
            or len(images) != len(labels)):
        raise UserError(f"'{file}' was not written by `vitdistill synthesize` (format {meta.get('format')!r}); "
                        "make it again")
    if len(images) == 0 or images.shape[2] != images.shape[3]:
        what = "no images" if len(images) == 0 else f"{images.shape[3]}x{images.shape[2]} images, not square ones"
        raise UserError(f"'{file}' holds {what}; make it again with `vitdistill synthesize`")
    return meta, images, labels.to(torch.int64)


def load_synthetic(
    paths: list[Path],
    img_size: int | None,
    load_real: Callable[[str, int | None], Dataset],
    resize: Callable[[torch.Tensor, int], torch.Tensor],
) -> Dataset:
    """The synthetic training split beside the real test split named in its metadata.

    Several folders (``synthetic:A,B``: rounds of Adaptive DeepInversion, or parts made by several
    processes) pool their images; they must stand for the same real set at the same size, and differ
    in settings or seed, since the same settings and seed make the same images.
    ``img_size`` resizes both (default: the size the images were made at); ``load_real(spec,
    img_size)`` loads the real data set.
    """
    metas, images, labels = [], [], []
    for path in paths:
        meta, x, y = read_synthetic(path)
        metas.append(meta)
        images.append(x)
        labels.append(y)
    first, meta = paths[0], metas[0]
    for path, x in zip(paths[1:], images[1:]):  # the sizes they were made at (unset in the metadata: native)
        if x.shape[-2:] != images[0].shape[-2:]:
            raise UserError(f"'{path}' holds {x.shape[-1]}-px images and '{first}' {images[0].shape[-1]}-px ones; "
                            "pool only sets made at the same size (synthesize --set data.img_size=N)")
    for path, other in zip(paths[1:], metas[1:]):
        for key in ("test_data", "classes", "pad", "hflip"):
            if other.get(key) != meta.get(key):
                raise UserError(f"'{path}' and '{first}' were made for different data ({key} "
                                f"{other.get(key)!r} against {meta.get(key)!r}); pool only sets made with the same "
                                "--data and data settings")
        if other.get("settings") and other.get("settings") == meta.get("settings"):
            raise UserError(f"'{path}' and '{first}' were made with the same settings and seed, so they hold the "
                            "same images; make one again with another --seed")
    spec = meta.get("test_data", "")
    if spec.partition(":")[0].strip().lower() in ("", "synthetic"):
        raise UserError(f"'{first}' names no real data set to test on (test_data={spec!r}); make it again "
                        "with `vitdistill synthesize --data SOURCE`")
    try:  # metadata are strings; a damaged one is named, not a ValueError deep in the load
        made_at = int(meta["img_size"]) if meta.get("img_size") else None
        pad = int(meta["pad"]) if "pad" in meta else None
        if (made_at is not None and made_at < 1) or (pad is not None and pad < 0):
            raise ValueError
    except ValueError:
        raise UserError(f"'{first}' has damaged metadata (img_size={meta.get('img_size')!r}, "
                        f"pad={meta.get('pad')!r}); make it again with `vitdistill synthesize`") from None
    real = load_real(spec, img_size if img_size is not None else made_at)
    side = real.img_size
    for i, (path, x, y) in enumerate(zip(paths, images, labels)):
        if x.shape[2] != side:
            images[i] = x = resize(x, side)
        if x.shape[1] != real.in_chans or y.max() >= real.num_classes or y.min() < 0:
            raise UserError(f"'{path}' holds {x.shape[1]}-channel images of {int(y.max()) + 1} classes but "
                            f"'{spec}' has {real.in_chans} channels and {real.num_classes} classes; make it again "
                            "for this data set")
    files = [p / IMAGES if p.is_dir() else p for p in paths]
    # one folder keeps the fingerprint it had before pooling existed
    where = {"path": str(files[0]), "inputs": file_stamp(files[0]), "settings": meta.get("settings")} \
        if len(files) == 1 else {"paths": [str(f) for f in files], "inputs": [file_stamp(f) for f in files],
                                 "settings": [m.get("settings") for m in metas]}
    fp = fingerprint({"kind": "synthetic", **where, "test": real.fingerprint, "img_size": side})
    return Dataset(name=f"synthetic-{real.name}", classes=real.classes,
                   train=DataSplit(torch.cat(images).contiguous(), torch.cat(labels)), test=real.test,
                   fingerprint=fp, pad=real.pad if pad is None else pad,
                   hflip=meta.get("hflip", str(real.hflip).lower()) == "true")
