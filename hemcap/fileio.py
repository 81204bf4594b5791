"""Atomic writes: every file and folder hemcap writes appears complete or not at all.

A file is written to a temporary name in its own folder and renamed over the target (a rename
within one file system is atomic). A folder is built in a staging folder beside the target and
renamed into place; an old target is moved aside first and removed only afterwards.

Atomic is not durable: after a power cut a renamed file can come back empty, because the data and
the rename reach the disk in any order. So the data is fsynced before the rename, and the folder
holding the new name after it (``fsync_file``, ``fsync_dir``, ``fsync_tree``).

``fault_point(name)`` marks a moment worth dying at: with ``HEMCAP_FAULT_AT`` naming it, the process
SIGKILLs itself there (the fault-injection tests; ``hemcap.checkpoint`` lists the points).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Iterator


FAULT_ENV = "HEMCAP_FAULT_AT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if ``HEMCAP_FAULT_AT`` is ``name`` or ``name#n`` and this is the n-th visit.

    Unset, it costs one environment lookup. It is read at each call, not at import, so a process
    forked from one that imported hemcap still sees its own setting.
    """
    wanted = os.environ.get(FAULT_ENV)
    if wanted is None:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to the disk (any descriptor will do: fsync flushes the file, not the handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries, so a rename or a new file in it survives a power cut (POSIX only)."""
    if os.name == "nt":  # Windows cannot open a folder to flush it; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder under ``root``, ``root`` included."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; it replaces ``path`` on success and is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        fsync_file(tmp)
        fault_point(f"write:{path.name}")  # written and flushed, not yet in place
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def save_image(image, path: str | Path, **options) -> Path:
    """Save a PIL image atomically; the format comes from the suffix unless ``format`` is given."""
    path = Path(path)
    options.setdefault("format", {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG"))
    with atomic_path(path) as tmp:
        image.save(tmp, **options)
    return path


@contextlib.contextmanager
def staging_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh folder beside ``target`` to build in; it becomes ``target`` when the block succeeds.

    Raises FileExistsError up front if ``target`` exists and ``overwrite`` is not set.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {target} exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        fault_point(f"stage:{target.name}")  # built and flushed, not yet in place
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: str | Path, target: str | Path) -> Path:
    """Move a finished ``staging`` folder to ``target``; an old ``target`` is removed only afterwards."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        fsync_dir(target.parent)
        return target
    old = _sibling(target, "old")
    os.replace(target, old)  # a rename onto a non-empty folder fails, so the old one steps aside first
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
