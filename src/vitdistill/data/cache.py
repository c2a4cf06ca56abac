"""Decode once: decoded splits kept as one safetensors file per data set fingerprint.

The file is written to a temporary name in the same folder and renamed into place, so a crash
mid-write leaves no readable half file. A cache file that cannot be read back (corrupt, truncated,
from an older format) is ignored and rebuilt, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from vitdistill.engine import io

from .dataset import DataSplit, Dataset

# Bump when decoding or layout rules change, so older cache files are not reused.
FORMAT_VERSION = 1
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> Path:
    """``$VITDISTILL_CACHE`` or ``~/.cache/vitdistill``."""
    env = os.environ.get("VITDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitdistill"


def fingerprint(payload: dict[str, Any]) -> str:
    """A 16-hex-digit sha256 of a JSON-able description of the inputs and the decoding settings."""
    blob = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_stamp(path: Path) -> list[int]:
    """Size and modification time (ns) of a file: cheap evidence that it has not changed."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cache_path(cache_dir: str | os.PathLike[str] | None, fp: str) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "data" / f"{fp}.safetensors"


def load_cached(path: Path, fp: str) -> Dataset | None:
    """The cached data set, or None when there is none or it cannot be trusted."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            # clone: get_tensor maps the file, and an in-place edit of a mapped file kills the process
            tensors = {k: f.get_tensor(k).clone() for k in _KEYS}
        if meta.get("format") != str(FORMAT_VERSION) or meta.get("fingerprint") != fp:
            raise ValueError("format or fingerprint mismatch")
        return Dataset(
            name=meta["name"],
            classes=list(json.loads(meta["classes"])),
            train=DataSplit(tensors["train_images"], tensors["train_labels"]),
            test=DataSplit(tensors["test_images"], tensors["test_labels"]),
            fingerprint=fp,
            pad=int(meta["pad"]),
            hflip=meta["hflip"] == "true",
        )
    except Exception as e:  # any unreadable cache is rebuilt, whatever the reason
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"note: ignoring the unreadable data cache {path} ({type(e).__name__}: {why}); rebuilding it",
              file=sys.stderr, flush=True)
        return None


def save_cached(path: Path, ds: Dataset) -> None:
    """Write ``ds`` atomically. A cache that cannot be written only costs a re-decode next time."""
    tensors = {
        "train_images": ds.train.images.contiguous(),
        "train_labels": ds.train.labels.contiguous(),
        "test_images": ds.test.images.contiguous(),
        "test_labels": ds.test.labels.contiguous(),
    }
    meta = {
        "format": str(FORMAT_VERSION),
        "fingerprint": ds.fingerprint,
        "name": ds.name,
        "classes": json.dumps(ds.classes),
        "pad": str(ds.pad),
        "hflip": "true" if ds.hflip else "false",
    }
    try:  # a unique temp name per writer (concurrent DDP ranks), synced, given the shared file mode
        io.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except Exception as e:  # disk full, read-only cache dir, ...: the data in memory is still good
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"note: could not write the data cache {path} ({why}); the data will be decoded again next time "
              "(set VITDISTILL_CACHE to a writable folder)", file=sys.stderr, flush=True)

