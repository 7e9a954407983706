"""MambaOut (Yu & Wang, CVPR 2025, arXiv 2405.07992) in the paper's order: Gated CNN block, stem, downsampling,
stage, head, network. Activations are channels-last `[B, H, W, C]`, as in the official code, so every LayerNorm and
Linear works on the last dimension without a permute. Parameter names follow timm's layout, so hub weights load as
they are (`mambaout.weights.checkpoint` maps the official layout onto it).
"""

# No `from __future__ import annotations` here: TorchScript reads these hints at run time, also in the code FX
# generates from `forward` (string hints there become unknown type names).
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partialmethod

import torch
from timm.layers import DropPath, LayerScale
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambaout import kernels
from mambaout.kernels import cpu as kernels_cpu
from mambaout.models.layers import ClassifierAPI, LayerNorm, get_act_layer, init_weights

__all__ = [
    "MambaOut",
    "GatedCNNBlock",
    "Stem",
    "Downsample",
    "MambaOutStage",
    "ClassifierHead",
    "FeatureInfo",
    "LEAF_MODULES",
]


class GatedCNNBlock(nn.Module):
    """The Gated CNN block, the only token mixer of MambaOut (paper Fig. 1a, Mamba's block minus the SSM).

    `x + fc2(act(g) * [i, dwconv(c)])` with `[g, i, c] = fc1(norm(x))`: the gate `g` spans the hidden
    width, and the 7x7 depthwise conv runs on only the last `conv_ratio * dim` hidden channels (the
    partial-channel trick of ShuffleNet V2 / InceptionNeXt); the other hidden channels `i` pass unchanged.

    `expansion_ratio` 8/3 keeps the block's parameters at 8·dim², like an MLP of ratio 4; `ls_init_value=None` (the
    paper's models) means no LayerScale.
    """

    def __init__(
        self,
        dim: int,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        ls_init_value: float | None = None,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop_path: float = 0.0,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        if not 0 < conv_channels <= hidden:
            raise ValueError(
                f"conv_ratio={conv_ratio} gives {conv_channels} conv channels for dim={dim}; "
                f"it must give between 1 and the hidden width {hidden} (expansion_ratio={expansion_ratio})"
            )
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the conv keeps the spatial size, got {kernel_size}")
        self.hidden = hidden
        self.conv_channels = conv_channels
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)  # g, i, c
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.device_type = self.fc1.weight.device.type  # where the parameters live; kept current by `_apply`

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        # Same function, faster kernels where they apply (mambaout.kernels); the reference below defines the math.
        # Scripting and FX tracing always see the reference: one plain graph, with no branch on tensor properties.
        if not torch.jit.is_scripting():
            if kernels.fastpath_enabled() and not kernels.fx_tracing():
                return self._forward_fast(x)
        return self._forward_reference(x)

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.cuda()`, `.half()` ... all come through here: record where the parameters now live, so the
        # forward picks its implementation from a plain attribute, never from the input tensor.
        module = super()._apply(fn, *args, **kwargs)
        self.device_type = self.fc1.weight.device.type
        return module

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        on_gpu = self.device_type == "cuda" or kernels.triton_interpreting()
        if on_gpu and kernels.fused_kernels_enabled() and self._fused_act() is not None:
            return self._forward_fused_gpu(x)  # opt-in: see mambaout.kernels
        if self.device_type == "cpu" and kernels_cpu.can_use_cpu_fastpath(self, x):
            return kernels_cpu.gated_block_inference(self, x)
        return self._forward_reference(x)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        shortcut = x
        x = self.fc1(self.norm(x))  # [B, H, W, 2 * hidden]
        g, i, c = torch.split(x, self.split_sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2))  # [B, H, W, Cc] -> [B, Cc, H, W] (a channels-last view)
        c = c.permute(0, 2, 3, 1)  # [B, Cc, H, W] -> [B, H, W, Cc]
        x = self.fc2(self.act(g) * torch.cat((i, c), dim=-1))  # [B, H, W, hidden] -> [B, H, W, C]
        return shortcut + self.drop_path(self.ls(x))

    def _fused_act(self) -> str | None:
        """The Triton kernel's name for this block's activation, or None when the fused GPU kernel does not apply."""
        act = {nn.GELU: "gelu", nn.SiLU: "silu"}.get(type(self.act))
        exact = getattr(self.act, "approximate", "none") == "none"  # tanh-approximated GELU is another function
        conv = self.conv
        plain_conv = type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and conv.stride == (1, 1)
        plain_conv = plain_conv and conv.dilation == (1, 1) and not (conv._forward_hooks or conv._forward_pre_hooks)
        return act if act and exact and plain_conv and not torch.jit.is_tracing() else None

    def _forward_fused_gpu(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C], CUDA
        """One Triton kernel for `act(g) * [i, dwconv(c)]` (mambaout.kernels.gated_dwconv), forward and backward."""
        from mambaout.kernels.gated_dwconv import gated_dwconv, triton_available

        if not triton_available(x.device):
            return self._forward_reference(x)
        y = self.fc1(self.norm(x))  # [B, H, W, 2 * hidden]
        x2 = self.fc2(gated_dwconv(y, self.conv.weight, self.conv.bias, self.hidden, self._fused_act()))
        return x + self.drop_path(self.ls(x2))


class Stem(nn.Module):
    """Two stride-2 3x3 convs (from InternImage): `[B, in_chans, H, W]` -> `[B, H/4, W/4, dim]`.

    The paper's models normalise between the two convs (`mid_norm`); timm's `_rw` models do not.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        mid_norm: bool = True,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = norm_layer(dim // 2) if mid_norm else None
        self.act = act_layer()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        if torch.jit.is_scripting():
            x = self.conv1(x)
            if self.norm1 is not None:
                x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # norm over channels, back to [B, C, H, W]
            x = self.conv2(self.act(x))
        else:
            x = _conv(self.conv1, x)  # on the CPU path channels-last: the norm reads its channels in place
            if self.norm1 is not None:  # the activation in the norm's pass where the CPU path runs it
                x = _norm(self.norm1, x.permute(0, 2, 3, 1), self.act).permute(0, 3, 1, 2)
            else:
                x = self.act(x)
            x = _conv(self.conv2, x)
            return _norm(self.norm2, x.permute(0, 2, 3, 1))  # [B, C, H, W] -> [B, H, W, C]
        return self.norm2(x.permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """Stride-2 3x3 conv between stages, channels-last in and out.

    The paper's models normalise after the conv; timm's `_rw` models before it (`norm_first`), which
    also normalises the residual stream leaving the previous stage.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_first: bool = False, norm_layer=LayerNorm):
        super().__init__()
        self.norm_first = norm_first
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(in_dim if norm_first else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        if self.norm_first:
            x = self.norm(x)
        if torch.jit.is_scripting():
            x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return x if self.norm_first else self.norm(x)
        x = _conv(self.conv, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # conv in [B, C, H, W], back to [B, H, W, C]
        return x if self.norm_first else _norm(self.norm, x)


def _norm(norm: nn.Module, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
    """`norm(x)` (`act(norm(x))` with `act`) over the channels of `[B, H, W, C]`, on CPU through the inference path
    where it applies (kernels/cpu.py: an exact GELU in the C norm's pass)."""
    y = None
    if kernels.fastpath_enabled() and not kernels.fx_tracing():
        y = kernels_cpu.outer_norm(norm, x, act)
    if y is None:
        y = norm(x)
        return y if act is None else act(y)
    return y


def _linear(lin: nn.Module, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
    """`act(lin(x))` (`lin(x)` without `act`), on CPU through the inference path's C matmul where it applies
    (kernels/cpu.py: the head's linears, the GELU in the matmul)."""
    y = None
    if kernels.fastpath_enabled() and not kernels.fx_tracing():
        y = kernels_cpu.outer_linear(lin, x, act)
    if y is None:
        y = lin(x)
        return y if act is None else act(y)
    return y


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, through the CPU inference path where it applies (channels-last memory in and out, kernels/cpu.py)."""
    if kernels.fastpath_enabled() and not kernels.fx_tracing() and kernels_cpu.can_use_cpu_conv(conv, x):
        return kernels_cpu.conv_channels_last(conv, x)
    return conv(x)


class MambaOutStage(nn.Module):
    """An optional downsampling layer followed by `depth` Gated CNN blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        downsample_norm_first: bool = False,
        drop_path: Sequence[float] = (),
        norm_layer=LayerNorm,
        block_layer: Callable[..., nn.Module] | None = None,
        **block_kwargs,
    ):
        super().__init__()
        if not downsample and in_dim != dim:
            raise ValueError(f"a stage without downsampling keeps its width, got {in_dim} -> {dim}")
        self.downsample = Downsample(in_dim, dim, downsample_norm_first, norm_layer) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.0] * depth
        block = block_layer or GatedCNNBlock
        self.blocks = nn.Sequential(
            *[block(dim, drop_path=drop_path[j], norm_layer=norm_layer, **block_kwargs) for j in range(depth)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                # Non-reentrant checkpointing replays the RNG state, so drop path draws the same masks.
                x = checkpoint(block, x, use_reentrant=False)
            return x
        if not torch.jit.is_scripting():
            y = self._forward_cpu(x)
            if y is not None:
                return y
        return self.blocks(x)

    @torch.jit.unused
    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor | None:
        """The blocks through the CPU inference path as one stage (kernels/cpu.py), or None where it does not apply."""
        if not kernels.fastpath_enabled() or kernels.fx_tracing():
            return None
        if not all(type(b) is GatedCNNBlock and b.device_type == "cpu" for b in self.blocks):
            return None
        plans = kernels_cpu.stage_plans(self.blocks, x)
        return kernels_cpu.run_stage(plans, x) if plans is not None else None


class ClassifierHead(nn.Module):
    """The paper's head, `pool -> norm -> fc -> GELU -> norm -> dropout -> fc` (`mlp_norm=True`); timm's `_rw` head
    drops the norm inside the MLP (`mlp_norm=False`). Both use GELU whatever the blocks use. `num_classes=0` leaves the
    pre-logits features, `mlp_ratio=0` makes a plain linear classifier, `global_pool=''` keeps the spatial map.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 1000,
        mlp_ratio: float = 4,
        mlp_norm: bool = True,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        norm_layer=LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        _check_pool(global_pool)
        self.global_pool = global_pool
        self.in_features = in_features
        self.norm = norm_layer(in_features)
        if mlp_ratio:
            hidden = int(mlp_ratio * in_features)
            layers = [("fc", nn.Linear(in_features, hidden)), ("act", act_layer())]
            if mlp_norm:
                layers.append(("norm", norm_layer(hidden)))
            self.pre_logits = nn.Sequential(OrderedDict(layers))
            self.num_features = hidden
        else:
            self.pre_logits = nn.Identity()
            self.num_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """A fresh final linear layer for `num_classes`; `reset_other` also drops the norm and the MLP before it."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        ref = self.fc.weight if isinstance(self.fc, nn.Linear) else next(self.parameters(), torch.empty(0))
        if reset_other:
            self.norm = nn.Identity()
            self.pre_logits = nn.Identity()
            self.num_features = self.in_features
        self.fc = nn.Identity()
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            init_weights(self.fc)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # [B, H, W, C]
        if self.global_pool == "avg":
            x = x.mean((1, 2))  # [B, H, W, C] -> [B, C]
        if torch.jit.is_scripting():
            x = self.drop(self.pre_logits(self.norm(x)))
            return x if pre_logits else self.fc(x)
        else:  # the CPU path's norms and linears in C
            x = self.drop(self._mlp(_norm(self.norm, x)))
            return x if pre_logits else _linear(self.fc, x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """`self.pre_logits(x)`: the MLP as built (fc, act and, with `mlp_norm`, norm) step by step, so that the CPU
        path runs fc and its GELU as one C matmul; anything else (hooked, replaced or no MLP) as the module."""
        mlp = self.pre_logits
        layers = mlp._modules
        if type(mlp) is not nn.Sequential or mlp._forward_hooks or mlp._forward_pre_hooks:
            return mlp(x)
        if list(layers) not in (["fc", "act"], ["fc", "act", "norm"]):
            return mlp(x)
        x = _linear(layers["fc"], x, layers["act"])
        return _norm(layers["norm"], x) if "norm" in layers else x


# What an FX graph should call as modules to run the same code as eager, bit for bit: under `no_grad` their CPU
# forwards take fast paths that tracing (which sees the reference) cannot record. `register_timm()` tells timm.
LEAF_MODULES = (GatedCNNBlock, Stem, Downsample, ClassifierHead)


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")


class FeatureInfo(list):
    """One `{'num_chs', 'reduction', 'module', 'index'}` dict per feature map, with timm's accessors. `out_indices`:
    the entries' stage indices; `idx` in the accessors indexes the entries (an int, a list of ints, or None for all), as
    timm's `FeatureInfo` does over its own `out_indices`."""

    def __init__(self, entries=(), out_indices: Sequence[int] | None = None):
        super().__init__(entries)
        self._out_indices = tuple(out_indices) if out_indices is not None else None

    @property
    def out_indices(self) -> tuple[int, ...]:
        return self._out_indices if self._out_indices is not None else tuple(f["index"] for f in self)

    def _at(self, fn: Callable[[dict], object], idx: int | Sequence[int] | None):
        """`fn` of the entry `idx`, or the list of it over the entries `idx` (all when None)."""
        if isinstance(idx, int):
            return fn(self[idx])
        return [fn(self[i]) for i in (range(len(self)) if idx is None else idx)]

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        return self._at(lambda f: f[key], idx)

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        return self._at(lambda f: dict(f) if keys is None else {k: f[k] for k in keys}, idx)

    channels = partialmethod(get, "num_chs")
    reduction = partialmethod(get, "reduction")
    module_name = partialmethod(get, "module")


class _Backbone:
    """What `MambaOut` and `MambaOutFeatures` share: timm's older name for `pretrained_cfg`, `default_cfg`, and
    gradient checkpointing."""

    __jit_unused_properties__ = ["default_cfg"]  # TorchScript compiles the forward, not the config accessors

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, same outputs and gradients."""
        for stage in self.stages:
            stage.grad_checkpointing = enable


def _check_output_fmt(output_fmt) -> None:
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")


def _stage_maps(stem: nn.Module, stages: nn.Sequential, x: torch.Tensor, take: Sequence[int], output_fmt: str):
    """(the last stage's output, the outputs of the stages in `take`, made plain NCHW tensors for necks if asked)."""
    x = stem(x)
    feats = []
    for i, stage in enumerate(stages):
        x = stage(x)
        if i in take:
            feats.append(x.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x)  # -> [B, C, H, W]
    return x, feats


class MambaOut(_Backbone, ClassifierAPI, nn.Module):
    """MambaOut: a 4-stage hierarchical network of Gated CNN blocks (paper Fig. 2).

    Args:
        num_classes: Classifier outputs; 0 for no classifier.
        expansion_ratio, kernel_size, conv_ratio, ls_init_value: Every block's (see `GatedCNNBlock`).
        stem_mid_norm, downsample_norm_first, head_mlp_norm: The paper's design is True, False, True; timm's `_rw`
            models are the opposite (see `Stem`, `Downsample`, `ClassifierHead`).
        drop_path_rate: Stochastic depth, rising linearly from 0 at the first block to this at the last.
        drop_rate: Dropout before the classifier (the official `head_dropout`).
        act_layer: Activation of the blocks and stem (`'gelu'`, `'silu'` or a module class).
        block_layer: The block class (default `GatedCNNBlock`); any module taking the same arguments and
            mapping `[B, H, W, C]` to itself, e.g. a Mamba block (Gated CNN + SSM) for the paper's comparison.
    """

    output_fmt = "NHWC"  # what forward_features returns (timm's convention for generic consumers)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 576),
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        ls_init_value: float | None = None,
        stem_mid_norm: bool = True,
        downsample_norm_first: bool = False,
        head_mlp_ratio: float = 4,
        head_mlp_norm: bool = True,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        block_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths and dims need one entry per stage, got {len(depths)} depths and {len(dims)} dims")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        act_layer = get_act_layer(act_layer)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = dims[-1]

        self.stem = Stem(in_chans, dims[0], stem_mid_norm, norm_layer, act_layer)
        # Stochastic depth grows linearly over all blocks of the network (official `torch.linspace`).
        dp_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        block_kwargs = dict(expansion_ratio=expansion_ratio, kernel_size=kernel_size, conv_ratio=conv_ratio)
        block_kwargs.update(ls_init_value=ls_init_value, act_layer=act_layer, block_layer=block_layer)
        self.stages = nn.Sequential()
        self.feature_info = FeatureInfo()
        in_dim, start = dims[0], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            dp = dp_rates[start : start + depth]
            stage = MambaOutStage(in_dim, dim, depth, i > 0, downsample_norm_first, dp, norm_layer, **block_kwargs)
            self.stages.append(stage)
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}", index=i))
            in_dim, start = dim, start + depth

        self.head = ClassifierHead(
            dims[-1], num_classes, head_mlp_ratio, head_mlp_norm, drop_rate, global_pool, norm_layer
        )
        self.head_hidden_size = self.head.num_features
        self.pretrained_cfg: dict = {}  # eval transform and provenance; create_model fills it (timm's fields)
        self.apply(init_weights)

    # --- the model API timm-style consumers call ---------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> last stage's map `[B, H/32, W/32, C]` (channels-last, as the blocks keep it)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """A freshly initialised final linear layer for `num_classes` outputs (0 removes it); `global_pool=''` keeps
        the spatial map; `reset_other` also drops the head's norm and MLP (timm's meaning)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other)
        self.head_hidden_size = self.head.num_features

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay: norms, biases and LayerScale (all the 1-D ones)."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth, for layer-wise learning-rate decay (timm's convention)."""
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        return dict(
            stem=r"^stem", blocks=[(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = len(self.stages)
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices} asks for the last {indices} stages of a {n}-stage model")
            return list(range(n - indices, n))
        for i in indices or ():
            if not -n <= i < n:
                raise ValueError(f"stage index {i} is out of range for a {n}-stage model")
        return sorted({i % n for i in (range(n) if indices is None else indices)})

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs alongside the final features: the stage maps, or `(final_features_NHWC, stage_maps)`.

        `indices`: all stages if None, the last n if an int, else those listed (negative allowed). `norm`: accepted for
        timm (MambaOut has no per-stage output norm). `stop_early` skips the stages after the last requested one when
        `intermediates_only`."""
        _check_output_fmt(output_fmt)
        take = self._take_indices(indices)
        last = take[-1] if (stop_early and intermediates_only) else len(self.stages) - 1
        x, feats = _stage_maps(self.stem, self.stages[: last + 1], x, take, output_fmt)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last index in `indices`; returns the kept indices. With `prune_head` the head
        goes too: `forward` then returns the last kept stage's map `[B, H, W, C]`, and `num_features` /
        `head_hidden_size` are that stage's width. The head, sized for the last stage, can only stay
        (`prune_head=False`) when that stage stays. `prune_norm`: timm's signature (MambaOut has no such norm).
        """
        take = self._take_indices(indices)
        if not prune_head and take[-1] != len(self.stages) - 1:
            raise ValueError(
                f"prune_head=False keeps a head sized for stage {len(self.stages) - 1}, which pruning to stage "
                f"{take[-1]} removes; pass prune_head=True, or include the last stage in indices"
            )
        self.stages = self.stages[: take[-1] + 1]
        self.feature_info = FeatureInfo(self.feature_info[: take[-1] + 1])
        if prune_head:
            width = self.feature_info[-1]["num_chs"]
            self.head = ClassifierHead(width, 0, mlp_ratio=0, global_pool="", norm_layer=lambda d: nn.Identity())
            self.num_classes = 0
            self.num_features = self.head_hidden_size = width
        return take


class MambaOutFeatures(_Backbone, nn.Module):
    """A MambaOut backbone for detection and segmentation: returns the maps of `out_indices` (strides 4/8/16/32).
    Built by `create_model(name, features_only=True)`; only the stages up to the last requested one are kept."""

    def __init__(self, model: MambaOut, out_indices: Sequence[int] = (0, 1, 2, 3), output_fmt: str = "NCHW"):
        super().__init__()
        _check_output_fmt(output_fmt)
        self.out_indices = model._take_indices(out_indices)
        self.output_fmt = output_fmt
        self.stem = model.stem
        self.stages = model.stages[: self.out_indices[-1] + 1]
        self.feature_info = FeatureInfo((model.feature_info[i] for i in self.out_indices), self.out_indices)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        for attr in ("model_name", "model_kwargs", "class_names"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _stage_maps(self.stem, self.stages, x, self.out_indices, self.output_fmt)[1]
