"""Read an ImageFolder layout from a directory or a tar archive into uint8 tensors.

Layout rules (the class of an image is the first folder below its split root, as in torchvision's
``ImageFolder``):

* ``train/<class>/...`` plus ``test/<class>/...`` (or ``val/``) at the top, possibly below one
  common root folder: those are the splits;
* otherwise ``<class>/...`` (again possibly below a common root): one pool, split by the caller.

Hidden files and folders (``.*``, macOS ``__MACOSX`` and ``._x.jpg`` forks) are skipped. Every image
file is decoded once with PIL; a file PIL cannot fully decode is an error naming that file.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from tqdm import tqdm

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SPLIT_NAMES = ("train", "test", "val")
_PROGRESS_MIN_IMAGES = 2000


@dataclass
class Entry:
    """One image file: its path parts (re-rooted as the layout is resolved), its bytes or where to
    read them, and its path inside the source as the user sees it (for messages)."""

    parts: tuple[str, ...]
    source: Path | bytes
    name: str

    def rerooted(self, drop: int) -> Entry:
        return Entry(self.parts[drop:], self.source, self.name)


@dataclass
class Listing:
    """The image files of a source, and every folder in it (as ``a/b/c`` paths, hidden ones too),
    so that a class folder without a usable image can be told from no folder at all."""

    entries: list[Entry]
    folders: set[str] = field(default_factory=set)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _wanted(parts: tuple[str, ...]) -> bool:
    if any(_hidden(p) for p in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def list_directory(root: Path) -> Listing:
    """Every image file below ``root``, in sorted path order, and every folder. Linked folders are
    followed (as torchvision's ``ImageFolder`` does), each real folder once, so a link loop ends."""
    entries, folders = [], set()
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = Path(dirpath).relative_to(root).parts
        if rel:
            folders.add("/".join(rel))
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            parts = (*rel, fn)
            if _wanted(parts):
                entries.append(Entry(parts, Path(dirpath) / fn, "/".join(parts)))
    return Listing(entries, folders)


def read_archive(path: Path) -> Listing:
    """Every image file in a tar archive, with its bytes (one sequential pass over the archive), and
    every folder (listed, or implied by a file's path)."""
    entries, folders = [], set()
    size = path.stat().st_size
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf, tqdm(
            total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False,
            disable=True if size < 4 << 20 else None,
        ) as bar:
            for member in tf:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if ".." in parts:  # never extracted, but its class would be a guess
                    raise UserError(f"archive {path} holds '{member.name}', a path that leaves the archive's root "
                                    "('..'); re-create it from inside its folder (tar -C DIR -cf ARCHIVE .)")
                dirs = parts if member.isdir() else parts[:-1]
                folders.update("/".join(dirs[:i]) for i in range(1, len(dirs) + 1))
                if member.isfile() and parts and _wanted(parts):
                    f = tf.extractfile(member)
                    assert f is not None
                    entries.append(Entry(parts, f.read(), "/".join(parts)))
                bar.update(raw.tell() - bar.n)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # tarfile's messages run to several lines ("file could not be opened successfully:\n- method gz: ...")
        why = " ".join(str(e).split()).rstrip(":") or type(e).__name__
        if isinstance(e, tarfile.ReadError) and "could not be opened" in why:
            why = "not a tar or tar.gz archive"
        raise UserError(f"cannot read archive {path}: {why}; re-create or re-download it") from None
    _check_tar_end(path, size)
    return Listing(entries, folders)


def _check_tar_end(path: Path, size: int) -> None:
    """A plain tar cut short reads as a shorter archive (a compressed one fails to decompress): a
    tar ends in two zero blocks of 512 bytes, so their absence means the file was truncated."""
    with open(path, "rb") as f:
        magic = f.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
            return
        f.seek(max(0, size - 1024))
        tail = f.read(1024)
    if size % 512 or tail.count(0) != len(tail):
        raise UserError(f"archive {path} is truncated (it does not end in a tar's closing blocks); "
                        "re-create or re-download it")


def strip_common_root(entries: list[Entry]) -> list[Entry]:
    """Drop leading folders shared by every file while at least ``<folder>/<file>`` remains."""
    while entries and all(len(e.parts) >= 3 for e in entries) and len({e.parts[0] for e in entries}) == 1:
        entries = [e.rerooted(1) for e in entries]
    return entries


def split_layout(entries: list[Entry]) -> tuple[list[Entry], list[Entry]] | None:
    """``(train, test)`` entries re-rooted at their split folder, or None if there are no split folders."""
    entries = strip_common_root(entries)
    tops = {e.parts[0].lower() for e in entries if len(e.parts) >= 3}
    if "train" not in tops or not ({"test", "val"} & tops):
        return None
    test_name = "test" if "test" in tops else "val"

    def pick(split: str) -> list[Entry]:
        return [e.rerooted(1) for e in entries if len(e.parts) >= 3 and e.parts[0].lower() == split]

    return pick("train"), pick(test_name)


def check_no_empty_class(entries: list[Entry], folders: set[str], where: Path) -> None:
    """A folder beside the class folders that holds no usable image (empty, or hidden files only)
    would silently drop its class and shift every later class index; say so instead."""
    parents, used = set(), set()
    for e in entries:
        if len(e.parts) < 2:
            continue
        orig = tuple(e.name.split("/"))
        parent = orig[:len(orig) - len(e.parts)]
        parents.add(parent)
        used.add((*parent, e.parts[0]))
    for folder in sorted(folders):
        parts = tuple(folder.split("/"))
        if parts[:-1] in parents and parts not in used and not _hidden(parts[-1]):
            raise UserError(f"class folder '{folder}' in {where} holds no images; add some or remove the folder")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def class_entries(entries: list[Entry]) -> list[Entry]:
    """Entries that sit inside a class folder (files directly at the root have no class)."""
    return [e for e in entries if len(e.parts) >= 2]


def decode_image(data: bytes, img_size: int | None) -> np.ndarray:
    """Decode fully to RGB uint8 ``[H, W, 3]``, resized to ``img_size`` squared if given."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode to grey
    with warnings.catch_warnings():  # a large photo decodes; only PIL's hard limit (an error) stops it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    if img_size is not None and rgb.size != (img_size, img_size):
        rgb = rgb.resize((img_size, img_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_split(
    entries: list[Entry], class_index: dict[str, int], where: Path, img_size: int | None, desc: str
) -> tuple[list[np.ndarray], list[int], dict[tuple[int, int], str]]:
    """Decode ``entries`` (class = first path part) in sorted path order.

    Returns the ``[H, W, 3]`` arrays, their labels, and one file name per distinct ``(W, H)`` so
    :func:`check_sizes` can tell the user which files disagree.
    """
    entries = sorted(entries, key=lambda e: e.parts)
    arrays, labels = [], []
    sizes: dict[tuple[int, int], str] = {}
    for e in tqdm(entries, desc=desc, unit="img", leave=False,
                  disable=True if len(entries) < _PROGRESS_MIN_IMAGES else None):
        try:
            data = e.source.read_bytes() if isinstance(e.source, Path) else e.source
        except OSError as err:
            raise UserError(f"cannot read image '{e.name}' in {where}: {err.strerror or err}; check its permissions, "
                            "or remove it") from None
        try:
            arr = decode_image(data, img_size)
        except Image.DecompressionBombError:
            raise UserError(f"image '{e.name}' in {where} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, which "
                            "PIL refuses to decode (a decompression-bomb guard); shrink it or remove it") from None
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            # PIL names the in-memory buffer it read ("<_io.BytesIO object at 0x...>"): the file is named already
            why = re.sub(r"\s*<[^>]* object at 0x[0-9a-f]+>", "", str(err)).strip() or type(err).__name__
            raise UserError(
                f"corrupt or truncated image '{e.name}' in {where}: {why}; remove or replace it") from err
        sizes.setdefault((arr.shape[1], arr.shape[0]), e.name)
        arrays.append(arr)
        labels.append(class_index[e.parts[0]])
    return arrays, labels, sizes


def check_sizes(sizes: dict[tuple[int, int], str], where: Path) -> None:
    """All images must share one square size unless the user asks for a resize."""
    examples = list(sizes.items())
    if len(examples) > 1:
        (s1, f1), (s2, f2) = examples[:2]
        raise UserError(
            f"images in {where} have different sizes ({s1[0]}x{s1[1]} in '{f1}', {s2[0]}x{s2[1]} in '{f2}'); "
            "set data.img_size to resize them all once at load")
    if examples and examples[0][0][0] != examples[0][0][1]:
        (w, h), f = examples[0]
        raise UserError(f"images in {where} are {w}x{h}, not square (e.g. '{f}'); set data.img_size to resize them")


def stack(arrays: list[np.ndarray], side: int) -> torch.Tensor:
    """``[H, W, 3]`` arrays to one uint8 ``[N, 3, H, W]`` tensor (``side`` shapes an empty split)."""
    if not arrays:
        return torch.empty((0, 3, side, side), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
