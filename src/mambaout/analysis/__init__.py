"""The paper's analysis tools: parameter and MAC counts and the Transformer FLOPs argument (`flops`), and
params, MACs and throughput of models side by side (`compare`). The paper's comparison models (DeiT ViTs, MambaOut
with Mamba's SSM) live in `mambaout.models.vit` and `mambaout.models.mamba`.
"""
