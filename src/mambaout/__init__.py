"""MambaOut (Yu & Wang, CVPR 2025): vision backbones of Gated CNN blocks, exact to the published weights."""

from mambaout.models.factory import create_model
from mambaout.models.mambaout import GatedCNNBlock, MambaOut, MambaOutFeatures
from mambaout.models.timm_compat import register_timm, unregister_timm
from mambaout.models.variants import get_variant, list_models, list_pretrained
from mambaout.weights.checkpoint import CheckpointError, DownloadError, read_checkpoint, save_weights

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
