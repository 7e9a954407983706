"""Parameters and MACs counted as the paper counts them (fvcore's convention, docs/analysis.md), and the paper's
Transformer FLOPs argument (Sec. 3, Eq. 6-7).

The model runs once on the `meta` device (shapes only), so even the largest variant counts in milliseconds. Token
mixers whose arithmetic is no conv or linear layer (attention's matmuls, the SSM's scan) report it through an
`extra_macs(input_shape)` method, which `count_macs` adds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mambaout.utils.files import atomic_write


def count_macs(
    model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None, include_norms: bool = True
) -> int:
    """MACs of one forward pass of one `[1, C, H, W]` image (`in_chans` default `model.in_chans`, else 3); `model`
    is not modified (counted on a `meta`-device copy). `include_norms`: LayerNorms as fvcore counts them, 5 MACs per
    element (4 without affine)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = in_chans or getattr(model, "in_chans", 3)
    total = 0

    def hook(m: nn.Module, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):  # one MAC per weight per output element
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.LayerNorm):
            total += inputs[0].numel() * (5 if m.elementwise_affine else 4)
        else:
            total += int(m.extra_macs(tuple(inputs[0].shape)))

    real = any(p.device.type != "meta" for p in model.parameters())
    meta_model = copy.deepcopy(model).to("meta") if real else model
    counted = (nn.Conv2d, nn.Linear, nn.LayerNorm) if include_norms else (nn.Conv2d, nn.Linear)
    handles = [
        m.register_forward_hook(hook)
        for m in meta_model.modules()
        if isinstance(m, counted) or callable(getattr(m, "extra_macs", None))
    ]
    try:
        with torch.no_grad():
            meta_model.eval()(torch.empty(1, in_chans, h, w, device="meta"))
    finally:
        for hd in handles:
            hd.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- The Transformer FLOPs argument (paper Sec. 3) ------------------------------------------------------------------


def transformer_flops(dim: int, tokens: int) -> dict:
    """FLOPs of one Transformer block on `tokens` tokens of width `dim` by the paper's Eq. 6 (docs/analysis.md):
    `linear` (24·D²·L: projections and MLP), `quadratic` (4·D·L²: attention's two L×L products), `total`, the
    quadratic share `L / (6D + L)`, and Eq. 7's `threshold` 6·D above which the quadratic term dominates."""
    if dim < 1 or tokens < 1:
        raise ValueError(f"dim and tokens must be positive integers, got dim={dim}, tokens={tokens}")
    linear, quadratic, threshold = 24 * dim * dim * tokens, 4 * dim * tokens * tokens, long_sequence_threshold(dim)
    row = dict(dim=dim, tokens=tokens, linear=linear, quadratic=quadratic, total=linear + quadratic)
    return dict(row, quadratic_share=quadratic / row["total"], threshold=threshold, long_sequence=tokens > threshold)


def long_sequence_threshold(dim: int) -> int:
    """Eq. 7: the quadratic term exceeds the linear one when `4·D·L² > 24·D²·L`, i.e. when `L > 6·D`."""
    return 6 * dim


def plot_quadratic_share(dims: list[int], path: str, max_tokens: int | None = None) -> None:
    """Save a plot of the quadratic term's share of a block's FLOPs against L, with Eq. 7's threshold marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    max_tokens = max_tokens or 4 * long_sequence_threshold(max(dims))
    tokens = np.unique(np.geomspace(1, max_tokens, 400).astype(int))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for d in dims:
        (line,) = ax.plot(tokens, tokens / (6 * d + tokens), label=f"D = {d}")
        t = long_sequence_threshold(d)
        ax.axvline(t, color=line.get_color(), linestyle="--", linewidth=1)
        ax.annotate(f"L = 6D = {t}", (t, 0.5), xytext=(4, -14), textcoords="offset points", fontsize=8)
    ax.axhline(0.5, color="gray", linewidth=0.5)
    ax.set(xscale="log", xlabel="tokens L", ylabel="quadratic share 4DL² / (24D²L + 4DL²)", ylim=(0, 1))
    ax.set_title("Transformer block FLOPs (MambaOut Eq. 6-7)")
    ax.legend()
    fig.tight_layout()
    try:  # written beside the target and renamed: a device is refused, a full disk leaves no half-written PNG
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")
    finally:
        plt.close(fig)
