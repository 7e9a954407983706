"""Optional dependencies: import them where a feature needs them, failing with one line that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a requested feature needs is not installed."""


def require(module: str, feature: str, install: str) -> ModuleType:
    """Import `module` for `feature`, or raise `MissingDependency` naming the `pip install` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install {install}"
        ) from e
