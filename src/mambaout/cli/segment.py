"""`mambaout segment train|validate|predict` (the options and actions: `mambaout.cli.dense`)."""

from __future__ import annotations

from mambaout.cli.dense import main as dense_main


def main(argv: list[str] | None = None) -> int:
    return dense_main("segment", argv)
