"""`mambaout benchmark --runtimes`: every way of running one model on this CPU, side by side, in one run.

    flock /tmp/mambaout-cpu.lock mambaout benchmark --runtimes --models mambaout_femto --batch-size 32

Rows: timm fp32 (the baseline), ours fp32 (the default path), ours bf16 (bf16 weights; timed only where the CPU has
bf16 arithmetic), ours int8 (ONNX Runtime's static quantisation of our export), ONNX Runtime fp32 on our export and
on timm's, OpenVINO fp32 on our export (and bf16 where the CPU has it) when `openvino` is installed. Same weights
(timm's, copied into ours), same random input, same thread count; the steps are interleaved (one of each in turn),
so load from other processes hits every row alike. Each row: img/s (median step), the ratio to timm fp32 in this
run, and the max |logit difference| to timm fp32 on the same two images.

The roofline line: the model's MACs per image, the peak of this machine for that dtype measured by a large GEMM
(torch.mm; int8: `torch._int_mm`), and the fraction of it the fastest row of that dtype reaches.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["gemm_peak_gflops", "timm_twin", "runtime_rows", "format_runtime_table", "roofline_lines"]


def gemm_peak_gflops(dtype: str = "fp32", n: int = 2048, repeats: int = 3) -> float | None:
    """GFLOP/s (GOP/s for int8) of an `n`x`n`x`n` matrix product on this CPU, best of `repeats`; None if unsupported."""
    if dtype == "int8":
        fn = _ort_int8_matmul(n)  # the int8 kernels the int8 row runs (torch has no fast int8 GEMM on CPU)
        if fn is None:
            return None
    else:
        t = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(n, n, dtype=t), torch.randn(n, n, dtype=t)
        fn = lambda: a @ b  # noqa: E731
    try:
        fn()
    except RuntimeError:
        return None
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _ort_int8_matmul(n: int) -> Callable | None:
    """ONNX Runtime's `MatMulInteger` (uint8 x int8 -> int32) on `n`x`n` matrices, as a zero-argument callable."""
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper

        from mambaout.deploy.runtimes import ort_session
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
        [
            helper.make_tensor(
                "b", TensorProto.INT8, [n, n], np.random.randint(-64, 64, (n, n)).astype(np.int8).tobytes(), raw=True
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(model, str(path))
        session = ort_session(path)
    a = np.random.randint(0, 255, (n, n)).astype(np.uint8)
    return lambda: session.run(None, {"a": a})


def timm_twin(name: str, **kwargs):
    """timm's MambaOut with the architecture of our `name`; for variants timm lacks (`mambaout_test`) its MambaOut
    class built with our variant's arguments (timm's builders let keyword arguments override theirs)."""
    import timm

    from mambaout.models.variants import get_variant

    variant, _ = get_variant(name)
    if name in timm.list_models("mambaout*"):
        return timm.create_model(name, **kwargs)
    arch = {k: v for k, v in variant.kwargs.items() if k in ("depths", "dims")}
    if set(variant.kwargs) - {"depths", "dims"} or variant.builder is not None:
        raise ValueError(f"timm has no {name} and its arguments {variant.kwargs} are not femto's with other sizes")
    return timm.create_model("mambaout_femto", **arch, **kwargs)


def runtime_rows(
    name: str = "mambaout_femto",
    batch_sizes: tuple[int, ...] = (1, 32),
    img_size: int = 224,
    iters: int = 10,
    warmup: int = 2,
    calib: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time every available way of running `name` (see the module docstring); one dict per (implementation, batch)."""
    from mambaout.data.image import eval_transform
    from mambaout.deploy.quantize import calibration_images, quantize_int8
    from mambaout.deploy.runtimes import OnnxRuntimeModel, OpenVinoModel, export_openvino, ort_session
    from mambaout.inference.export import export_onnx
    from mambaout.inference.precision import LowPrecision, cpu_bf16_support
    from mambaout.models.factory import create_model

    torch.manual_seed(0)
    ref = timm_twin(name).eval()
    ours = create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    shape = (3, img_size, img_size)
    ours.pretrained_cfg = {**ours.pretrained_cfg, "input_size": shape}
    probe = torch.randn(2, *shape)  # the two images every row's |diff| is measured on
    with torch.inference_mode():
        want = ref(probe)
    bf16_native, cpu = cpu_bf16_support()
    impls: dict[str, torch.nn.Module | Callable] = {"timm fp32": ref, "ours fp32": ours}
    notes: dict[str, str] = {}
    bf16 = LowPrecision(create_model(name).eval(), torch.bfloat16)
    bf16.model.load_state_dict(ref.state_dict())
    impls["ours bf16"] = bf16
    if not bf16_native:
        notes["ours bf16"] = f"not timed: {cpu} would emulate bf16 (|diff| measured emulated)"
    tmp = Path(tempfile.mkdtemp(prefix="mambaout-runtimes-"))
    onnx_ours = export_onnx(ours, tmp / "ours.onnx", img_size)
    onnx_timm = export_onnx(ref, tmp / "timm.onnx", img_size, metadata={})
    if calib:
        images = calibration_images(calib, eval_transform(ours.pretrained_cfg), 64)
        notes["ours int8 (ONNX Runtime)"] = f"calibrated on {len(images)} images from {calib}"
    else:  # the speed does not depend on the calibration; the |diff| does (random weights, random images)
        images = torch.randn(32, *shape).numpy()
        notes["ours int8 (ONNX Runtime)"] = "calibrated on 32 random images (pass --calib DIR for real ones)"
    quantize_int8(onnx_ours, tmp / "ours-int8.onnx", images)
    impls["ours int8 (ONNX Runtime)"] = OnnxRuntimeModel(tmp / "ours-int8.onnx")
    impls["ONNX Runtime fp32, our export"] = OnnxRuntimeModel(onnx_ours)
    session = ort_session(onnx_timm)  # timm's export carries no metadata: run its session bare
    impls["ONNX Runtime fp32, timm's export"] = lambda x: torch.from_numpy(
        session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    )
    try:
        xml = export_openvino(ours, tmp / "ours.xml", img_size)
        impls["OpenVINO fp32, our export"] = OpenVinoModel(xml, "f32")
        if bf16_native:
            impls["OpenVINO bf16, our export"] = OpenVinoModel(xml, "bf16")
    except ImportError:
        notes["OpenVINO"] = "not installed (pip install 'mambaout[openvino]')"

    diffs = {}
    for key, impl in impls.items():
        with torch.inference_mode():
            diffs[key] = float((impl(probe).float() - want).abs().max())
    timed = {k: v for k, v in impls.items() if not (k == "ours bf16" and not bf16_native)}
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, *shape)
        steps = {k: (lambda impl=impl, x=x: _call(impl, x)) for k, impl in timed.items()}
        times = _interleaved(steps, warmup, iters)
        base = statistics.median(times["timm fp32"])
        for key in impls:
            med = statistics.median(times[key]) if key in times else None
            rows.append(
                dict(
                    model=name,
                    impl=key,
                    batch_size=bs,
                    img_size=img_size,
                    img_per_s=round(bs / med, 2) if med else None,
                    ms_per_step=round(1e3 * med, 2) if med else None,
                    ratio_vs_timm=round(base / med, 3) if med else None,
                    max_abs_diff_vs_timm=float(f"{diffs[key]:.3g}"),
                    note=notes.get(key, ""),
                )
            )
    for key in ("OpenVINO",):
        if key in notes:
            log(f"{key}: {notes[key]}")
    with contextlib.suppress(OSError):
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return rows


def _call(impl, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return impl(x)


def _interleaved(steps: dict[str, Callable], warmup: int, iters: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {k: [] for k in steps}
    for _ in range(iters):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    return times


def roofline_lines(rows: list[dict], macs: int, peaks: dict[str, float | None]) -> list[str]:
    """Per dtype: MACs, the measured GEMM peak and the fraction of it the fastest row of that dtype reaches."""
    lines = []
    dtype_of = lambda impl: "int8" if "int8" in impl else "bf16" if "bf16" in impl else "fp32"  # noqa: E731
    for dtype in ("fp32", "bf16", "int8"):
        peak = peaks.get(dtype)
        for bs in sorted({r["batch_size"] for r in rows}):
            timed = [r for r in rows if r["batch_size"] == bs and dtype_of(r["impl"]) == dtype and r["img_per_s"]]
            if not timed or not peak:
                continue
            best = max(timed, key=lambda r: r["img_per_s"])
            reached = 2 * macs * best["img_per_s"] / 1e9
            lines.append(
                f"roofline {dtype}, batch {bs}: {macs / 1e9:.3f} GMACs/image; peak {peak:.0f} G{'OP' if dtype == 'int8' else 'FLOP'}/s "
                f"(measured 2048^3 GEMM); best row '{best['impl']}' reaches {reached:.1f} ({100 * reached / peak:.0f}%)"
            )
    return lines


def format_runtime_table(rows: list[dict]) -> str:
    header = (
        f"| {'implementation':<34} | {'batch':>5} | {'img/s':>8} | {'ms/step':>8} | {'vs timm':>7} "
        f"| {'max abs diff vs timm':>20} | note"
    )
    lines = [header, "| " + " | ".join(["---"] * 7)]
    for r in rows:
        img_s = f"{r['img_per_s']:.1f}" if r["img_per_s"] else "-"
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
        ratio = f"{r['ratio_vs_timm']:.2f}x" if r["ratio_vs_timm"] else "-"
        lines.append(
            f"| {r['impl']:<34} | {r['batch_size']:>5} | {img_s:>8} | {ms:>8} | {ratio:>7} "
            f"| {r['max_abs_diff_vs_timm']:>20.2e} | {r['note']}"
        )
    return "\n".join(lines)
