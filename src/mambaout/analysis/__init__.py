"""The paper's analysis tools: parameter and MAC counts, the Transformer FLOPs argument, ablation helpers.

The models of the paper's comparisons, DeiT ViT-Ti/S with full or causal attention (`vit.py`) and MambaOut with
Mamba's SSM in every block (`mamba.py`), are registered in `mambaout.models.variants` by name and import path; this
package is imported only when one of them is built.
"""
