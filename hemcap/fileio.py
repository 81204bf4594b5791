"""Atomic writes: every file and folder hemcap writes appears complete or not at all.

A file is written to a temporary name in its own folder and renamed over the target (a rename
within one file system is atomic). A folder is built in a staging folder beside the target and
renamed into place; an old target is moved aside first and removed only afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


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
        os.replace(tmp, path)
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
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: str | Path, target: str | Path) -> Path:
    """Move a finished ``staging`` folder to ``target``; an old ``target`` is removed only afterwards."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return target
    old = _sibling(target, "old")
    os.replace(target, old)  # a rename onto a non-empty folder fails, so the old one steps aside first
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
