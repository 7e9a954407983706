"""The Mamba block: the chunked selective scan equals the sequential reference, and the block is MambaOut's + an SSM."""

import inspect

import pytest
import torch

import mambaout
from mambaout.analysis.flops import count_macs
from mambaout.models.mamba import MambaBlock, SelectiveSSM, selective_scan_chunked, selective_scan_ref
from mambaout.models.mambaout import GatedCNNBlock, MambaOut


def _inputs(b, length, e, n, dt_scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, e, generator=g, dtype=dtype)
    dt = torch.rand(b, length, e, generator=g, dtype=dtype) * dt_scale + 1e-3
    A = -torch.rand(e, n, generator=g, dtype=dtype) * 4 - 0.1
    B = torch.randn(b, length, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, n, generator=g, dtype=dtype)
    D = torch.randn(e, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


@pytest.mark.parametrize("within", ["logspace", "doubling", "auto"])
@pytest.mark.parametrize("length,chunk", [(1, 16), (7, 4), (37, 8), (50, 16), (33, 5), (17, 1), (29, 64)])
def test_chunked_scan_equals_reference_forward_and_backward(length, chunk, within):
    ref_in = _inputs(2, length, 3, 5)
    fast_in = [t.detach().clone().requires_grad_() for t in ref_in]
    y_ref = selective_scan_ref(*ref_in)
    y_fast = selective_scan_chunked(*fast_in, chunk_size=chunk, within=within)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, ref_in, grad_out)
    g_fast = torch.autograd.grad(y_fast, fast_in, grad_out)
    for name, a, b in zip("x dt A B C D".split(), g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name} differs")


def test_chunked_scan_is_stable_under_strong_decay_in_float32():
    # Δ up to 30 with |A| up to 4: per-step decays down to e^-120, where log-space cumsums of e^{-S} overflow;
    # 'auto' must notice and take the doubling scan.
    args = [t.detach().float() for t in _inputs(2, 64, 4, 8, dt_scale=30.0)]
    assert not torch.isfinite(selective_scan_chunked(*args, chunk_size=16, within="logspace")).all()
    y = selective_scan_chunked(*args, chunk_size=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(*args), rtol=1e-4, atol=1e-4)


def test_chunked_scan_float32_matches_reference_at_initial_step_sizes():
    args = [t.detach().float() for t in _inputs(3, 131, 6, 8, dt_scale=0.1)]  # Mamba's initial Δ range
    torch.testing.assert_close(selective_scan_chunked(*args), selective_scan_ref(*args), rtol=1e-4, atol=1e-5)


def test_scan_rejects_bad_shapes():
    x, dt, A, B, C, D = (t.detach() for t in _inputs(1, 5, 3, 2))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_chunked(x, dt, A.T, B, C, D)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(x, dt, A, B, C, D, chunk_size=0)
    with pytest.raises(ValueError, match="within"):
        selective_scan_chunked(x, dt, A, B, C, D, within="fft")


def test_ssm_is_causal_in_row_major_order():
    torch.manual_seed(0)
    ssm = SelectiveSSM(8, d_state=4).double()
    x = torch.randn(1, 5, 7, 8, dtype=torch.float64)  # [B, H, W, E], scanned row by row
    y = ssm(x)
    x2 = x.clone()
    x2[:, 2, 3:] += 1.0  # perturb row 2 from column 3 on, and everything after it in raster order...
    x2[:, 3:] += 1.0
    y2 = ssm(x2)
    seq, seq2 = y.reshape(1, 35, 8), y2.reshape(1, 35, 8)  # [B, H, W, E] -> [B, L, E]
    t = 2 * 7 + 3  # ...so the first changed position is 17
    torch.testing.assert_close(seq2[:, :t], seq[:, :t], rtol=0, atol=0)  # earlier positions: bit-identical
    assert (seq2[:, t:] - seq[:, t:]).abs().amax() > 1e-3


def test_ssm_chunked_and_reference_modules_agree():
    torch.manual_seed(0)
    fast = SelectiveSSM(12, d_state=6, scan="chunked", chunk_size=8)
    ref = SelectiveSSM(12, d_state=6, scan="ref")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 5, 9, 12)  # odd map: 45 tokens
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dt_initialisation_survives_mambaout_init():
    model = mambaout.create_model("mambaout_test_ssm", num_classes=10)
    for m in model.modules():
        if isinstance(m, SelectiveSSM):
            dt = torch.nn.functional.softplus(m.dt_proj.bias)
            assert dt.min() >= 0.001 - 1e-6 and dt.max() <= 0.1 + 1e-6  # Mamba's range, not zeros from trunc_normal
            torch.testing.assert_close(-torch.exp(m.A_log[0]), -torch.arange(1.0, m.d_state + 1))


def test_mamba_block_takes_gated_cnn_block_arguments():
    gated = inspect.signature(GatedCNNBlock).parameters
    mamba = inspect.signature(MambaBlock).parameters
    assert list(gated) == list(mamba)[: len(gated)]
    assert {"d_state", "dt_rank", "scan", "chunk_size"} <= set(mamba)


def test_same_network_with_and_without_ssm():
    """`block_layer=MambaBlock` gives MambaOut's exact parameters plus the SSMs', nothing else."""
    kw = dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), num_classes=7)
    plain = MambaOut(**kw)
    with_ssm = MambaOut(block_layer=MambaBlock, **kw)
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
    ssm_shapes = {k: v.shape for k, v in with_ssm.state_dict().items() if ".ssm." not in k}
    assert plain_shapes == ssm_shapes
    assert all(".ssm." in k for k in set(with_ssm.state_dict()) - set(plain_shapes))
    x = torch.randn(2, 3, 64, 48)
    assert with_ssm(x).shape == plain(x).shape == (2, 7)


def test_registered_ssm_model_trains_and_counts():
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test_ssm", num_classes=5)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The scan's MACs are added on top of the Gated CNN network's count.
    plain = mambaout.create_model("mambaout_test", num_classes=5)
    ssm_macs = sum(
        64 // 4 // 2**i * (64 // 4 // 2**i) * blk.conv_channels * (5 * blk.ssm.d_state + 1)
        for i, stage in enumerate(model.stages)
        for blk in stage.blocks
    )
    linear_macs = sum(
        (64 // 4 // 2**i) ** 2 * (blk.ssm.x_proj.weight.numel() + blk.ssm.dt_proj.weight.numel())
        for i, stage in enumerate(model.stages)
        for blk in stage.blocks
    )
    assert count_macs(model, 64) == count_macs(plain, 64) + ssm_macs + linear_macs


def test_mamba_block_reference_scan_gives_same_network_output():
    torch.manual_seed(0)
    fast = mambaout.create_model("mambaout_test_ssm", num_classes=3).eval()
    ref = mambaout.create_model("mambaout_test_ssm", num_classes=3, scan="ref").eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 40, 56)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
