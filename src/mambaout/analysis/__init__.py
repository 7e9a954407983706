"""The paper's analysis tools: parameter and MAC counts, the Transformer FLOPs argument, ablation helpers.

Importing it registers the models of the paper's comparisons: DeiT ViT-Ti/S with full or causal attention
(`vit.py`) and MambaOut with Mamba's SSM in every block (`mamba.py`).
"""

from . import mamba, vit  # noqa: F401
