"""The CPU inference fast path (mambaout.kernels.cpu) against the block's plain forward, and when it is chosen."""

import copy
import csv
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mambaout
from mambaout import kernels
from mambaout.analysis.flops import count_macs
from mambaout.kernels import cpu, native
from mambaout.models.mambaout import ClassifierHead, GatedCNNBlock, Stem

pytestmark = pytest.mark.skipif(not cpu.onednn_available(), reason="this torch build has no oneDNN fused linear")


def _block(dim=37, **kwargs):
    torch.manual_seed(0)
    block = GatedCNNBlock(dim, **kwargs).eval()
    with torch.no_grad():  # non-trivial norm and conv parameters, so a dropped affine or bias shows
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def _native(monkeypatch, on: bool) -> None:
    """The C kernel (kernels/native.py) on or off for this test; skipped where it cannot be built here."""
    monkeypatch.setattr(cpu, "_NATIVE", on)
    if on and native.library() is None:
        pytest.skip(f"the C kernels cannot be built here: {native.unavailable_reason()}")


@pytest.fixture
def no_fast(monkeypatch):
    """Fail loudly if the fast path runs."""

    def boom(*args):
        raise AssertionError("the CPU fast path ran where the reference was expected")

    monkeypatch.setattr(cpu, "gated_block_inference", boom)


# Odd sizes; every activation the block accepts (fused into the matmul or not), partial conv, LayerScale.
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(kernel_size=3, conv_ratio=0.5),
        dict(act_layer=nn.SiLU, ls_init_value=0.3),
        dict(act_layer=nn.ReLU, kernel_size=5),
        dict(act_layer=nn.Tanh),  # no oneDNN post-op: applied as its own module
        dict(act_layer=lambda: nn.GELU(approximate="tanh")),
        dict(expansion_ratio=1.0, conv_ratio=1.0),  # no identity channels
    ],
)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("matmul", ["onednn", "blas", "native"])  # "native" with the C kernels off: oneDNN
@pytest.mark.parametrize("one_call_rows", [4096, 0])  # i and c from one matmul call, and from two
@pytest.mark.parametrize("c_kernel", [True, False])  # the conv and gate products in C, or through oneDNN
def test_fast_block_equals_reference(kwargs, mode, matmul, one_call_rows, c_kernel, monkeypatch):
    monkeypatch.setattr(cpu, "_MODE", matmul)  # each implementation on its own, whatever "auto" would pick here
    _native(monkeypatch, c_kernel)
    monkeypatch.setattr(cpu, "_ONE_CALL_ROWS", one_call_rows)
    block = _block(**kwargs)
    x = torch.randn(2, 13, 11, 37)
    with mode():
        want = block._forward_reference(x)
        assert cpu.can_use_cpu_fastpath(block, x)
        got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(), dict(expansion_ratio=1.0, conv_ratio=1.0), dict(act_layer=nn.Tanh)])
def test_packed_linear_weights_give_the_plain_weights_result_bit_for_bit(dtype, kwargs, monkeypatch):
    """oneDNN's linear weights packed for the input's row count, against the same calls on the plain weights: equal,
    for each row count (packed again when it changes) and both ways of computing fc1's identity and conv channels."""
    monkeypatch.setattr(cpu, "_MODE", "onednn")
    monkeypatch.setattr(cpu, "_BF16", True)
    block = _block(**kwargs).to(dtype)
    for rows, shape in ((4096, (2, 13, 11, 37)), (4096, (1, 3, 5, 37)), (0, (2, 13, 11, 37))):
        monkeypatch.setattr(cpu, "_ONE_CALL_ROWS", rows)
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            monkeypatch.setattr(cpu, "_CAN_PACK_LINEAR", False)
            plain = block(x)
            monkeypatch.setattr(cpu, "_CAN_PACK_LINEAR", True)
            packed = block(x)
            p = cpu._plan(block)
            key, packed_weights = p.derived["onednn"]
            assert key[0] == x.numel() // 37  # packed for this row count
            assert all(w.layout == torch._mkldnn for w, _ in packed_weights.values())
        assert torch.equal(packed, plain)


@pytest.mark.parametrize("kwargs", [dict(), dict(kernel_size=3, conv_ratio=0.5), dict(act_layer=nn.SiLU)])
@pytest.mark.parametrize("matmul", ["onednn", "blas", "native"])
@pytest.mark.parametrize("c_kernel", [True, False])
@pytest.mark.parametrize("dim", [37, 36])  # "native" reads bf16 in pairs: an odd width runs oneDNN
def test_bf16_fast_block_is_opt_in_and_near_the_fp32_reference(kwargs, matmul, c_kernel, dim, monkeypatch):
    """bf16 weights and inputs through the fast path (opt-in, `set_cpu_bf16`), against the fp32 reference of the
    same block: within bf16 rounding. On a CPU without bf16 arithmetic oneDNN emulates it: same numbers, slower."""
    monkeypatch.setattr(cpu, "_MODE", matmul)
    _native(monkeypatch, c_kernel)
    monkeypatch.setattr(cpu, "_BF16", False)
    block = _block(dim, **kwargs)
    x = torch.randn(2, 13, 11, dim)
    with torch.no_grad():
        want = block._forward_reference(x)
        low, xb = copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16)
        assert not cpu.can_use_cpu_fastpath(low, xb)  # off by default
        cpu.set_cpu_bf16(True)
        assert cpu.cpu_bf16_enabled() and cpu.can_use_cpu_fastpath(low, xb)
        assert not cpu.can_use_cpu_fastpath(low, x)  # fp32 input into bf16 weights: the reference's business
        got = low(xb)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 3e-2, err  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few roundings deep
    with torch.no_grad(), kernels.reference_mode():
        ref_bf16 = low(xb)  # the plain forward in bf16 rounds differently but no worse
    assert (got.float() - want).abs().max() <= 2 * (ref_bf16.float() - want).abs().max() + 1e-2


@pytest.mark.parametrize("c_kernel", [True, False])  # with the C kernels, their matmul is timed too
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_times_each_shape_once_and_keeps_its_choice(c_kernel, dtype, monkeypatch):
    monkeypatch.setattr(cpu, "_MODE", "auto")
    monkeypatch.setattr(cpu, "_CHOSEN", {})
    monkeypatch.setattr(cpu, "_BF16", True)
    _native(monkeypatch, c_kernel)
    calls = {"onednn": 0, "blas": 0, "native": 0}
    impls = dict(cpu._IMPLS)

    def counting(name):
        def run(block, x):
            calls[name] += 1
            return impls[name](block, x)

        return run

    monkeypatch.setattr(cpu, "_IMPLS", {name: counting(name) for name in impls})
    dim = 36  # even: bf16 "native" reads pairs
    block = _block(dim).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        want = block._forward_reference(torch.ones(1, 5, 6, dim, dtype=dtype))
        for _ in range(3):
            torch.testing.assert_close(block(torch.ones(1, 5, 6, dim, dtype=dtype)), want, **tol)
        block(torch.ones(2, 5, 6, dim, dtype=dtype))  # another row count: another shape, timed once more
    choices = cpu.cpu_matmul_choices()
    cc = block.conv_channels
    assert [key[:4] for key in choices] == [(30, dim, block.hidden, cc), (60, dim, block.hidden, cc)]
    assert set(choices.values()) <= set(calls)
    # per shape: 1 warm-up + 4 timed runs of each implementation, then one run of the chosen one per call;
    # "native" competes where the C kernels are on
    assert sum(calls.values()) == 2 * 5 * (3 if c_kernel else 2) + 4 and (calls["native"] > 0) == c_kernel


def test_auto_keeps_the_faster_minimum_not_median(monkeypatch):
    """Another process can only slow a run down: the implementation with the fastest run wins, even when load hit
    half of its runs (by the median it would lose)."""
    import time

    runs = {"onednn": 0}

    def onednn(block, x):
        runs["onednn"] += 1
        time.sleep(0.03 if runs["onednn"] in (2, 3) else 0.0)  # runs 2 and 3 (of 1 warm-up + 4) under "load"
        return x

    def blas(block, x):
        time.sleep(0.005)
        return x

    monkeypatch.setattr(cpu, "_IMPLS", {"onednn": onednn, "blas": blas})
    assert cpu._time_impls(_block(), torch.ones(1, 5, 6, 37)) == "onednn"


@pytest.mark.parametrize("packed", [True, False])
def test_downsampling_conv_uses_a_cached_weight_that_follows_changes(packed, monkeypatch):
    """Channels-last in and out; packed for oneDNN (within rounding of the module), else a channels-last copy of
    the weight (bit for bit); the derived weight made again after an in-place change or for another input shape."""
    monkeypatch.setattr(cpu, "_PACK_CONVS", packed)
    tol = dict(rtol=1e-5, atol=1e-5) if packed else dict(rtol=0, atol=1e-6)
    conv = torch.nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert cpu.can_use_cpu_conv(conv, x) and cpu.can_use_cpu_conv(conv, x.contiguous())
        torch.testing.assert_close(cpu.conv_channels_last(conv, x), conv(x), **tol)
        got = cpu.conv_channels_last(conv, x.contiguous())  # an NCHW input (the stem's image) comes out channels-last
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, conv(x), **tol)
    first = cpu._CL_WEIGHTS[conv][1]
    with torch.no_grad():
        conv.weight.mul_(2)  # an in-place change (an optimizer step, load_state_dict) bumps the version
    with torch.inference_mode():
        torch.testing.assert_close(cpu.conv_channels_last(conv, x), conv(x), **tol)
        second = cpu._CL_WEIGHTS[conv][1]
        wide = torch.randn(1, 6, 5, 12).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cpu.conv_channels_last(conv, wide), conv(wide), **tol)
    assert second is not first and (cpu._CL_WEIGHTS[conv][1] is not second) == packed  # packed per input shape
    with torch.inference_mode():
        made_here = torch.nn.Conv2d(6, 10, 3, padding=1)  # inference-mode weights: no version, so not cached
        torch.testing.assert_close(cpu.conv_channels_last(made_here, x), made_here(x), rtol=0, atol=1e-6)
        odd = torch.nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect")  # not plain: the channels-last weight
        torch.testing.assert_close(cpu.conv_channels_last(odd, x), odd(x), rtol=0, atol=1e-6)
    assert made_here not in cpu._CL_WEIGHTS
    assert not cpu.can_use_cpu_conv(conv, x)  # autograd on: the module's own forward


@pytest.mark.parametrize(
    "env, flags, want_bf16, want_c",
    [("", "fpu avx2 avx512f avx512_bf16", True, True), ("", "avx2 avx512f", False, True),
     ("", "avx512f avx512_bf16 amx_bf16", False, False), ("", "avx2", False, False),
     ("0", "avx512f avx512_bf16", False, False), ("1", "avx2", True, True)],
)  # fmt: skip
@pytest.mark.parametrize("variable", ["MAMBAOUT_CPU_BF16", "MAMBAOUT_CPU_NATIVE", "MAMBAOUT_CPU_PACK_CONVS"])
def test_bf16_path_and_c_kernels_are_on_by_default_only_where_measured(
    monkeypatch, tmp_path, env, flags, want_bf16, want_c, variable
):
    """The bf16 blocks where measured: AVX512-BF16 without AMX (AMD Zen 5); the C kernels and packed convs on
    AVX-512 without AMX (Zen 5, and Intel Ice Lake without BF16); the variable overrides either way."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor : 0\nflags\t\t: {flags}\n")
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: real_read(info if str(p) == "/proc/cpuinfo" else p))
    monkeypatch.setenv(variable, env)
    needs = "avx512_bf16" if variable == "MAMBAOUT_CPU_BF16" else "avx512f"
    assert cpu._default(variable, needs) is (want_bf16 if variable == "MAMBAOUT_CPU_BF16" else want_c)


def test_cpu_matmul_switch(monkeypatch):
    monkeypatch.setattr(cpu, "_MODE", "auto")
    cpu.set_cpu_matmul("blas")
    assert cpu.cpu_matmul() == "blas"
    with pytest.raises(ValueError, match="expected one of auto, onednn, blas"):
        cpu.set_cpu_matmul("mkl")
    monkeypatch.setattr(cpu, "_MODE", "typo-from-the-environment")
    assert cpu.cpu_matmul() == "auto"


def test_model_fast_equals_reference_and_input_untouched():
    model = mambaout.create_model("mambaout_test").eval()
    x = torch.randn(3, 3, 64, 64)
    x0 = x.clone()
    with torch.inference_mode():
        got = model(x)
        with kernels.reference_mode():
            want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("c_kernel", [True, False])
def test_weights_changed_in_place_take_effect(c_kernel, monkeypatch):
    _native(monkeypatch, c_kernel)
    block = _block()
    x = torch.randn(2, 5, 6, 37)
    with torch.no_grad():
        block(x)
        block.fc1.weight.mul_(-2.0)  # in place through the parameters: their versions change, the packs are remade
        block.fc2.weight.detach().add_(0.5)
        block.conv.weight.copy_(-block.conv.weight)
        block.conv.bias.add_(1.0)
        torch.testing.assert_close(block(x), block._forward_reference(x), rtol=1e-5, atol=1e-5)
        block.fc2.weight.data.add_(0.5)  # through .data: no version change; forget_packed_weights makes it show
        block.conv.weight.data.mul_(-0.5)
        cpu.forget_packed_weights()
        want = block._forward_reference(x)
        got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        block.conv.weight = torch.nn.Parameter(torch.randn_like(block.conv.weight))  # new Parameters: a new plan
        block.norm.weight = torch.nn.Parameter(torch.rand_like(block.norm.weight))
        x = torch.randn(1, 7, 3, 37)  # another input shape: the conv weight is packed for it
        torch.testing.assert_close(block(x), block._forward_reference(x), rtol=1e-5, atol=1e-5)
    other = _block()
    other.fc1.weight.data.normal_()
    block.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(x), other._forward_reference(x), rtol=1e-5, atol=1e-5)


def test_autograd_uses_reference(no_fast):
    block = _block()
    x = torch.randn(1, 5, 5, 37, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and block.fc1.weight.grad is not None


@pytest.mark.parametrize("case", ["float64", "reference_mode", "hook", "autocast"])
def test_fast_path_declines(case, no_fast):
    block = _block()
    x = torch.randn(2, 5, 5, 37)
    if case == "float64":
        block, x = block.double(), x.double()
    calls = []
    if case == "hook":
        block.fc1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        if case == "reference_mode":
            with kernels.reference_mode():
                block(x)
        elif case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                block(x)
        else:
            block(x)
    assert calls == ([1] if case == "hook" else [])


def test_drop_path_and_layerscale_kept_in_train_mode_without_grad():
    block = _block(drop_path=0.5, ls_init_value=0.2).train()
    x = torch.randn(8, 4, 4, 37)
    with torch.no_grad():
        torch.manual_seed(1)
        got = block(x)
        torch.manual_seed(1)
        want = block._forward_reference(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mac_count_and_deepcopy_unaffected():
    model = mambaout.create_model("mambaout_test").eval()
    macs = count_macs(model, 64)  # hooks on every Linear: the blocks must run their modules
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))  # fills the packed-weight cache
    assert count_macs(model, 64) == macs
    clone = copy.deepcopy(model)
    assert set(clone.state_dict()) == set(model.state_dict())


def test_export_under_no_grad_records_the_reference_graph():
    # torch.export traces with fake tensors: the exported program must not depend on oneDNN's private ops.
    model = mambaout.create_model("mambaout_test").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "mkldnn" in t]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_benchmark_command_writes_rows(tmp_path, capsys, monkeypatch):
    # Structure only (benchmarks are scripts; speed is never asserted in tests): femto at 32 px, one step each.
    from mambaout.cli import benchmark

    # the steps are really timed; the ratios are then checked on stand-in seconds with known quotients
    real = benchmark._time_interleaved
    seconds = {"timm": [0.2], "ours": [0.1], "ours-reference": [0.4]}

    def timed(steps, warmup, iters, dev):
        times = real(steps, warmup, iters, dev)
        assert {k: len(v) for k, v in times.items()} == {k: 1 for k in seconds} and min(map(min, times.values())) > 0
        return seconds

    monkeypatch.setattr(benchmark, "_time_interleaved", timed)
    csv_path = tmp_path / "bench.csv"
    args = ["--models", "mambaout_femto", "--device", "cpu", "--img-size", "32", "--batch-size", "2"]
    rc = benchmark.main(args + ["--warmup", "0", "--iters", "1", "--with-reference", "--csv", str(csv_path)])
    assert rc == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["impl"] for r in rows] == ["timm", "ours", "ours-reference"]
    assert float(rows[1]["rel_diff_vs_timm"]) <= benchmark.TOLERANCE["fp32"]
    assert [float(r["speedup_vs_timm"]) for r in rows] == [1.0, 2.0, 0.5]  # timm's seconds / each one's
    assert [float(r["img_per_s"]) for r in rows] == [10.0, 20.0, 5.0]  # batch 2 / seconds
    assert "vs timm" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert benchmark.main(args + ["--warmup", "0", "--iters", "1", "--with-reference"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv"]  # no CSV written unless --csv asks
    assert "appended" not in capsys.readouterr().out
    assert benchmark.main(["--models", "vit_tiny_deit", "--device", "cpu", "--csv", ""]) == 2  # timm lacks it
    out, err = capsys.readouterr()
    assert not out and err.startswith("mambaout benchmark: ") and "vit_tiny_deit" in err  # errors go to stderr
    assert benchmark.default_csv(torch.device("cpu")).startswith("benchmark-")


def test_forget_choices_times_again(monkeypatch):
    monkeypatch.setattr(cpu, "_MODE", "auto")
    monkeypatch.setattr(cpu, "_CHOSEN", {})
    with torch.no_grad():
        _block()(torch.ones(1, 3, 3, 37))
    assert len(cpu.cpu_matmul_choices()) == 1
    cpu.forget_cpu_matmul_choices()
    assert cpu.cpu_matmul_choices() == {}


def test_stage_path_equals_blocks_one_by_one_and_honours_hooks(monkeypatch):
    """A stage runs its blocks as one plan (`stage_plans` / `run_stage`): the same numbers as calling each block's
    fast path, and back to module calls when anything in the stage is hooked."""
    model = mambaout.create_model("mambaout_test").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got = model(x)
        calls = []
        real = cpu.run_stage
        monkeypatch.setattr(cpu, "run_stage", lambda plans, y: calls.append(len(plans)) or real(plans, y))
        assert torch.equal(model(x), got)
        assert calls == [len(stage.blocks) for stage in model.stages]  # every stage took the stage path
    with torch.inference_mode():
        h = model.stem(x)
        for stage in model.stages:
            h = stage.downsample(h)
            for block in stage.blocks:
                h = block(h)  # each block's own fast path
        assert torch.equal(got, model.head(h))
    for where in ("block", "norm", "conv", "act", "blocks"):
        seen = []
        stage = model.stages[1]
        target = {"block": stage.blocks[0], "blocks": stage.blocks}.get(where) or getattr(stage.blocks[0], where)
        handle = target.register_forward_hook(lambda *a, seen=seen: seen.append(1))
        with torch.inference_mode():
            torch.testing.assert_close(model(x), got, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert seen, f"a hook on the {where} did not run"


def test_plan_follows_replaced_modules_and_weights():
    block = _block()
    x = torch.randn(2, 5, 6, 37)
    with torch.no_grad():
        block(x)
        block.act = nn.SiLU()  # a replaced module: a new plan with the new activation
        torch.testing.assert_close(block(x), block._forward_reference(x), rtol=1e-5, atol=1e-5)
        block.fc1.weight = nn.Parameter(torch.randn_like(block.fc1.weight))  # new storage
        block.fc2.bias.data = torch.randn_like(block.fc2.bias)
        torch.testing.assert_close(block(x), block._forward_reference(x), rtol=1e-5, atol=1e-5)
        block.fc1.weight = nn.Parameter(
            torch.randn(block.fc1.in_features, block.fc1.out_features).t()
        )  # not contiguous
        torch.testing.assert_close(block(x), block._forward_reference(x), rtol=1e-5, atol=1e-5)
        block.fc1.weight.mul_(0.5)  # the uncached copy is made again each call
        torch.testing.assert_close(block(x), block._forward_reference(x), rtol=1e-5, atol=1e-5)


_FAULTS = """
import resource, torch, mambaout
torch.set_num_threads(1)
model = mambaout.create_model("mambaout_femto").eval()
x = torch.randn(1, 3, 224, 224)
with torch.inference_mode():
    for _ in range(3):
        model(x)
    counts = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(counts)[len(counts) // 2])
"""


@pytest.mark.heavy
@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_freed_activations_stay_in_the_heap_so_forwards_do_not_page_fault():
    """The first plan raises glibc's mmap and trim thresholds, so a forward reuses the heap's pages instead of faulting
    in fresh ones (a femto forward at batch 1 faulted ~850-1,560 times without it before the head was packed in C;
    since then glibc's own sliding threshold, raised by an early large free, also avoids them: 1 against 1, AMD EPYC,
    2026-12-07). The setting keeps it so whatever the order of allocations; MAMBAOUT_CPU_MALLOC=0 leaves malloc alone."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], env={**os.environ, "MAMBAOUT_CPU_MALLOC": ""},
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    # the median forward's faults: a stray fault (another process taking pages) moves a mean, not the median
    assert float(out.stdout.split()[-1]) < 30, out.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mid_norm", [True, False])
def test_stem_convs_run_channels_last(dtype, mid_norm, monkeypatch):
    """Both stem convs write channels-last memory, which the norms read without a layout copy; the stem stays within
    rounding of its plain forward (bf16: two roundings)."""
    monkeypatch.setattr(cpu, "_BF16", True)
    torch.manual_seed(0)
    stem = Stem(3, 24, mid_norm=mid_norm).eval().to(dtype)
    seen, plain_conv = [], cpu.conv_channels_last
    monkeypatch.setattr(cpu, "conv_channels_last", lambda conv, x: seen.append(conv) or plain_conv(conv, x))
    x = torch.randn(2, 3, 64, 48).to(dtype)
    with torch.no_grad():
        got = stem(x)
        with kernels.reference_mode():
            want = stem(x)
    assert seen == [stem.conv1, stem.conv2]
    tol = 2**-6 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c_kernel", [True, False])
def test_norms_outside_the_blocks_are_within_one_rounding(c_kernel, dtype, monkeypatch):
    """The stem's and downsampling layers' norms: the C kernel (any width, float32 or bf16), else for bf16 through
    float32 below 32 channels (torch's bf16 LayerNorm is slow there), else the module. With the stem's exact GELU
    after the norm, the C kernel applies it in the same pass; other activations are left to the modules."""
    monkeypatch.setattr(cpu, "_BF16", True)
    _native(monkeypatch, c_kernel)
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-5  # one rounding to 8 bits, or float32 sums
    for channels, act in [(24, None), (40, None), (24, nn.GELU()), (40, nn.GELU())]:
        norm = nn.LayerNorm(channels, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        x = torch.randn(2, 9, 7, channels).to(dtype)
        with torch.inference_mode():
            want = torch.layer_norm(x.double(), (channels,), norm.weight.double(), norm.bias.double(), 1e-6)
            want = want if act is None else F.gelu(want)
            got = cpu.outer_norm(norm, x, act)
            assert cpu.outer_norm(norm, x, nn.GELU(approximate="tanh")) is None  # not this pass's GELU
            assert cpu.outer_norm(norm, x, nn.ReLU()) is None
            if not c_kernel and (dtype == torch.float32 or channels >= 32):
                assert got is None  # torch's own LayerNorm is fine there
                continue
            assert got.dtype == dtype and got.shape == want.shape
            rounded = tol * (2 if act is not None and not c_kernel else 1)  # there bf16 GELU rounds once more
            torch.testing.assert_close(got.double(), want, rtol=rounded, atol=rounded)
            if act is not None:
                handle = act.register_forward_hook(lambda *_: None)
                assert cpu.outer_norm(norm, x, act) is None  # a hooked activation must be called
                handle.remove()
        assert cpu.outer_norm(norm, x) is None  # autograd on
    model = mambaout.create_model("mambaout_femto").eval().to(dtype)
    img = torch.randn(1, 3, 64, 64).to(dtype)
    with torch.inference_mode():
        got = model(img).float()
        with kernels.reference_mode():
            want = model(img).float()
    if dtype == torch.bfloat16:
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs, one_call",
    [
        (dict(), True),
        (dict(kernel_size=3, conv_ratio=0.5), True),
        (dict(expansion_ratio=1.0, conv_ratio=1.0), True),  # no identity channels
        (dict(act_layer=nn.SiLU), False),  # GELU only in the C matmul's store
        (dict(ls_init_value=0.3), False),  # LayerScale: fc2 cannot add the residual
    ],
)
def test_block_in_one_c_call_equals_the_steps_bit_for_bit(dtype, kwargs, one_call, monkeypatch):
    """`native.block` runs the same C calls as `_gated_native` step by step, so the same bits, on odd maps and a
    batch of two; blocks it cannot take run step by step."""
    monkeypatch.setattr(cpu, "_MODE", "native")
    monkeypatch.setattr(cpu, "_BF16", True)
    _native(monkeypatch, True)
    ref = _block(36, **kwargs)
    block = copy.deepcopy(ref).to(dtype)
    calls, plain = [], native.block
    monkeypatch.setattr(native, "block", lambda *args: calls.append(args) or plain(*args))
    for shape in ((2, 13, 11, 36), (1, 1, 1, 36), (1, 7, 5, 36)):
        x = torch.randn(shape).to(dtype)
        with torch.inference_mode():
            got = block(x)
            monkeypatch.setattr(cpu, "_ONE_BLOCK_CALL", False)
            steps = block(x)
            monkeypatch.setattr(cpu, "_ONE_BLOCK_CALL", True)
            want = ref._forward_reference(x.float())
        assert torch.equal(got, steps)
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < (3e-2 if dtype == torch.bfloat16 else 1e-6), err
    assert len(calls) == (3 if one_call else 0)


def test_block_call_refuses_what_it_cannot_read(monkeypatch):
    _native(monkeypatch, True)
    block = _block(36)
    p = cpu._plan(block)
    x = torch.randn(1, 5, 4, 36)
    with torch.inference_mode():
        w = cpu._native_linears(p)
        _, weight, bias, eps = p.norm
        args = ((weight, bias, eps), w["g"], w["ic"], cpu._native_weights(p), w["fc2"], p.cc)
        torch.testing.assert_close(native.block(x, *args), block._forward_reference(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="contiguous x"):
            native.block(x.transpose(1, 2), *args)
        with pytest.raises(ValueError, match="do not fit"):
            native.block(x, *args[:-1], p.cc + 1)
        with pytest.raises(ValueError, match="contiguous x"):
            native.block(x.bfloat16(), *args)  # weights packed in float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_linears_run_the_c_matmul_within_rounding(dtype, monkeypatch):
    """The head's linears: the C matmul, the exact GELU in its store, on a weight packed once per version (packed
    again after an in-place change); None (the modules run) for another activation, autograd, a hook, a weight made
    under inference mode, an odd bf16 width, or with the C kernels off."""
    monkeypatch.setattr(cpu, "_BF16", True)
    _native(monkeypatch, True)
    torch.manual_seed(0)
    tol = dict(rtol=2**-7, atol=2**-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 36).to(dtype)

    def want(lin, act=lambda t: t):
        return act(nn.functional.linear(x.double(), lin.weight.double(), _double(lin.bias)))

    for bias in (True, False):
        lin = nn.Linear(36, 70, bias=bias).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(cpu.outer_linear(lin, x).double(), want(lin), **tol)
            gelu = cpu.outer_linear(lin, x, nn.GELU())
            torch.testing.assert_close(gelu.double(), want(lin, nn.functional.gelu), **tol)
            assert cpu.outer_linear(lin, x.view(1, 3, 1, 36)).shape == (1, 3, 1, 70) and gelu.dtype == dtype
            assert cpu.outer_linear(lin, x, nn.GELU(approximate="tanh")) is None
            assert cpu.outer_linear(lin, x, nn.ReLU()) is None
        with torch.no_grad():
            lin.weight.mul_(-2)  # a new version: packed again
        with torch.inference_mode():
            torch.testing.assert_close(cpu.outer_linear(lin, x).double(), want(lin), **tol)
    assert cpu.outer_linear(lin, x) is None  # autograd on
    handle = lin.register_forward_hook(lambda *args: None)
    odd = nn.Linear(35, 8).to(dtype)
    with torch.inference_mode():
        assert cpu.outer_linear(lin, x) is None
        made_here = nn.Linear(36, 8).to(dtype)
        assert cpu.outer_linear(made_here, x) is None  # no version to follow
        assert (cpu.outer_linear(odd, x[:, :35]) is None) == (dtype == torch.bfloat16)  # bf16 reads pairs of inputs
    handle.remove()
    _native(monkeypatch, False)
    with torch.inference_mode():
        assert cpu.outer_linear(lin, x) is None


def _double(t):
    return None if t is None else t.double()


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(mlp_norm=False), dict(mlp_ratio=0), dict(num_classes=0), dict(global_pool=""), dict(drop_rate=0.5)],
)
@pytest.mark.parametrize("c_kernel", [True, False])
def test_head_runs_its_linears_in_c_within_float_rounding(kwargs, c_kernel, monkeypatch):
    """Every kind of head (the paper's, timm's `_rw` without the MLP norm, a plain classifier, pre-logits only, no
    pooling) matches its plain forward, and calls the C matmul for each of its linears where the C kernels are on; a
    hook on the MLP runs it as a module."""
    _native(monkeypatch, c_kernel)
    torch.manual_seed(0)
    head = ClassifierHead(40, **dict(dict(num_classes=30), **kwargs)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    seen, plain = [], cpu.outer_linear
    monkeypatch.setattr(cpu, "outer_linear", lambda lin, x, act=None: seen.append(lin) or plain(lin, x, act))
    x = torch.randn(2, 5, 3, 40)
    with torch.inference_mode():
        got, pre = head(x), head(x, pre_logits=True)
        with kernels.reference_mode():
            want, want_pre = head(x), head(x, pre_logits=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre, want_pre, rtol=1e-5, atol=1e-5)
        mlp = [head.pre_logits.fc] if isinstance(head.pre_logits, nn.Sequential) else []
        assert seen == [*mlp, head.fc, *mlp]  # the pre-logits call stops before fc
        linears = [m for m in (*mlp, head.fc) if isinstance(m, nn.Linear)]
        if c_kernel and linears:
            assert all(cpu._LINEARS.get(m) is not None for m in linears)  # packed: the C matmul ran
        if isinstance(head.pre_logits, nn.Sequential):
            seen.clear()
            handle = head.pre_logits.register_forward_hook(lambda *args: None)
            torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5)
            assert seen == [head.fc]
            handle.remove()


def test_model_built_under_inference_mode_runs_the_fast_path():
    # Its parameters are inference tensors, which have no version counter for a cache to follow.
    with torch.inference_mode():
        model = mambaout.create_model("mambaout_test").eval()
        x = torch.randn(2, 3, 64, 64)
        got = model(x)
        with kernels.reference_mode():
            want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
