"""DeiT's ViT (pre-norm, learned position embedding, class token, linear classifier) with fully-visible or causal
attention (token t sees only tokens 0..t, as an RNN or SSM scans): the paper's Fig. 3b (docs/analysis.md).

The class token comes LAST in the sequence (DeiT puts it first): full attention does not care, and with causal
attention the last token is the only one that sees every patch. Patches enter in row-major order.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambaout.models.layers import ClassifierAPI, LayerNorm, init_weights  # LayerNorm: eps 1e-6, as DeiT's

__all__ = ["VisionTransformer", "Attention", "Block"]


class Attention(nn.Module):
    """Multi-head self-attention; `causal=True` lets token t attend to tokens 0..t only."""

    def __init__(self, dim: int, num_heads: int, causal: bool = False, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, L, 3, h, d/h] -> 3 x [B, h, L, d/h]
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x.transpose(1, 2).reshape(b, length, d)  # [B, h, L, d/h] -> [B, L, D]
        return self.proj(x)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """MACs of Q·Kᵀ and attn·V, which are no Linear (`count_macs` adds them): 2·L²·D per sequence, causal too
        (SDPA computes the full product and masks it, as fvcore would count)."""
        b, length, d = input_shape
        return 2 * b * length * length * d


class Block(nn.Module):
    """Pre-norm Transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))` (MLP ratio 4, GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, causal: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, causal)
        self.norm2 = LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(ClassifierAPI, nn.Module):
    """ViT with a class token, learned position embedding and a `causal` attention switch. The position embedding is
    made for `img_size`; other sizes (multiples of `patch_size`) interpolate it bicubically, so the same model trains
    at 64 px and evaluates at 224 px. `num_classes=0`: no classifier.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.in_chans, self.num_classes, self.causal = in_chans, num_classes, causal
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = embed_dim
        self.grid = img_size // patch_size
        # Parameter names `stem.*` and `head.fc.*` follow MambaOut's, so our checkpoint loader (which recognises
        # our layout by `stem.*` and refits a classifier of another size at `head.fc.*`) handles ViTs unchanged.
        self.stem = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)  # the patch embedding
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # One embedding per patch (row-major) and one for the class token, which comes last (module docstring).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # plain floats, also under meta
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, causal, dpr[i]) for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        fc = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head = nn.Sequential(OrderedDict(drop=nn.Dropout(drop_rate), fc=fc))
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an `h x w` patch grid: `[1, h*w + 1, D]`."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        patch_pos, cls_pos = self.pos_embed[:, :-1], self.pos_embed[:, -1:]
        d = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)  # [1, N, D] -> [1, D, g, g]
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, d)  # [1, D, h, w] -> [1, h*w, D]
        return torch.cat((patch_pos, cls_pos), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` -> token sequence `[B, H/p * W/p + 1, D]` (patches row-major, class token last)."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of patch_size={self.patch_size}")
        x = self.stem(x)  # [B, C, H, W] -> [B, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D], row-major
        x = torch.cat((x, self.cls_token.expand(x.shape[0], -1, -1)), dim=1)  # class token last
        return x + self._pos_embed(h, w)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The Transformer on a token sequence `[B, L, D]` -> `[B, L, D]` (normed): what the causality test probes."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> all output tokens `[B, L, D]`."""
        return self.forward_tokens(self.embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head.drop(x[:, -1])  # the class token
        return x if pre_logits else self.head.fc(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        ref = self.norm.weight
        self.head.fc = nn.Identity()
        if num_classes:
            self.head.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            init_weights(self.head.fc)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Norms, biases, the class token and the position embedding go without weight decay (DeiT)."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name in ("cls_token", "pos_embed")}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^stem", blocks=r"^blocks\.(\d+)")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):  # the patch embedding, initialised like a linear layer of its fan-in
        nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])))
        nn.init.zeros_(m.bias)
    else:
        init_weights(m)
