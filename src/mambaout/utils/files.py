"""Atomic file writes and the JSON test for metadata: the two file habits every writer in the package shares."""

from __future__ import annotations

import errno
import os
import shutil
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

    Raises:
        OSError: the write failed (a full disk, a quota, an I/O error), with one line naming the file and the space
            left on its device. torch's writer reports a full disk as a RuntimeError from `inline_container.cc`,
            which is turned into this OSError too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _is_write_failure(e):
                raise
            raise _write_error(path, e) from e
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e)
    return "inline_container" in text or "write failed" in text or "No space left" in text


def _write_error(path: Path, e: Exception) -> OSError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    code = getattr(e, "errno", None)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
        return OSError(
            errno.ENOSPC,
            f"cannot write {path}: no space left on the device ({free}); free some space or write elsewhere",
        )
    return OSError(
        code or errno.EIO,
        f"cannot write {path} ({reason}; {free}): is the disk full? free some space or write elsewhere",
    )


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
