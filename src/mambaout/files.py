"""Atomic file writes and the JSON test for metadata: the two file habits every writer in the package shares."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_mode() -> int:
    """The mode a new file gets under the current umask (`mkstemp` makes 0600 files; ours are meant to be shared)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path`.

    A crash (or a KeyboardInterrupt) mid-write leaves any previous `path` intact and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """`torch.save` to a temporary file in the same folder, then rename (a crash never leaves a half-written file)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def jsonable(value) -> bool:
    """Whether a model argument can be recorded in JSON metadata (module classes and callables cannot)."""
    return isinstance(value, (int, float, str, bool, type(None), list, tuple))


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail early, with one line, when `path` cannot be written (before a long run computes what goes there).

    Raises:
        ValueError: `path` is a folder, or its folder cannot be created or written to.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; pass a file path")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {existing}; pick a folder you can write to")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable; pick another path")
    return path
