"""`mambaout detect train|validate|predict` (see `mambaout.dense.cli`)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from mambaout.dense.cli import main as dense_main

    return dense_main("detect", argv)
