"""Atomic file writes and the JSON test for metadata: the two file habits every writer in the package shares."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


class FileWriteError(OSError):
    """Writing a named file failed (a full disk, a quota, an I/O error); the message names the file."""

    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return self.strerror or super().__str__()


class SpecialFileError(FileWriteError, ValueError):
    """An output path that names a device, a FIFO or a socket (or a symlink to one): never written or replaced.
    Also a ValueError (what the early checks of the commands raise)."""


def special_kind(path: str | os.PathLike) -> str | None:
    """What `path` is when it is not a regular file, a folder or nothing: `'a character device'`, ... else None.
    Symlinks are followed; stat only: the file is never opened (opening a FIFO blocks until a writer comes)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((kind for test, kind in _KINDS if test(mode)), None)


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` when it is a regular file (or a symlink to one), found by stat alone (a FIFO, a device or a folder is
    never opened); else FileNotFoundError: "`what` `path` does not exist", or "... is not a regular file (...)"."""
    path = Path(path)
    if path.is_file():
        return path
    kind = special_kind(path) or ("a folder" if path.is_dir() else None)
    if kind is None:
        raise FileNotFoundError(f"{what} {path} does not exist")
    raise FileNotFoundError(f"{what} {path} is not a regular file ({kind}): not opened; pass a file")


def output_target(path: str | os.PathLike, what: str = "output") -> Path:
    """The regular file a write to `path` replaces: `path` itself, or where a symlink to a regular file points.
    SpecialFileError when `path` is (or links to) a device, `/dev/null` included, a FIFO or a socket, or is a symlink
    that leads nowhere (whatever it pointed at would be created blindly)."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        link = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise SpecialFileError(
            errno.EINVAL,
            f"{what} {path}{link} is {kind}, not a regular file: refusing to write there (an atomic write would "
            "replace it); pass a file path",
        )
    if path.is_symlink():
        if not path.exists():
            raise SpecialFileError(
                errno.ENOENT,
                f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist; pass a file path",
            )
        return Path(os.path.realpath(path))  # replace the file the link points to, keep the link
    return path


def cache_dir() -> Path:
    """`$MAMBAOUT_CACHE`, else `$XDG_CACHE_HOME/mambaout`, else `~/.cache/mambaout`: downloads, compiled kernels."""
    if os.environ.get("MAMBAOUT_CACHE"):
        return Path(os.environ["MAMBAOUT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mambaout"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path`: a crash or Ctrl-C mid-write
    leaves any previous `path` intact and no temporary behind. Only a regular file or a new path is replaced
    (`output_target`: a symlink's target is replaced, the link kept). `suffix` ends the temporary name (`.pt2`, `.png`).
    SpecialFileError for a device, FIFO or socket; FileWriteError, one line naming the file and the space left, when
    the write fails (a full disk, a quota, I/O; also torch's and safetensors' errors that report one, "os error 28").
    """
    path = output_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        try:
            write(tmp)
        except Exception as e:
            failure = ("inline_container", "write failed", "No space left", "os error", "I/O error")
            if not isinstance(e, OSError) and not any(s in str(e) for s in failure):
                raise
            raise _write_error(path, e) from e
        mask = os.umask(0)  # the mode a new file gets under the umask (`mkstemp` makes 0600 files; ours are shared)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_error(path: Path, e: Exception) -> FileWriteError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e) or "os error 28" in str(e):
        return FileWriteError(
            errno.ENOSPC,
            f"cannot write {path}: no space left on the device ({free}); free some space or write elsewhere",
        )
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FileWriteError(
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


def check_writable(path: str | os.PathLike, what: str, inputs: Iterable = ()) -> Path:
    """Fail early, with one ValueError line, when `path` cannot be written (before a long run computes what goes
    there): a folder, a device, a FIFO or a socket, one of the files the command reads (`inputs`), or in a folder
    that cannot be created or written to."""
    path = Path(path)
    output_target(path, what)
    for source in inputs:
        try:
            same = source is not None and path.exists() and os.path.samefile(path, source)
        except (OSError, ValueError):  # an input that is no file here (a URL, a model name)
            same = False
        if same:
            raise ValueError(f"{what} {path} is {source}, which this command reads; pick another path")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; pass a file path")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {existing}; pick a folder you can write to")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable; pick another path")
    return path
