"""ImageFolder directories read once per real folder and file: links followed, loops and duplicates not.

timm's folder reader (`os.walk(followlinks=True)`) walks a link back to a parent again and again, counts one file
many times, and leaves out a folder it may not read without a word. `FolderReader` keeps timm's layout rules (the
leaf folder's name is the class, natural sort order, timm's image suffixes); a second name for a folder or a file is
skipped and named in one warning (the real place kept), a folder that cannot be listed raises.
"""

from __future__ import annotations

import errno
import logging
import os

from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

from mambaout.utils.files import special_kind
from mambaout.utils.text import printable

logger = logging.getLogger("mambaout")

_SHOWN = 3  # skipped paths named in a warning; the rest counted
_SKIPPED = (  # what the warnings say of the linked folders and of the duplicate files left out
    "linked folder(s) lead to a folder already read (a loop or a second name for it), not read again",
    "file(s) are links to an image already listed, counted once",
)


def _listing_error(folder: str, e: OSError, root: str) -> ValueError:
    top = os.path.abspath(folder) == os.path.abspath(root)
    where = "" if top else f" (inside the data set {root})"
    if isinstance(e, PermissionError):
        other = "pass another folder" if top else "move it out of the data set"
        return ValueError(
            f"permission denied reading folder {folder}{where}; make it readable (chmod -R u+rX) or {other}"
        )
    if e.errno == errno.ELOOP:
        return ValueError(f"cannot read folder {folder}{where}: too many levels of symbolic links; fix the links")
    return ValueError(f"cannot read folder {folder}{where} ({e.strerror or e}); check the path and its permissions")


def scan_image_folder(root: str, report: bool = True) -> list[tuple[str, str]]:
    """(path, class name) of every image file under `root`, each real file once, by the path it was reached by; the
    class is the name of the folder holding it (timm's `leaf_name_only`; '' at the top). `report` warns about the
    linked folders and files skipped. ValueError, naming it, for a folder that cannot be listed (permission denied,
    a link loop the kernel refuses).
    """
    suffixes = set(get_img_extensions(as_set=True))
    listed: list[tuple[str, str, str, bool]] = []  # (path, class, real path, the entry is a link)
    seen_dirs: set[str] = set()
    skipped_dirs: list[str] = []
    # depth-first over real folders; linked folders wait until every real one is read
    stack: list[tuple[str, str]] = [(root, os.path.realpath(root))]
    linked: list[tuple[str, str]] = []
    while stack or linked:
        path, real = stack.pop() if stack else linked.pop(0)
        if real in seen_dirs:
            skipped_dirs.append(path)
            continue
        seen_dirs.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)  # a fixed order: which of two names is kept
        except OSError as e:
            raise _listing_error(path, e, root) from None
        subdirs = []
        for entry in entries:
            is_link = entry.is_symlink()
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:  # a link that loops on itself, or into a folder we may not search: not a folder
                is_dir = False  # (with an image suffix, it is listed and named as unreadable when opened)
            if is_dir:
                if is_link:
                    linked.append((entry.path, os.path.realpath(entry.path)))
                else:
                    subdirs.append((entry.path, os.path.join(real, entry.name)))
                continue
            if os.path.splitext(entry.name)[1].lower() not in suffixes:
                continue
            # a file that is no link is where its folder really is: no realpath (a few lstat calls) per file
            file_real = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
            listed.append((entry.path, "" if path == root else os.path.basename(path), file_real, is_link))
        stack.extend(reversed(subdirs))  # popped in name order
    # one entry per real file: the one that is no link where there is one (the file keeps the class of its real
    # place), else the first link to it
    kept: dict[str, int] = {}
    for i, (_, _, file_real, _) in sorted(enumerate(listed), key=lambda e: e[1][3]):  # links last, else in order
        kept.setdefault(file_real, i)
    keep = set(kept.values())
    found = [(p, label) for i, (p, label, _, _) in enumerate(listed) if i in keep]
    duplicates = [p for i, (p, _, _, _) in enumerate(listed) if i not in keep]
    for paths, what in zip((skipped_dirs, duplicates), _SKIPPED):
        if report and paths:
            shown = ", ".join(printable(os.path.relpath(p, root)) for p in paths[:_SHOWN])
            more = f" (+{len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else ""
            logger.warning("%s: %d %s: %s%s", printable(root), len(paths), what, shown, more)
    return found


class FolderReader:
    """An ImageFolder directory as timm's reader interface (`samples`, `class_to_idx`, `reader[i]` -> (file,
    target), `_filename`), listed by `scan_image_folder`."""

    def __init__(self, root: str, report: bool = True):
        self.root = root
        self.found = scan_image_folder(root, report)
        self.label(None)

    def label(self, class_map: dict[str, int] | None) -> None:
        """Label the listing by `class_map` (default: sorted folder names; a validation set takes the training
        set's): files of other classes are left out (the caller says so first, see `ImageDataset`)."""
        if class_map is None:
            names = sorted({label for _, label in self.found}, key=natural_key)
            class_map = {c: i for i, c in enumerate(names)}
        self.class_to_idx = dict(class_map)
        samples = [(p, self.class_to_idx[c]) for p, c in self.found if c in self.class_to_idx]
        self.samples = sorted(samples, key=lambda s: natural_key(s[0]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        kind = special_kind(path)
        if kind is not None:  # a FIFO would block the read forever: not opened, the sample is skipped and named
            raise OSError(f"{path} is {kind}, not an image file: not opened")
        return open(path, "rb"), target

    def _filename(self, index: int) -> str:
        return os.path.relpath(self.samples[index][0], self.root)


def unreadable_folder(paths) -> str | None:
    """The first of `paths` that is a folder this process may not list, as a one-line reason; None if none is (for
    commands that list through `pathlib`, which passes over such a folder without a word)."""
    for p in map(str, paths):
        try:
            if os.path.isdir(p):
                with os.scandir(p) as it:
                    next(it, None)
        except PermissionError as e:
            return str(_listing_error(p, e, p))
        except OSError:
            pass
    return None
