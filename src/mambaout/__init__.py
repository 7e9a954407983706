"""MambaOut (Yu & Wang, CVPR 2025): vision backbones of Gated CNN blocks, exact to the published weights.

The public names below are imported on first use (PEP 562), so `import mambaout` and the command line start
without loading torch; `mambaout.create_model` and `from mambaout import create_model` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_MODULES = {
    "mambaout.models.factory": "create_model",
    "mambaout.models.mambaout": "GatedCNNBlock MambaOut MambaOutFeatures",
    "mambaout.models.timm_compat": "register_timm unregister_timm",
    "mambaout.models.variants": "get_variant list_models list_pretrained",
    "mambaout.weights.checkpoint": "CheckpointError DownloadError read_checkpoint save_weights",
}
_API = {name: module for module, names in _MODULES.items() for name in names.split()}  # public name -> its module
__all__ = [  # literal, for linters and type checkers
    "CheckpointError",
    "DownloadError",
    "GatedCNNBlock",
    "MambaOut",
    "MambaOutFeatures",
    "create_model",
    "get_variant",
    "list_models",
    "list_pretrained",
    "read_checkpoint",
    "register_timm",
    "save_weights",
    "unregister_timm",
]
assert sorted(__all__) == sorted(_API)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from mambaout.models.factory import create_model
    from mambaout.models.mambaout import GatedCNNBlock, MambaOut, MambaOutFeatures
    from mambaout.models.timm_compat import register_timm, unregister_timm
    from mambaout.models.variants import get_variant, list_models, list_pretrained
    from mambaout.weights.checkpoint import CheckpointError, DownloadError, read_checkpoint, save_weights


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mambaout' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
