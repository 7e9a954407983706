"""Recipes: YAML files of settings, found by name or path, and listed (`--list-recipes`) with the hardware, wall time
and result their leading comment lines state (`# hardware: ...`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mambaout.utils.files import regular_file

HEADER_FIELDS = ("hardware", "wall time", "result")  # `top-1:` is a classification recipe's result
_WIDTH = 48  # characters of a header field shown in the table


def find_recipe(name_or_path: str, folders: list[Path], what: str = "recipe") -> Path:
    """A recipe path (`.yaml`/`.yml`, or an existing file), or a name looked up in `folders`, first match wins
    (FileNotFoundError: no such file, a path that is no regular file, or no recipe of that name)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return regular_file(p, f"{what} file")  # a FIFO is never opened
    for folder in folders:
        for ext in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{ext}").is_file():
                return folder / f"{name_or_path}{ext}"
    names = ", ".join(list_recipes(folders)) or "none"
    raise FileNotFoundError(f"no {what} named {name_or_path!r}; available: {names}")


def list_recipes(folders: list[Path]) -> list[str]:
    """The names of the recipes in `folders`, sorted."""
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.y*ml")})


def recipe_header(path: Path) -> dict[str, str]:
    """The `# field: text` lines of a recipe's leading comment (continuation lines dropped), by lower-case field."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("#"):
            break
        field, sep, text = line.lstrip("# ").partition(":")
        if sep and field.strip().lower() in (*HEADER_FIELDS, "top-1") and field.strip().lower() not in out:
            out[field.strip().lower()] = " ".join(text.split())
    if "top-1" in out:
        out.setdefault("result", "top-1 " + out.pop("top-1"))
    return out


def recipe_table(folders: list[Path], task: str, task_of: Callable[[Path], str] | None = None) -> str:
    """An aligned table of the `task` recipes in `folders` (`task_of`: a recipe file's task, where a folder holds
    several tasks' recipes): name, task, and the hardware, wall time and result their headers state."""

    def cut(text: str) -> str:  # the statement, without its parenthesised details
        text = text.split(" (")[0].split("; ")[0].rstrip(",;.")
        return text if len(text) <= _WIDTH else text[: _WIDTH - 3] + "..."

    rows = [("recipe", "task", *HEADER_FIELDS)]
    for name in list_recipes(folders):
        path = find_recipe(name, folders)
        if task_of is not None and task_of(path) != task:
            continue
        header = recipe_header(path)
        rows.append((name, task, *(cut(header.get(f, "-")) for f in HEADER_FIELDS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
