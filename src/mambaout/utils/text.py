"""Text for a terminal: a class or file name may hold a newline that forges a result line, ESC sequences or the
bidirectional overrides that make a name display as another, so human-readable output passes names through
`printable` (`--json` output stays exact: JSON escapes control characters itself)."""

from __future__ import annotations

import unicodedata


def printable(text) -> str:
    """`text` with every character Python deems unprintable (control and format characters, line and paragraph
    separators; spaces other than U+0020 excepted) written as its escape: `\\x1b`, `\\n`, `\\u202e`."""
    return "".join(
        ch if ch.isprintable() or unicodedata.category(ch) == "Zs" else ch.encode("unicode_escape").decode("ascii")
        for ch in str(text)
    )


def count(n: int, noun: str) -> str:
    """`n` and the noun, plural unless `n` is 1: `count(1, "picture")` is "1 picture", `count(2, ...)` "2 pictures"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
