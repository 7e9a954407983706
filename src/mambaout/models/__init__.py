"""The networks: MambaOut in paper order, the comparison models of the paper's analysis (DeiT ViTs in `vit.py`, MambaOut
with Mamba's SSM in `mamba.py`, built on demand), the registry of variants, the factory and timm compatibility.
"""
