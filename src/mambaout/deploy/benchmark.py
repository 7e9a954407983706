"""`mambaout benchmark --runtimes`: every way of running one model on this CPU, each alone in its own process.

    flock /tmp/mambaout-cpu.lock mambaout benchmark --runtimes --models mambaout_femto --batch-size 32 [--compile]

The rows (`IMPLS`, `COMPILED`), the runtimes' settings, the roofline line and why one process per row (every
runtime's thread pool spins after its work, slowing the next row): docs/performance.md, "CPU deployment". The parent
writes the files every row needs (`prepare`), then runs `python -m mambaout.deploy.benchmark ROW FOLDER ...` per row
(`measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from mambaout.data.image import eval_transform
from mambaout.deploy.quantize import calibration_images, quantize_int8
from mambaout.deploy.runtimes import OnnxRuntimeModel, OpenVinoModel, export_openvino, ort_session
from mambaout.inference import precision
from mambaout.inference.export import export_onnx
from mambaout.kernels.cpu import set_cpu_bf16, set_cpu_native, set_cpu_pack_convs
from mambaout.models.factory import create_model
from mambaout.models.variants import get_variant
from mambaout.utils.threads import set_threads


def gemm_peak_gflops(dtype: str = "fp32", n: int = 2048, repeats: int = 3) -> float | None:
    """GFLOP/s (GOP/s for int8) of an `n`x`n`x`n` matrix product on this CPU, best of `repeats` and of the libraries
    torch offers (BLAS, oneDNN); None if unsupported."""
    if dtype == "int8":
        fn = _ort_int8_matmul(n)  # the int8 kernels the int8 row runs (torch has no fast int8 GEMM on CPU)
        return _best_gflops([fn] if fn else [], n, repeats)
    t = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=t), torch.randn(n, n, dtype=t)
    fns = [lambda: a @ b]  # BLAS (MKL: slow on AMD CPUs) ...
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # ... and oneDNN, the library the fast path uses
        fns.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return _best_gflops(fns, n, repeats)


def _best_gflops(fns: list[Callable], n: int, repeats: int) -> float | None:
    """GFLOP/s of the fastest of `fns` (each an n^3 product), best of `repeats` runs after one warm-up."""
    best = float("inf")
    for fn in fns:
        try:
            fn()
        except RuntimeError:
            continue
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9 if best < float("inf") else None


def _ort_int8_matmul(n: int) -> Callable | None:
    """ONNX Runtime's `MatMulInteger` (uint8 x int8 -> int32) on `n`x`n` matrices, as a zero-argument callable."""
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])
    b = numpy_helper.from_array(np.random.randint(-64, 64, (n, n)).astype(np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8_gemm", [a], [c], [b])
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
    variant, _ = get_variant(name)
    if variant.name in timm.list_models("mambaout*"):  # a weight tag (`mambaout_tiny.in1k`) as timm reads it
        return timm.create_model(name, **kwargs)
    arch = {k: v for k, v in variant.kwargs.items() if k in ("depths", "dims")}
    if set(variant.kwargs) - {"depths", "dims"} or variant.builder is not None:
        raise ValueError(
            f"timm has no {name} to compare with, nor its class with arguments {variant.kwargs}; "
            "pick one of timm.list_models('mambaout*')"
        )
    return timm.create_model("mambaout_femto", **arch, **kwargs)


# Row name -> the dtype its arithmetic runs in (for the roofline line). Each row is timed in its own process.
IMPLS = {
    "timm fp32": "fp32",
    "ours fp32": "fp32",
    "ours fp32, C kernels": "fp32",
    "ours bf16": "bf16",
    "ours bf16, fast path": "bf16",
    "timm bf16 (autocast)": "bf16",
    "ours int8 (ONNX Runtime)": "int8",
    "ONNX Runtime fp32, our export": "fp32",
    "ONNX Runtime fp32, timm's export": "fp32",
    "OpenVINO fp32, our export": "fp32",
    "OpenVINO bf16, our export": "bf16",
}
# --compile adds these: the peers a user would otherwise pick (inductor with freezing: weights frozen into the graph).
COMPILED = {
    "timm fp32 (torch.compile)": "fp32",
    "ours fp32 (torch.compile)": "fp32",
    "timm bf16 (torch.compile, autocast)": "bf16",
    "ours bf16 (torch.compile)": "bf16",
}
ROWS = {**IMPLS, **COMPILED}


def twins(name: str, **kwargs):
    """(timm's model, ours) of `name` with identical weights (timm's, seeded), on CPU in float32."""
    torch.manual_seed(0)
    ref = timm_twin(name, **kwargs)
    ours = create_model(name, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def prepare(
    name: str, folder: Path, img_size: int = 224, calib: str | None = None, openvino: bool = True
) -> dict[str, str]:
    """Write what the rows load into `folder`: the weights (timm's, which ours loads too), the two probe images
    and timm's logits on them, our ONNX export (fp32 and int8), timm's, and our OpenVINO IR. Returns notes per row."""
    ref, ours = (m.eval() for m in twins(name))
    shape = (3, img_size, img_size)
    ours.pretrained_cfg = {**ours.pretrained_cfg, "input_size": shape}
    probe = torch.randn(2, *shape)  # the two images every row's |diff| is measured on
    with torch.inference_mode():
        want = ref(probe)
    torch.save({"weights": ref.state_dict(), "probe": probe, "want": want, "name": name}, folder / "weights.pt")
    notes = {}
    export_onnx(ours, folder / "ours.onnx", img_size)
    export_onnx(ref, folder / "timm.onnx", img_size, metadata={})
    if calib:
        images = calibration_images(calib, eval_transform(ours.pretrained_cfg), 64)
        notes["ours int8 (ONNX Runtime)"] = f"calibrated on {len(images)} images from {calib}"
    else:  # the speed does not depend on the calibration; the |diff| does (random weights, random images)
        images = torch.randn(32, *shape).numpy()
        notes["ours int8 (ONNX Runtime)"] = "calibrated on 32 random images (pass --calib DIR for real ones)"
    quantize_int8(folder / "ours.onnx", folder / "ours-int8.onnx", images)
    if openvino:
        try:
            export_openvino(ours, folder / "ours.xml", img_size)
        except ImportError:
            for key in ("OpenVINO fp32, our export", "OpenVINO bf16, our export"):
                notes[key] = "not installed (pip install 'mambaout[openvino]')"
    return notes


def load_impl(key: str, folder: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The row `key` built from `prepare`'s files, as a function of a float32 image batch returning logits."""
    saved = torch.load(folder / "weights.pt", weights_only=True)
    name, weights = saved["name"], saved["weights"]
    compiled = "torch.compile" in key
    if key.startswith(("timm", "ours")) and "ONNX" not in key:
        kind = key.split()[0]
        model = timm_twin(name) if kind == "timm" else create_model(name)
        model.load_state_dict(weights)
        model.eval()
        if key == "ours fp32, C kernels":  # the C kernels and packed convs forced on, where they are opt-in too
            set_cpu_native(True)
            set_cpu_pack_convs(True)
        if "bf16" in key and kind == "ours":
            model = precision.LowPrecision(model, torch.bfloat16)  # bf16 weights, converted once
            if not compiled:  # "ours bf16": the plain block forward; "fast path": the bf16 CPU fast path, forced on
                set_cpu_bf16("fast path" in key)
        if compiled:
            # inductor as PyTorch recommends for CPU inference: weights frozen into the graph (process-wide: this row
            # has its own process). One static graph per batch size, as a fixed-batch deployment compiles it: dynamic
            # shapes (the 2-image probe, then batch 1) measured slower.
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            model = torch.compile(model, dynamic=False)
        if "autocast" in key:

            def autocast_call(x: torch.Tensor) -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x).float()

            return autocast_call
        return model
    ours_onnx = {"ours int8 (ONNX Runtime)": "ours-int8.onnx", "ONNX Runtime fp32, our export": "ours.onnx"}
    if key in ours_onnx:
        return OnnxRuntimeModel(folder / ours_onnx[key], threads)
    if key == "ONNX Runtime fp32, timm's export":
        session = ort_session(folder / "timm.onnx", threads)  # timm's export carries no metadata: run it bare
        input_name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
    if key.startswith("OpenVINO"):
        return OpenVinoModel(folder / "ours.xml", "bf16" if "bf16" in key else "f32", threads)
    raise ValueError(f"unknown implementation {key!r}; expected one of {sorted(ROWS)}")


def measure(key: str, folder: Path, batch_sizes, iters: int, warmup: int, threads: int, img_size: int) -> dict:
    """In this process: build row `key`, its max |logit diff| to timm fp32 on the probe, and `iters` timed steps per
    batch size after `warmup` untimed ones (compilation, oneDNN's first-call work, the matmul choice)."""
    set_threads(threads, "benchmark worker")
    impl = load_impl(key, folder, threads)
    saved = torch.load(folder / "weights.pt", weights_only=True)
    times = {}
    with torch.inference_mode():
        diff = float((impl(saved["probe"]).float() - saved["want"]).abs().max())
        for bs in batch_sizes:
            x = torch.randn(bs, 3, img_size, img_size)
            for _ in range(warmup):
                impl(x)
            times[bs] = []
            for _ in range(iters):
                t0 = time.perf_counter()
                impl(x)
                times[bs].append(time.perf_counter() - t0)
    return {"diff": diff, "times": times, "load": os.getloadavg()[0]}


def _own_process(cmd: list[str], timeout: float = 1800) -> dict:
    """Run one worker (`python -m mambaout.deploy.benchmark ...`) and read the JSON line it prints last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the same mambaout as ours
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{cmd[3]!r} failed (exit {done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def runtime_rows(
    name: str = "mambaout_femto",
    batch_sizes: tuple[int, ...] = (1, 32),
    img_size: int = 224,
    iters: int = 10,
    warmup: int = 2,
    calib: str | None = None,
    log: Callable[[str], None] = print,
    compile: bool = False,
    rounds: int = 1,
    threads: int | None = None,
    only: list[str] | None = None,
) -> list[dict]:
    """Time every available way of running `name`, each in its own process (see the module docstring).

    `rounds` runs every row's process that many times, one of each in turn, and takes the median over all their
    steps; each round's median is kept too (`ms_per_step_by_round`), so a ratio can be read round by round, between
    processes that ran minutes apart at most. `only` restricts the rows (timm fp32 always runs: it is the baseline).
    One dict per (row, batch).
    """
    threads = threads or torch.get_num_threads()
    keys = list(IMPLS) + (list(COMPILED) if compile else [])
    if only:
        unknown = set(only) - set(keys)
        if unknown:
            raise ValueError(f"unknown --only row(s) {sorted(unknown)}; expected some of {keys}")
        keys = [k for k in keys if k == "timm fp32" or k in only]
    bf16_native, cpu = precision.cpu_bf16_support()
    emulated = set() if bf16_native else {k for k in keys if ROWS[k] == "bf16"}
    with tempfile.TemporaryDirectory(prefix="mambaout-runtimes-") as tmp:
        folder = Path(tmp)
        notes = prepare(name, folder, img_size, calib, openvino=any(k.startswith("OpenVINO") for k in keys))
        notes |= {k: f"not timed: {cpu} would emulate bf16" for k in emulated}
        # "ours bf16" runs where bf16 is emulated too, for its |diff| (one step at the first batch size)
        run = [k for k in keys if k not in notes or "int8" in k or k == "ours bf16"]
        results: dict[str, dict] = {}
        for _ in range(rounds):
            for key in run:
                sizes = (batch_sizes[0],) if key in emulated else batch_sizes
                cmd = [sys.executable, "-m", "mambaout.deploy.benchmark", key, str(folder), "--batch-sizes"]
                cmd += [*map(str, sizes), "--iters", str(iters if sizes == batch_sizes else 1), "--warmup", str(warmup)]
                got = _own_process([*cmd, "--threads", str(threads), "--img-size", str(img_size)])
                log(f"  {key}: done (load average {got['load']:.2f})")
                res = results.setdefault(key, {"diff": got["diff"], "times": {}, "rounds": {}, "load": []})
                for b, t in got["times"].items():
                    res["times"].setdefault(int(b), []).extend(t)
                    res["rounds"].setdefault(int(b), []).append(statistics.median(t))
                res["load"].append(got["load"])
    rows = []
    for bs in batch_sizes:
        base = statistics.median(results["timm fp32"]["times"][bs])
        for key in keys:
            res = results.get(key)
            med = statistics.median(res["times"][bs]) if res and key not in emulated else None
            row = dict(model=name, impl=key, batch_size=bs, img_size=img_size)
            row.update(img_per_s=round(bs / med, 2) if med else None, ms_per_step=round(1e3 * med, 2) if med else None)
            row.update(ratio_vs_timm=round(base / med, 3) if med else None)
            row.update(max_abs_diff_vs_timm=float(f"{res['diff']:.3g}") if res else None, threads=threads)
            by_round = " ".join(f"{1e3 * t:.2f}" for t in res["rounds"][bs]) if med else ""
            row.update(rounds=rounds, ms_per_step_by_round=by_round)
            rows.append(dict(row, load=max(res["load"]) if res else None, note=notes.get(key, "")))
    return rows


def roofline_lines(rows: list[dict], macs: int, peaks: dict[str, float | None]) -> list[str]:
    """Per dtype: MACs, the measured GEMM peak and the fraction of it the fastest row of that dtype reaches."""
    lines = []
    for dtype in ("fp32", "bf16", "int8"):
        peak = peaks.get(dtype)
        for bs in sorted({r["batch_size"] for r in rows}):
            timed = [r for r in rows if r["batch_size"] == bs and ROWS[r["impl"]] == dtype and r["img_per_s"]]
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
    """The rows as a Markdown table; with more than one round, each round's ms/step in a column before the note."""
    by_round = any(r.get("rounds", 1) > 1 for r in rows)
    header = (
        f"| {'implementation':<35} | {'batch':>5} | {'img/s':>8} | {'ms/step':>8} | {'vs timm':>7} "
        f"| {'max abs diff vs timm':>20} | {'load':>4} | " + ("ms/step by round | " if by_round else "") + "note"
    )
    lines = [header, "| " + " | ".join(["---"] * (9 if by_round else 8))]
    for r in rows:
        img_s = f"{r['img_per_s']:.1f}" if r["img_per_s"] else "-"
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
        ratio = f"{r['ratio_vs_timm']:.2f}x" if r["ratio_vs_timm"] else "-"
        diff = f"{r['max_abs_diff_vs_timm']:.2e}" if r["max_abs_diff_vs_timm"] is not None else "-"
        load = f"{r['load']:.1f}" if r.get("load") is not None else "-"
        rounds = f"{r['ms_per_step_by_round'] or '-'} | " if by_round else ""
        lines.append(
            f"| {r['impl']:<35} | {r['batch_size']:>5} | {img_s:>8} | {ms:>8} | {ratio:>7} | {diff:>20} | {load:>4} "
            f"| {rounds}{r['note']}"
        )
    return "\n".join(lines)


# The rows `round_ratio_lines` compares with their peers: the other runtimes of the same dtype, and our own row that
# the forced switch changes (where the switch is the CPU's default, the two are the same code).
OURS_EAGER = {"ours fp32": (), "ours fp32, C kernels": ("ours fp32",), "ours bf16, fast path": ("ours bf16",)}


def round_ratio_lines(rows: list[dict]) -> list[str]:
    """With more than one round: for our eager rows, each peer of the same dtype's time over ours, round by round
    (the two processes of a round ran one after the other), and the median of those ratios; above 1 means ours ran
    faster. A run on a noisy machine shows its spread here rather than in one ratio of medians."""
    lines = []
    for r in rows:
        if r["impl"] not in OURS_EAGER or r.get("rounds", 1) < 2 or not r["ms_per_step_by_round"]:
            continue
        ours = [float(t) for t in r["ms_per_step_by_round"].split()]
        for peer in rows:
            same = peer["batch_size"] == r["batch_size"] and ROWS[peer["impl"]] == ROWS[r["impl"]]
            ours_peer = peer["impl"] in OURS_EAGER[r["impl"]]
            if not same or (peer["impl"].startswith("ours") and not ours_peer) or not peer["ms_per_step_by_round"]:
                continue
            ratios = [float(t) / o for t, o in zip(peer["ms_per_step_by_round"].split(), ours)]
            lines.append(
                f"by round, batch {r['batch_size']}: {peer['impl']} / {r['impl']} = "
                + " ".join(f"{x:.2f}" for x in ratios)
                + f" (median {statistics.median(ratios):.2f})"
            )
    return lines


def _worker(argv: list[str] | None = None) -> int:
    """`python -m mambaout.deploy.benchmark ROW FOLDER ...`: time one row in this process, print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m mambaout.deploy.benchmark", description=_worker.__doc__)
    p.add_argument("key", help="a row name (IMPLS or COMPILED)")
    p.add_argument("folder", help="what prepare() wrote")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--img-size", type=int, default=224)
    a = p.parse_args(argv)
    got = measure(a.key, Path(a.folder), a.batch_sizes, a.iters, a.warmup, a.threads, a.img_size)
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
