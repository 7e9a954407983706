"""The paper's analysis tools: parameter and MAC counts, the Transformer FLOPs argument, ablation helpers."""
