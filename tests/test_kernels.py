"""The Triton gated depthwise-conv kernels against their PyTorch reference, on CPU through Triton's interpreter.

`TRITON_INTERPRET=1` must be set before triton is first imported (triton's own helpers such as `tl.zeros` are
decorated then) and only while these tests run: set globally it would send every CPU model in the session
through the (slow) interpreter. When an earlier test module already imported triton, this module runs itself in
a fresh subprocess with the variable set instead.
"""

import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch

from mambaout import kernels
from mambaout.models.mambaout import GatedCNNBlock

# In-process only if triton is not loaded yet (or the whole session is interpreted).
FRESH = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
in_process = pytest.mark.skipif(not FRESH, reason="triton was imported before without TRITON_INTERPRET: see subprocess")

gd = None
if FRESH:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        gd = importlib.import_module("mambaout.kernels.gated_dwconv")  # part of the package: an import error fails
    finally:
        if _before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _before
    if not gd._HAS_TRITON:
        pytest.skip("triton is not installed", allow_module_level=True)
    if type(gd._fwd_kernel).__name__ != "InterpretedFunction":
        pytest.skip(
            "mambaout.kernels.gated_dwconv was imported before without TRITON_INTERPRET=1; run this file on its own",
            allow_module_level=True,
        )


@pytest.mark.heavy
@pytest.mark.skipif(FRESH, reason="runs in process")
@pytest.mark.timeout(900)  # the whole file again, in Triton's interpreter
def test_kernels_in_a_fresh_interpreter_process():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", __file__]  # in one process
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if FRESH:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(B, H, W, hidden, cc, k, bias, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    y = torch.randn(B, H, W, 2 * hidden, dtype=dtype, requires_grad=True)
    w = (0.2 * torch.randn(cc, 1, k, k, dtype=dtype)).requires_grad_()
    b = torch.randn(cc, dtype=dtype, requires_grad=True) if bias else None
    return y, w, b


def _fwd_bwd(fn, y, w, b, hidden, act, dz):
    z = fn(y, w, b, hidden, act)
    leaves = [t for t in (y, w, b) if t is not None]
    return z, torch.autograd.grad(z, leaves, dz)


@in_process
# Odd sizes on purpose: tiles straddle image rows, batch images and the identity/conv channel boundary.
@pytest.mark.parametrize(
    "B,H,W,hidden,cc,k,act,bias",
    [
        (2, 13, 11, 50, 37, 7, "gelu", True),  # C=37 block with a wider hidden width: identity + conv channels
        (2, 13, 11, 37, 37, 3, "silu", True),  # every hidden channel convolved (no identity branch)
        (1, 9, 5, 20, 7, 5, "gelu", False),  # no conv bias
    ],
)
def test_forward_and_backward_equal_reference(B, H, W, hidden, cc, k, act, bias):
    y, w, b = _inputs(B, H, W, hidden, cc, k, bias)
    dz = torch.randn(B, H, W, hidden)
    z, grads = _fwd_bwd(gd.gated_dwconv, y, w, b, hidden, act, dz)
    z_ref, grads_ref = _fwd_bwd(gd.gated_dwconv_reference, y, w, b, hidden, act, dz)
    assert z.shape == (B, H, W, hidden) and z.dtype == y.dtype
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dy", "dweight", "dbias"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@in_process
def test_bf16_within_tolerance_of_fp32_reference():
    y, w, b = _inputs(1, 7, 6, 24, 16, 7, True)
    z = gd.gated_dwconv(y.detach().bfloat16(), w.detach(), b.detach(), 24, "gelu")
    z_ref = gd.gated_dwconv_reference(y.detach(), w.detach(), b.detach(), 24, "gelu")
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), z_ref, rtol=2e-2, atol=2e-2)


@in_process
def test_custom_op_registration_passes_opcheck():
    # Schema, fake (meta) implementation and autograd registration: what torch.compile relies on.
    y, w, b = _inputs(1, 5, 4, 12, 8, 3, True)
    torch.library.opcheck(gd.gated_dwconv, (y, w, b, 12, "gelu"))


@in_process
def test_compiles_fullgraph_with_the_op_as_one_node():
    y, w, b = _inputs(1, 6, 5, 12, 8, 3, True)
    dz = torch.randn(1, 6, 5, 12)

    def step(y, w, b):
        return gd.gated_dwconv(y * 2.0, w, b, 12, "gelu") + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z, grads = _fwd_bwd(lambda y, w, b, *_: compiled(y, w, b), y, w, b, 12, "gelu", dz)
    z_ref, grads_ref = _fwd_bwd(lambda y, w, b, *_: step(y, w, b), y, w, b, 12, "gelu", dz)
    torch.testing.assert_close(z, z_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


@in_process
def test_block_dispatches_to_the_fused_kernel_and_trains(monkeypatch):
    torch.manual_seed(0)
    block = GatedCNNBlock(12, kernel_size=5, ls_init_value=0.5).train()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 7, 6, 12, requires_grad=True)
    calls = []
    real = gd.gated_dwconv
    monkeypatch.setattr(gd, "gated_dwconv", lambda *a: calls.append(1) or real(*a))
    out = block(x)
    assert not calls, "the fused kernels are opt-in: the default block must not use them"
    with kernels.fused_kernels():
        out = block(x)
    out.square().sum().backward()
    assert calls, "the block did not use the Triton kernel under TRITON_INTERPRET=1"
    x_ref = x.detach().clone().requires_grad_()
    out_ref = ref._forward_reference(x_ref)
    out_ref.square().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@in_process
def test_without_interpreter_cpu_tensors_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    y, w, b = _inputs(1, 3, 3, 4, 4, 3, True)
    with pytest.raises(RuntimeError, match="gated_dwconv_reference"):
        gd.gated_dwconv(y, w, b, 4, "gelu")


@in_process
@pytest.mark.parametrize(
    "shape,wshape,hidden,act,match",
    [
        ((1, 3, 3, 10), (4, 1, 3, 3), 4, "gelu", "2 \\* hidden"),
        ((1, 3, 3, 8), (4, 1, 4, 4), 4, "gelu", "odd k"),
        ((1, 3, 3, 8), (5, 1, 3, 3), 4, "gelu", "between 1 and hidden"),
        ((1, 3, 3, 8), (4, 1, 3, 3), 4, "tanh", "act must be one of"),
    ],
)
def test_bad_arguments_raise_value_error(shape, wshape, hidden, act, match):
    with pytest.raises(ValueError, match=match):
        gd.gated_dwconv_reference(torch.zeros(shape), torch.zeros(wshape), None, hidden, act)


@in_process
def test_block_compiles_fullgraph_through_the_dispatch():
    torch.manual_seed(0)
    block = GatedCNNBlock(12, kernel_size=3)
    x = torch.randn(1, 5, 4, 12, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    with kernels.fused_kernels():
        out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, block._forward_reference(x), rtol=1e-5, atol=1e-5)
    assert x.grad is not None and block.conv.weight.grad is not None
