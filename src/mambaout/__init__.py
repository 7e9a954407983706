"""MambaOut (Yu & Wang, CVPR 2025): vision backbones of Gated CNN blocks, exact to the published weights."""

from .checkpoint import CheckpointError, DownloadError, read_checkpoint, save_weights
from .factory import create_model
from .model import GatedCNNBlock, MambaOut, MambaOutFeatures
from .timm_registry import register_timm, unregister_timm
from .variants import get_variant, list_models, list_pretrained

__version__ = "0.1.0"

__all__ = [
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
