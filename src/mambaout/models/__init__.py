"""The networks: MambaOut in paper order, the registry of variants, the factory and timm compatibility.

Also the comparison models of the paper's analysis (DeiT ViTs in `vit.py`, MambaOut with Mamba's SSM in `mamba.py`),
registered by import path and built on demand.
"""
