"""Atomic writes: a temporary file in the same folder, then a rename, so no half file is ever read."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from vitdistill.errors import UserError

# mkstemp makes its file private (0600); a run's files should read like any other file the user
# writes, so each one gets the mode the umask gives
_UMASK = os.umask(0)
os.umask(_UMASK)


def file_mode() -> int:
    """The mode a new file gets under the umask (0644 for the usual 022)."""
    return 0o666 & ~_UMASK


def check_folder(path: str | Path, flag: str = "--out") -> None:
    """One-line error when ``path`` is empty, or the nearest folder above it that exists is not a
    folder or takes no new file (read-only, /proc, /sys): before any work, not at the first write."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty; name a folder")
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise UserError(f"{flag} '{path}': '{part}' is a file, not a folder; choose another {flag}")
            _probe(part, path, flag)
            return


RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl")


# What each command leaves in its folder, by the files that mark it: another command's files
# would mix into it (and a later resume, replay or report would read them as its own).
FOLDER_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "run": ("a training run", RUN_FILES),
    "cache": ("a teacher cache (`vitdistill cache-teacher`)", ("header.json",)),
    "synthetic": ("a synthetic data set (`vitdistill synthesize`)", ("images.safetensors", "parts", "synth.json")),
    "grid": ("a compare grid (`vitdistill compare`)", ("compare.json", "cells")),
    "demo": ("a demo (`vitdistill demo`)", ("demo.json", "student-none", "student-deit-hard")),
}


def foreign_folder(path: str | Path, own: str) -> str | None:
    """What ``path`` holds when another kind of command wrote it (:data:`FOLDER_KINDS`), else None;
    ``own`` is the kind the asking command writes, whose folder it may resume."""
    for kind, (name, markers) in FOLDER_KINDS.items():
        if kind != own and any((Path(path) / m).exists() for m in markers):
            return name
    return None


def refuse_foreign_folder(path: str | Path, flag: str, own: str, what: str) -> None:
    """One-line error when ``path`` holds what another kind of command wrote."""
    found = foreign_folder(path, own)
    if found:
        raise UserError(f"{flag} '{path}' holds {found}; pass {flag} to a new folder for {what}")


def _probe(folder: Path, path: Path, flag: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".vitdistill-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        # /proc and /sys answer "No such file or directory" for a folder that exists: say what it is
        reason = ("it takes no new file (a special file system such as /proc or /sys)"
                  if err.errno == errno.ENOENT and folder.is_dir() else err.strerror or str(err))
        raise UserError(f"cannot write into {flag} '{path}': {reason}; choose another {flag}") from None


def make_folder(path: str | Path, flag: str = "--out") -> list[Path]:
    """``mkdir -p path`` with a one-line error when it cannot be made (no permission, a read-only or
    special file system; every caller has run :func:`check_folder`, which probes for a folder that
    takes no file); returns the folders it created, deepest last, so a caller that fails
    later can take them away again (:func:`remove_folders`)."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {flag} '{path}': {err.strerror or err}; choose another {flag}") from None
    return created


def remove_folders(created: list[Path]) -> None:
    """Remove what :func:`make_folder` created, deepest first, where it is still empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def _fsync(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder some systems do not open read-only: the rename is then as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; remove the temp on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # nothing written yet: the folder refuses new files
        raise UserError(f"cannot write '{path}': {err.strerror or err}; choose another folder") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # after the write: a writer may replace the file it was given
        _fsync(tmp)  # the bytes reach the disk before the name does: a power cut leaves old or new, never empty
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_torch(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # safetensors refuses shared or non-contiguous storage; a plain contiguous copy is what users load.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
