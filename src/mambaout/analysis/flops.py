"""Parameters and multiply-accumulates (MACs) counted the way the paper counts them.

The paper's MAC column (Table 1, e.g. tiny 4.5G) comes from fvcore, which counts one MAC per weight
per output element of every convolution and linear layer, plus 5 per element of each affine LayerNorm
(about 1% of the total); activations, the gate product and pooling are left out. We count the same way
by running the model once on the `meta` device (shapes only, no arithmetic), so even the largest
variant counts in milliseconds; `include_norms=False` gives the conv + linear MACs alone.
"""

from __future__ import annotations

import torch
from torch import nn


def count_macs(
    model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None, include_norms: bool = True
) -> int:
    """MACs of one forward pass of a single image, counted as the paper counts them.

    Args:
        model: Any module taking `[1, C, H, W]`; it is not modified (counted on a `meta`-device copy).
        img_size: Input height and width.
        in_chans: Input channels (default: `model.in_chans`, else 3).
        include_norms: Count LayerNorms as fvcore (and so the paper) does: 5 per element, 4 without affine.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = in_chans or getattr(model, "in_chans", 3)
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw  # one MAC per weight per output element

    def linear_hook(m: nn.Linear, inputs, out):
        nonlocal total
        total += out.numel() * m.in_features

    def norm_hook(m: nn.LayerNorm, inputs, out):
        nonlocal total
        total += inputs[0].numel() * (5 if m.elementwise_affine else 4)

    import copy

    meta_model = copy.deepcopy(model).to("meta") if _has_real_params(model) else model
    handles = []
    for m in meta_model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.LayerNorm) and include_norms:
            handles.append(m.register_forward_hook(norm_hook))
    try:
        with torch.no_grad():
            meta_model.eval()(torch.empty(1, in_chans, h, w, device="meta"))
    finally:
        for hd in handles:
            hd.remove()
    return total


def _has_real_params(model: nn.Module) -> bool:
    return any(p.device.type != "meta" for p in model.parameters())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
