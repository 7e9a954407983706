"""The Mamba block: the Gated CNN block plus a selective state space model (paper Fig. 1a; Gu & Dao 2023, Alg. 2).

`MambaBlock` plugs into `MambaOut` through `block_layer`, so the SAME network trains with and without the SSM.
`SelectiveSSM` scans a 2-D map as ONE row-major sequence in one direction, as the paper's block does (Vim/VMamba
add more).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.models.layers import LayerNorm
from mambaout.models.mambaout import GatedCNNBlock, MambaOut

__all__ = ["selective_scan_ref", "selective_scan_chunked", "SelectiveSSM", "MambaBlock", "mamba_out_with_ssm"]


def _check_scan_shapes(x, dt, A, B, C, D) -> None:
    if x.ndim != 3 or dt.shape != x.shape:
        raise ValueError(f"x and dt must both be [batch, length, channels], got {tuple(x.shape)} and {tuple(dt.shape)}")
    b, length, e = x.shape
    if A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A must be [channels={e}, d_state], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, length, n):
            raise ValueError(f"{name} must be [batch={b}, length={length}, d_state={n}], got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (e,):
        raise ValueError(f"D must be [channels={e}], got {tuple(D.shape)}")


def selective_scan_ref(x, dt, A, B, C, D=None) -> torch.Tensor:
    """The selective scan `h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t`, `y_t = C_t h_t + D x_t`, one step after another.

    Shapes: `x` and the positive step sizes `dt` (after softplus) `[B, L, E]`; `A` `[E, N]` (diagonal per channel,
    negative: `-exp(A_log)`); `B`, `C` `[B, L, N]` (input-dependent); `D` `[E]` or None. Returns `y` `[B, L, E]`.
    """
    _check_scan_shapes(x, dt, A, B, C, D)
    b, length, e = x.shape
    h = x.new_zeros(b, e, A.shape[1])  # [B, E, N]: one N-dim state per channel
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None] * A)  # zero-order hold of A: [B, E, N]
        h = decay * h + (dt[:, t, :, None] * B[:, t, None, :]) * x[:, t, :, None]  # Euler step for B, as Mamba does
        ys.append((h * C[:, t, None, :]).sum(-1))  # [B, E, N] . [B, 1, N] -> [B, E]
    y = torch.stack(ys, dim=1)  # [B, L, E]
    return y if D is None else y + x * D


def selective_scan_chunked(x, dt, A, B, C, D=None, chunk_size: int = 16, within: str = "auto") -> torch.Tensor:
    """The selective scan as a chunked parallel scan: `selective_scan_ref`'s result, far fewer sequential steps.

    Within chunks of `chunk_size` steps (all chunks at once) the recurrence `h_t = a_t h_{t-1} + u_t` (`a_t =
    exp(Δ_t A)`, `u_t = Δ_t B_t x_t`) is solved in parallel; then the chunks are chained in order. `within`:
    `'logspace'`, two cumulative sums (`h_t = e^{S_t} Σ_{s≤t} e^{-S_s} u_s`, `S_t = Σ_{s≤t} log a_s`), fastest on a
    CPU, but `e^{-S}` overflows float32 once a chunk decays by more than e^-88; `'doubling'`, a Hillis-Steele scan of
    `(a, u) ∘ (a', u') = (a a', a' u + u')`, stable at any Δ (it only multiplies decays in (0, 1]) at about twice the
    memory traffic; `'auto'`, log space while every chunk decays by less than e^-60 (docs/analysis.md).
    """
    _check_scan_shapes(x, dt, A, B, C, D)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if within not in ("auto", "logspace", "doubling"):
        raise ValueError(f"within must be 'auto', 'logspace' or 'doubling', got {within!r}")
    b, length, e = x.shape
    n = A.shape[1]
    T = min(chunk_size, length)
    n_chunks = math.ceil(length / T)
    pad = n_chunks * T - length

    log_a = dt[..., None] * A  # per-step log decay [B, L, E, N], <= 0
    u = (dt * x)[..., None] * B[:, :, None, :]  # per-step input [B, L, E, N]
    if pad:  # padding steps decay by 1 (log 0) and add 0: they leave the state unchanged, and are cut off below
        log_a, u = F.pad(log_a, (0, 0, 0, 0, 0, pad)), F.pad(u, (0, 0, 0, 0, 0, pad))
    log_a = log_a.view(b, n_chunks, T, e, n)  # [B, L, E, N] -> [B, nC, T, E, N]
    u = u.view(b, n_chunks, T, e, n)

    # 1. Within chunks (all chunks in parallel): afterwards a[t] is the decay from the chunk's start to t and
    #    h[t] the state at t reached from a zero state at the chunk's start.
    S = torch.cumsum(log_a, dim=2)
    if within == "auto":
        # (a `meta` tensor, as when counting MACs, has shapes but no values to check)
        within = "logspace" if S.is_meta or S[:, :, -1].detach().amin() > -60.0 else "doubling"
    if within == "logspace":
        a = torch.exp(S)
        h = a * torch.cumsum(torch.exp(-S) * u, dim=2)
    else:
        a, h = torch.exp(log_a), u
        k = 1
        while k < T:
            a_prev = torch.cat((a.new_ones(b, n_chunks, k, e, n), a[:, :, :-k]), dim=2)  # a shifted right by k
            h_prev = torch.cat((h.new_zeros(b, n_chunks, k, e, n), h[:, :, :-k]), dim=2)
            h = h + a * h_prev
            a = a * a_prev
            k *= 2

    # 2. Across chunks, in order: the state entering chunk c is the one leaving chunk c-1.
    #    Only each chunk's last step is needed here; take it once (indexing the big tensors inside the loop would
    #    make autograd allocate a full-size gradient per index).
    h_last, a_last = h[:, :, -1].unbind(1), a[:, :, -1].unbind(1)  # nC x [B, E, N]
    carry = x.new_zeros(b, e, n)
    carries = []
    for c in range(n_chunks):
        carries.append(carry)
        carry = h_last[c] + a_last[c] * carry
    h0 = torch.stack(carries, dim=1)  # [B, nC, E, N]: state entering each chunk
    h = h + a * h0[:, :, None]  # [B, nC, T, E, N]

    h = h.reshape(b, n_chunks * T, e, n)[:, :length]  # [B, nC, T, E, N] -> [B, L, E, N]
    y = torch.einsum("blen,bln->ble", h, C)
    return y if D is None else y + x * D


class SelectiveSSM(nn.Module):
    """Mamba's S6 selective state space model as a token mixer of channels-last maps.

    Every channel has its own diagonal `d_state`-state SSM; Δ (per channel), B and C (shared over channels) are
    computed from the input at every position: this input dependence is what makes the scan "selective".
    `dt_rank='auto'` is `ceil(dim / 16)`; the initial Δ is log-uniform in [dt_min, dt_max], as in Mamba. `scan='ref'`
    runs the sequential reference scan.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        scan: str = "chunked",
        chunk_size: int = 16,
    ):
        super().__init__()
        if d_state < 1:
            raise ValueError(f"d_state must be a positive integer, got {d_state}")
        if scan not in ("chunked", "ref"):
            raise ValueError(f"scan must be 'chunked' or 'ref', got {scan!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.dim, self.d_state, self.scan, self.chunk_size = dim, d_state, scan, chunk_size
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.x_proj = nn.Linear(dim, self.dt_rank + 2 * d_state, bias=False)  # -> Δ (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, dim)
        # S4D-real initialisation, as Mamba: A_n = -(n + 1) for every channel.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))
        self._dt_range = (dt_min, dt_max)
        self.reset_dt()

    @torch.no_grad()
    def reset_dt(self) -> None:
        """Initialise Δ's projection so softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's init)."""
        dt_min, dt_max = self._dt_range
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """MACs of the scan itself, which is no Conv/Linear (`count_macs` adds them), for a `[B, H, W, E]` input.

        Per position, channel and state: Δ·A (1), Δ·B·x (2), the state update (1) and C·h (1), plus the D skip
        (the recurrence both scans compute).
        """
        b, h, w, e = input_shape
        return b * h * w * e * (5 * self.d_state + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, E]
        b, h, w, e = x.shape
        seq = x.reshape(b, h * w, e)  # [B, H, W, E] -> [B, L = H*W, E], row-major (raster) scan order
        dt, B, C = torch.split(self.x_proj(seq), (self.dt_rank, self.d_state, self.d_state), dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # [B, L, dt_rank] -> [B, L, E], positive step sizes
        A = -torch.exp(self.A_log.float())  # [E, N], negative so the state decays
        if self.scan == "ref":
            y = selective_scan_ref(seq, dt, A, B, C, self.D)
        else:
            y = selective_scan_chunked(seq, dt, A, B, C, self.D, self.chunk_size)
        return y.reshape(b, h, w, e)  # [B, L, E] -> [B, H, W, E]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.d_state}, dt_rank={self.dt_rank}, scan={self.scan!r}"


class MambaBlock(GatedCNNBlock):
    """The Mamba block of the paper's Fig. 1a: `x + fc2(act(g) * [i, ssm(act(dwconv(c)))])`, the conv output activated
    before the SSM as in Mamba. The rest (norm, fc1 split, partial-channel conv, gate, fc2, LayerScale, drop path) is
    the `GatedCNNBlock`'s, so `MambaOut(block_layer=MambaBlock)` differs from MambaOut by the SSM alone. `d_state`,
    `dt_rank`, `scan`, `chunk_size` are `SelectiveSSM`'s, which runs on the `conv_ratio * dim` conv channels.
    """

    def __init__(
        self,
        dim: int,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        ls_init_value: float | None = None,
        norm_layer=LayerNorm,
        act_layer=nn.GELU,
        drop_path: float = 0.0,
        d_state: int = 16,
        dt_rank: int | str = "auto",
        scan: str = "chunked",
        chunk_size: int = 16,
    ):
        super().__init__(dim, expansion_ratio, kernel_size, conv_ratio, ls_init_value, norm_layer, act_layer, drop_path)
        self.conv_act = act_layer()
        self.ssm = SelectiveSSM(self.conv_channels, d_state, dt_rank, scan=scan, chunk_size=chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        shortcut = x
        x = self.fc1(self.norm(x))  # [B, H, W, 2 * hidden]
        g, i, c = torch.split(x, self.split_sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2))  # [B, H, W, Cc] -> [B, Cc, H, W]
        c = self.ssm(self.conv_act(c.permute(0, 2, 3, 1)))  # [B, Cc, H, W] -> [B, H, W, Cc], then the SSM
        x = self.fc2(self.act(g) * torch.cat((i, c), dim=-1))  # [B, H, W, hidden] -> [B, H, W, C]
        return shortcut + self.drop_path(self.ls(x))


def mamba_out_with_ssm(
    d_state: int = 16, dt_rank: int | str = "auto", scan: str = "chunked", chunk_size: int = 16, **kwargs
) -> MambaOut:
    """A `MambaOut` (built from `kwargs`) whose every block is a `MambaBlock` with these SSM arguments: the network
    the paper argues vision does not need."""
    if "block_layer" in kwargs:
        raise ValueError("mamba_out_with_ssm sets block_layer itself; build MambaOut directly for another block")
    block = partial(MambaBlock, d_state=d_state, dt_rank=dt_rank, scan=scan, chunk_size=chunk_size)
    model = MambaOut(block_layer=block, **kwargs)
    for m in model.modules():  # undo MambaOut's generic init (of every Linear) on the SSM's Δ projection
        if isinstance(m, SelectiveSSM):
            m.reset_dt()
    return model
