"""The C kernel of the CPU path (mambaout.kernels.native): its arithmetic against a float64 reference, and how it is
built, cached and replaced by the oneDNN steps where it cannot be built."""

import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import mambaout
from mambaout.kernels import cpu, native


@pytest.fixture
def lib():
    lib = native.library()
    if lib is None:
        pytest.skip(f"the C kernels cannot be built here: {native.unavailable_reason()}")
    return lib


@pytest.fixture
def fresh_library(monkeypatch):
    """`native.library()` asked again in this test (it is cached per process), and again after it."""
    native.library.cache_clear()
    monkeypatch.setattr(native, "_REASON", [])
    yield
    native.library.cache_clear()


def _taps(weight):
    """A conv weight `[Cc, 1, k, k]` as the kernel reads it: float32 `[k, k, Cc]`, contiguous."""
    return weight.float().permute(2, 3, 0, 1).reshape(weight.shape[-1], weight.shape[-1], -1).contiguous()


def _reference(g, i, c, weight, bias):
    """float64: g * cat(i, depthwise_conv(c) + bias), every tensor `[B, H, W, *]`."""
    k = weight.shape[-1]
    conv = F.conv2d(c.double().permute(0, 3, 1, 2), weight.double(), bias, padding=k // 2, groups=weight.shape[0])
    parts = ([i.double()] if i is not None else []) + [conv.permute(0, 2, 3, 1)]
    return g.double() * torch.cat(parts, dim=-1)


# Odd sizes: channel counts off the 16-lane vector, no identity channels, maps narrower than the kernel, rows that
# split into unequal pixel blocks, the kernel sizes with and without a specialised loop, batch > 1.
SHAPES = [
    # (B, H, W, hidden, cc, k)
    (1, 14, 14, 64, 32, 7),
    (2, 9, 13, 40, 20, 7),
    (1, 5, 3, 37, 37, 7),
    (1, 1, 1, 16, 16, 7),
    (3, 6, 11, 50, 19, 3),
    (1, 8, 9, 33, 17, 5),
    (1, 6, 7, 20, 12, 9),
    (1, 23, 17, 96, 48, 7),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_map", [True, False])  # i and c as channel slices of one map, or two maps
def test_gate_dwconv_equals_float64_reference(lib, shape, dtype, one_map):
    B, H, W, hidden, cc, k = shape
    ni = hidden - cc
    torch.manual_seed(0)
    g = torch.randn(B, H, W, hidden).to(dtype)
    if one_map:
        ic = torch.randn(B, H, W, hidden).to(dtype)
        i, c = (ic[..., :ni] if ni else None), ic[..., ni:]
    else:
        i, c = (torch.randn(B, H, W, ni).to(dtype) if ni else None), torch.randn(B, H, W, cc).to(dtype)
    weight, bias = (torch.randn(cc, 1, k, k) * 0.2).to(dtype), torch.randn(cc).to(dtype)
    want = _reference(g, i, c, weight, bias.double())
    got = g.clone()
    native.gate_dwconv(got, i, c, _taps(weight), bias.float())
    assert got.dtype == dtype
    # float32 sums; bf16 stores round once, to 8 bits of mantissa (the plain path rounds the conv and each product)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    no_bias = g.clone()
    native.gate_dwconv(no_bias, i, c, _taps(weight), None)
    torch.testing.assert_close(no_bias.double(), _reference(g, i, c, weight, None), **tol)


def test_gate_dwconv_keeps_nan_and_inf(lib):
    """bf16 rounding keeps NaN a NaN and infinities infinite (a rounding trick that adds to the bits would not)."""
    g = torch.ones(1, 3, 3, 16, dtype=torch.bfloat16)
    c = torch.zeros(1, 3, 3, 16, dtype=torch.bfloat16)
    c[0, 1, 1, 0], c[0, 1, 1, 1] = float("nan"), float("inf")
    weight = torch.zeros(3, 3, 16)
    weight[1, 1] = 1.0  # the identity kernel: out = c
    native.gate_dwconv(g, None, c, weight, None)
    assert g[0, 1, 1, 0].isnan() and g[0, 1, 1, 1] == float("inf") and g[0, 1, 1, 2] == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gate_dwconv_same_result_for_any_thread_count(lib, threads):
    """Threads split the image rows; each output is summed in one order whatever the count."""
    torch.manual_seed(1)
    g, ic = torch.randn(2, 11, 9, 48), torch.randn(2, 11, 9, 48)
    weight = torch.randn(7, 7, 32)
    one = g.clone()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        native.gate_dwconv(one, ic[..., :16], ic[..., 16:], weight, None)
        torch.set_num_threads(threads)
        many = g.clone()
        native.gate_dwconv(many, ic[..., :16], ic[..., 16:], weight, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def _linear_reference(x, weight, bias, res, gelu=False):
    """float64 `x @ weight.T + bias`, its exact GELU if asked, `+ res`, of the tensors as stored."""
    y = x.double() @ weight.double().t() + (bias.double() if bias is not None else 0)
    y = F.gelu(y) if gelu else y
    return y + res.double() if res is not None else y


# (M, K, N): row counts off the 12-row tile, columns off the 32-column panel and the 16-lane vector (1, 15, 17, 33,
# 48), K odd (float32 only), one row, one column
LINEAR_SHAPES = [(1, 16, 16), (13, 37, 17), (25, 48, 48), (12, 96, 33), (5, 8, 1), (30, 64, 100), (49, 288, 15)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gelu", [True, False])
def test_linear_equals_float64_reference(lib, shape, dtype, residual, with_bias, gelu):
    M, K, N = shape
    if dtype == torch.bfloat16 and K % 2:
        pytest.skip("bf16 takes an even K (pairs along K)")
    torch.manual_seed(3)
    x, weight = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    res = torch.randn(M, N).to(dtype) if residual else None
    got = native.linear(x, *native.pack_linear(weight, bias), res=res, gelu=gelu)
    want = _linear_reference(x, weight, bias, res, gelu)
    assert got.dtype == dtype and got.shape == (M, N) and got.is_contiguous()
    scale = want.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * scale)
    else:  # float32 sums, one rounding to 8 bits at the store
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5 * scale)
    x4 = x.view(1, M, 1, K)  # any leading shape: rows are the product of all but the last dimension
    assert torch.equal(
        native.linear(x4, *native.pack_linear(weight, bias)),
        native.linear(x, *native.pack_linear(weight, bias)).view(1, M, 1, N),
    )


def test_linear_gelu_matches_torch_over_the_whole_range(lib):
    """The GELU in the matmul's store against torch's exact GELU on -12..12 (through an identity weight), with
    infinities and NaN as torch has them."""
    v = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([float("inf"), float("nan"), -88.0, 1e-30, 0.0])])
    x = torch.stack([v, torch.zeros_like(v)], dim=1)
    got = native.linear(x, *native.pack_linear(torch.tensor([[1.0, 0.0]]), None), gelu=True).view(-1)
    want = F.gelu(v.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=5e-7, equal_nan=True)


def test_linear_refuses_what_it_cannot_read(lib):
    with pytest.raises(ValueError, match="even number of inputs"):
        native.pack_linear(torch.randn(4, 7).to(torch.bfloat16), None)
    packed = native.pack_linear(torch.randn(4, 8), None)
    with pytest.raises(ValueError, match="contiguous x"):
        native.linear(torch.randn(8, 3).t(), *packed)
    with pytest.raises(ValueError, match="packed in x's dtype"):
        native.linear(torch.randn(3, 8).to(torch.bfloat16), *packed)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_same_result_for_any_thread_count(lib, threads):
    """Threads split the tiles; each output is summed in one order whatever the count."""
    torch.manual_seed(4)
    x, weight, res = torch.randn(61, 96), torch.randn(200, 96), torch.randn(61, 200)
    packed = native.pack_linear(weight, torch.randn(200))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear(x, *packed, res=res)
        torch.set_num_threads(threads)
        many = native.linear(x, *packed, res=res)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_model_with_the_c_kernel_equals_the_reference(lib, monkeypatch):
    monkeypatch.setattr(cpu, "_NATIVE", True)
    calls = []  # the C conv runs alone, or inside a whole block's call
    real, real_block = native.gate_dwconv, native.block
    monkeypatch.setattr(native, "gate_dwconv", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(native, "block", lambda *a: calls.append(a[0].shape) or real_block(*a))
    model = mambaout.create_model("mambaout_femto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got = model.forward_features(x)
        with mambaout.kernels.reference_mode():
            want = model.forward_features(x)
    assert len(calls) >= 18  # every block of femto's 3 + 3 + 9 + 3 (and "auto"'s timing runs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu, "_NATIVE", False)
    calls.clear()
    with torch.inference_mode():
        model.forward_features(x)
    assert not calls  # switched off: the oneDNN steps


def test_built_once_then_loaded_from_the_cache(fresh_library, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path))
    monkeypatch.delenv("MAMBAOUT_KERNEL_CACHE")  # the default: the cache folder's `kernels`
    if native.compile_command("x.so") is None:
        pytest.skip("no C compiler here")
    assert native.library() is not None, native.unavailable_reason()
    (built,) = (tmp_path / "kernels").glob("gated_cpu-*.so")
    native.library.cache_clear()
    monkeypatch.setattr(native, "_build", lambda path: pytest.fail(f"built again although {path} is cached"))
    assert native.library() is not None
    assert list((tmp_path / "kernels").glob("*")) == [built]  # no temporary left beside it


def test_a_damaged_cached_library_is_built_again(tmp_path):
    """A fresh process (one that loaded the library already would get that copy back from the dynamic loader)."""
    if native.compile_command("x.so") is None:
        pytest.skip("no C compiler here")
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from mambaout.kernels import native\n"
        "path = native._library_path(native._compiler())\n"
        "path.parent.mkdir(parents=True, exist_ok=True); path.write_bytes(b'cut short')\n"
        "assert native.library() is not None, native.unavailable_reason()\n"
        "print(path.stat().st_size)"
    )
    env = {**os.environ, "MAMBAOUT_KERNEL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 1000  # a whole library in place of the damaged file


@pytest.mark.parametrize(
    "cc, reason",
    [("/nonexistent/cc", "No such file"), ("false", "failed: exit status 1"), ("", "no C compiler found")],
)
def test_no_compiler_or_a_failing_one_warns_and_the_onednn_steps_run(fresh_library, tmp_path, monkeypatch, cc, reason):
    monkeypatch.setenv("MAMBAOUT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", cc)
    if not cc:
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpu, "_NATIVE", True)
    monkeypatch.setattr(cpu, "_PLANS", type(cpu._PLANS)())
    block = mambaout.create_model("mambaout_femto").stages[1].blocks[0].eval()
    x = torch.randn(1, 6, 5, block.fc1.in_features)
    with pytest.warns(RuntimeWarning, match="C kernels for CPU are unavailable") as caught, torch.no_grad():
        got = block(x)
        want = block._forward_reference(x)
    assert native.library() is None and reason in native.unavailable_reason()
    assert reason in str(caught[0].message) and len(caught) == 1  # one line, once per process
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            block(x)  # not warned again


def test_another_openmp_runtime_is_not_mixed_in(fresh_library, monkeypatch):
    assert native._torch_runs_libgomp()  # torch's Linux wheels: GNU OpenMP, which the library shares
    monkeypatch.setattr(native, "_torch_runs_libgomp", lambda: False)
    with pytest.warns(RuntimeWarning, match="GNU OpenMP"):
        assert native.library() is None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction set levels")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 without AVX-512; SSE2 only
def test_generic_code_for_cpus_without_avx512_is_right_too(fresh_library, tmp_path, monkeypatch, march):
    """This CPU's build takes the AVX-512 branches of the source; the portable vector code that AVX2 CPUs (opt-in,
    MAMBAOUT_CPU_NATIVE=1) compile is built here for an older instruction set and checked the same way."""
    monkeypatch.setenv("MAMBAOUT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(
        native, "_FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in native._FLAGS)
    )
    if native.library() is None:
        pytest.skip(f"the C kernels cannot be built here: {native.unavailable_reason()}")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(2)
        g, ic = torch.randn(2, 9, 13, 40).to(dtype), torch.randn(2, 9, 13, 40).to(dtype)
        weight, bias = (torch.randn(20, 1, 7, 7) * 0.2).to(dtype), torch.randn(20).to(dtype)
        want = _reference(g, ic[..., :20], ic[..., 20:], weight, bias.double())
        got = g.clone()
        native.gate_dwconv(got, ic[..., :20], ic[..., 20:], _taps(weight), bias.float())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-5)
        torch.testing.assert_close(got.double(), want, **tol)
    nan = torch.full((1, 1, 1, 16), float("nan"), dtype=torch.bfloat16)
    one = torch.ones(1, 1, 1, 16, dtype=torch.bfloat16)
    native.gate_dwconv(one, None, nan, torch.ones(7, 7, 16), None)
    assert one.isnan().all()
    for dtype in (torch.float32, torch.bfloat16):  # the matmul: no AVX512-BF16 dot product there
        x, weight, bias, res = (torch.randn(*s).to(dtype) for s in ((13, 48), (33, 48), (33,), (13, 33)))
        got = native.linear(x, *native.pack_linear(weight, bias), res=res)
        want = _linear_reference(x, weight, bias, res)
        rtol = 1e-5 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-5 * want.abs().max().item())
        got = native.linear(x, *native.pack_linear(weight, bias), gelu=True)
        want = _linear_reference(x, weight, bias, None, gelu=True)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-5 * want.abs().max().item())


def test_kernels_command_says_whether_the_c_kernels_run(monkeypatch, capsys):
    from mambaout.cli import kernels as command

    monkeypatch.setattr(cpu, "_NATIVE", False)
    monkeypatch.setattr(cpu, "_PACK_CONVS", False)
    assert command.main([]) == 0
    out = capsys.readouterr().out
    assert "MAMBAOUT_CPU_NATIVE=1" in out and "MAMBAOUT_CPU_PACK_CONVS=1" in out
    monkeypatch.setattr(cpu, "_PACK_CONVS", True)
    assert command.main([]) == 0
    assert "MAMBAOUT_CPU_PACK_CONVS=1" not in capsys.readouterr().out
    monkeypatch.setattr(cpu, "_NATIVE", True)
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "_REASON", ["no C compiler found (set CC, or install gcc)"])
    assert command.main([]) == 0
    assert "unavailable: no C compiler found" in capsys.readouterr().out
