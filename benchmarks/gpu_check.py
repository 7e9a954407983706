"""One GPU call: is each block path right on this card, how long is the first forward, how fast against timm?

    python benchmarks/gpu_check.py --out "$OUT"          # one CUDA GPU, torch, timm, triton; about 7 minutes at most

No install needed (it puts ../src on sys.path). It cannot hang: every section runs in its own subprocess (its own
process group) under its own timeout, inside a total budget (default 420 s, so one 10-minute device call always
returns the table); a section that stalls costs its timeout, prints what it measured before, and is reported as
TIMEOUT. Sections, most important first:

  env            card, versions
  aot            `mambaout kernels --aot sm_90`: every Triton kernel/config compiled, seconds each
  first_call     cold first forward (and backward) of mambaout_tiny, bs16 224 px, default path and fused kernels
                 with an empty Triton cache, then fused again with the warm cache, each in a fresh process
  kernel_check   fused gated_dwconv forward/backward vs the PyTorch reference, fp32 and bf16, odd + real shapes
  model_check    tiny vs timm (default path) and fused vs our reference, eval and training gradients
  kernel_speed   fused vs plain gate at every stage shape of femto, tiny and base: the fused path's acceptance
  infer_eager    tiny inference bs256 bf16 channels-last: timm, ours, ours-fused (interleaved)
  train_eager    tiny AdamW training step bs128 bf16 channels-last, with peak memory
  infer_compiled, train_compiled   the same under torch.compile
  others_eager   femto and base inference bs256

It ends with the issue's table (ours vs timm, eager and compiled, inference and training, peak memory, first-call
latency) in `$OUT/gpu_check.md`, the rows in a CSV named by device, and a per-section log.
`--smoke` runs the sections at toy sizes on CPU (Triton's interpreter for the fused path) to test this script.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# name -> timeout in seconds (each is also capped by what is left of the total budget)
SECTIONS = {
    "env": 30,
    "aot": 60,
    "first_call": 120,
    "kernel_check": 60,
    "model_check": 60,
    "kernel_speed": 60,
    "infer_eager": 60,
    "train_eager": 60,
    "infer_compiled": 150,
    "train_compiled": 180,
    "others_eager": 60,
}
# Under --smoke (CPU), these sections run the Triton kernels through the interpreter; elsewhere the fused path is off
# on CPU (it falls back to the plain forward), which keeps the smoke run short.
SMOKE_INTERPRETED = ("kernel_check", "kernel_speed")
T0 = time.time()


def say(msg: str = "") -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def record(out: Path, **row) -> None:
    """Append one measured result for the final tables (written as soon as it is measured)."""
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# --- sections (each runs in a child process: `gpu_check.py --section NAME`) --------------------------------------


def sec_env(ctx):
    import torch

    from mambaout.utils.device import device_name

    versions = {"torch": torch.__version__}
    for mod in ("triton", "timm"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    say(f"{device_name(torch.device(ctx.device))}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    record(ctx.out, kind="env", device=device_name(torch.device(ctx.device)), **versions)


def sec_aot(ctx):
    from mambaout.kernels import aot

    worst = 0.0
    for r in aot.compile_all("sm_90"):
        worst = max(worst, r.seconds)
        say(f"{r.kernel:<24} {r.variant:<30} {r.config:<18} {r.seconds:6.2f} s")
    record(ctx.out, kind="aot", worst_s=round(worst, 2))


def sec_first_call(ctx):
    """Each probe is a fresh process: nothing compiled, autotuned or initialised before its first forward."""
    cache = tempfile.mkdtemp(prefix="mambaout-gpucheck-triton-")
    for label, fused in (("default path", 0), ("fused, cold cache", 1), ("fused, warm cache", 1)):
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--probe-first-call", str(fused), *ctx.passthrough]
        t = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SECTIONS["first_call"])
        if res.returncode != 0:
            say(f"{label}: probe failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
            continue
        got = json.loads(res.stdout.strip().splitlines()[-1])
        say(
            f"{label}: first forward {got['forward_s']:.2f} s, first backward {got['backward_s']:.2f} s "
            f"(process {time.time() - t:.1f} s, model build {got['build_s']:.2f} s)"
        )
        record(ctx.out, kind="first_call", label=label, **got)


def smoke_threads() -> str:
    """On CPU (--smoke), the commands' thread policy before torch loads: a process with two threads beside a busy
    core spins at every barrier (the smoke run took 251 s beside one busy process, 80 s with the policy)."""
    from mambaout.utils import threads

    threads.begin()
    return f"torch uses {threads.settle().threads} threads ({threads.policy.reason})"


def probe_first_call(fused: bool, smoke: bool) -> None:
    if smoke:
        smoke_threads()
    import torch

    import mambaout
    from mambaout import kernels

    device = "cpu" if smoke else "cuda"
    kernels.set_fused_kernels(fused)
    t = time.perf_counter()
    model = mambaout.create_model("mambaout_femto" if smoke else "mambaout_tiny").to(device)
    x = torch.randn(2 if smoke else 16, 3, 32 if smoke else 224, 32 if smoke else 224, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    build = time.perf_counter() - t
    t = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=not smoke):
        y = model(x)
    sync()
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    y.float().sum().backward()
    sync()
    print(json.dumps(dict(build_s=build, forward_s=fwd, backward_s=time.perf_counter() - t, fused=fused)))


def sec_kernel_check(ctx):
    import torch

    from mambaout.kernels import gated_dwconv as gd

    device = ctx.device
    if not gd.triton_available(device):
        raise RuntimeError(f"Triton kernels unavailable on {device} (set TRITON_INTERPRET=1 for CPU)")
    shapes = (
        [(2, 13, 11, 50, 37, 7)] if ctx.smoke else [(2, 13, 11, 50, 37, 7), (2, 13, 11, 37, 37, 3), (1, 9, 5, 20, 7, 5)]
    )
    if not ctx.smoke:  # mambaout_tiny's four stages at 224 px, batch 8
        shapes += [
            (8, 56, 56, 256, 96, 7),
            (8, 28, 28, 512, 192, 7),
            (8, 14, 14, 1024, 384, 7),
            (8, 7, 7, 1536, 576, 7),
        ]
    fails = 0
    for B, H, W, hid, cc, k in shapes:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            torch.manual_seed(0)
            y = torch.randn(B, H, W, 2 * hid, device=device, dtype=dtype, requires_grad=True)
            w = (0.2 * torch.randn(cc, 1, k, k, device=device)).requires_grad_()
            b = torch.randn(cc, device=device, requires_grad=True)
            dz = torch.randn(B, H, W, hid, device=device, dtype=dtype)
            z = gd.gated_dwconv(y, w, b, hid, "gelu")
            g = torch.autograd.grad(z, (y, w, b), dz)
            yr, wr, br = (t.detach().float().requires_grad_() for t in (y, w, b))  # fp32 reference, same inputs
            zr = gd.gated_dwconv_reference(yr, wr, br, hid, "gelu")
            gr = torch.autograd.grad(zr, (yr, wr, br), dz.float())
            errs = [rel(z, zr)] + [rel(a, c) for a, c in zip(g, gr)]
            ok = all(e <= tol for e in errs)
            fails += not ok
            say(
                f"{'ok  ' if ok else 'FAIL'} B{B} {H}x{W} hidden {hid} conv {cc} k{k} {str(dtype)[6:]}: rel err "
                f"out {errs[0]:.1e} dy {errs[1]:.1e} dw {errs[2]:.1e} db {errs[3]:.1e} (tol {tol:.0e})"
            )
    record(ctx.out, kind="kernel_check", fails=fails, cases=2 * len(shapes))


def sec_model_check(ctx):
    import torch

    from mambaout import kernels
    from mambaout.deploy.benchmark import twins

    name = "mambaout_femto" if ctx.smoke else "mambaout_tiny"
    size, bs = (32, 2) if ctx.smoke else (224, 16)
    ref, ours = (m.to(ctx.device) for m in twins(name))
    x = torch.randn(bs, 3, size, size, device=ctx.device)
    for dtype in (torch.float32, torch.bfloat16):
        ac = torch.autocast(torch.device(ctx.device).type, dtype=dtype, enabled=dtype != torch.float32)
        with torch.no_grad(), ac:
            a, b = ref.eval()(x), ours.eval()(x)
            with kernels.fused_kernels():
                f = ours(x)
            with kernels.reference_mode():
                c = ours(x)
        say(f"{name} eval {str(dtype)[6:]}: ours vs timm {rel(b, a):.1e}; fused vs our reference {rel(f, c):.1e}")
        grads = {}
        for key, m, mode in (("timm", ref, None), ("ours", ours, None), ("fused", ours, "fused")):
            m.train().zero_grad(set_to_none=True)
            with ac, kernels.fused_kernels(mode == "fused"):
                m(x).float().logsumexp(-1).mean().backward()
            grads[key] = m.stages[0].blocks[0].fc1.weight.grad.float().clone()
        say(
            f"{name} train {str(dtype)[6:]} stage-0 fc1 grad: ours vs timm {rel(grads['ours'], grads['timm']):.1e}; "
            f"fused vs ours {rel(grads['fused'], grads['ours']):.1e}"
        )
        record(
            ctx.out,
            kind="model_check",
            dtype=str(dtype)[6:],
            eval_vs_timm=rel(b, a),
            eval_fused_vs_ref=rel(f, c),
            grad_vs_timm=rel(grads["ours"], grads["timm"]),
            grad_fused_vs_ours=rel(grads["fused"], grads["ours"]),
        )


# (model, stage): (dim, H) at 224 px; kobe shares femto's shapes and small tiny's.
STAGE_SHAPES = {
    "femto": [(48, 56), (96, 28), (192, 14), (288, 7)],
    "tiny": [(96, 56), (192, 28), (384, 14), (576, 7)],
    "base": [(128, 56), (256, 28), (512, 14), (768, 7)],
}


def sec_kernel_speed(ctx):
    import torch

    from mambaout.kernels import gated_dwconv as gd

    device, B = ctx.device, (1 if ctx.smoke else 64)
    for model, shapes in STAGE_SHAPES.items():
        for stage, (dim, H) in enumerate(shapes[:1] if ctx.smoke else shapes):
            if ctx.smoke:
                dim, H = dim // 8, 5
            hid, cc = int(8 / 3 * dim), dim
            y = torch.randn(B, H, H, 2 * hid, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(cc, 1, 7, 7, device=device, requires_grad=True)
            b = torch.randn(cc, device=device, requires_grad=True)
            dz = torch.randn(B, H, H, hid, device=device, dtype=torch.bfloat16)

            ms = _gate_times(gd, y, w, b, dz, hid, device, 1 if ctx.smoke else 20)
            faster = ms["fused_fwd"] < ms["plain_fwd"] and ms["fused_fwdbwd"] < ms["plain_fwdbwd"]
            say(
                f"{model} stage {stage} dim {dim} {H}x{H}: fwd plain {ms['plain_fwd']:.3f} fused {ms['fused_fwd']:.3f} ms; "
                f"fwd+bwd plain {ms['plain_fwdbwd']:.3f} fused {ms['fused_fwdbwd']:.3f} ms -> "
                f"{'fused faster' if faster else 'plain faster or equal'}"
            )
            record(ctx.out, kind="kernel_speed", model=model, stage=stage, dim=dim, H=H, faster=faster, **ms)


def _gate_times(gd, y, w, b, dz, hid, device, iters) -> dict[str, float]:
    """ms of the plain (autocast bf16) and the fused gate, forward only and forward + backward."""
    import torch

    def plain():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return gd.gated_dwconv_reference(y, w, b, hid, "gelu")

    def fused():
        return gd.gated_dwconv(y, w, b, hid, "gelu")

    ms = {}
    for label, fn in (("plain", plain), ("fused", fused)):
        ms[label + "_fwd"] = _time_ms(lambda fn=fn: _no_grad(fn), device, iters)
        ms[label + "_fwdbwd"] = _time_ms(lambda fn=fn: fn().backward(dz), device, iters)
    return ms


def _no_grad(fn):
    import torch

    with torch.no_grad():
        return fn()


def _time_ms(fn, device, iters):
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(min(3, iters)):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def _bench(ctx, name, mode, compile, batch):
    import torch

    from mambaout.cli.benchmark import benchmark_model, default_csv, write_csv

    rows = benchmark_model(
        name,
        mode=mode,
        batch_size=2 if ctx.smoke else batch,
        dtype="bf16",
        compile=compile,
        channels_last=True,
        device=ctx.device,
        img_size=32 if ctx.smoke else 224,
        warmup=1 if ctx.smoke else 3,
        iters=1 if ctx.smoke else 10,
        with_fused=True,
    )
    for r in rows:
        say(
            f"{r['model']} {mode} bs{r['batch_size']} compile={compile} {r['impl']:<11} {r['img_per_s']:>9.1f} img/s "
            f"{r['ms_per_step']:>8.1f} ms  peak {r['peak_mem_mib']:>8.0f} MiB  {r['speedup_vs_timm']:.2f}x timm"
        )
        record(ctx.out, kind="bench", **r)
    write_csv(rows, ctx.out / default_csv(torch.device(ctx.device)))


def sec_infer_eager(ctx):
    _bench(ctx, "mambaout_tiny", "infer", False, 256)


def sec_train_eager(ctx):
    _bench(ctx, "mambaout_tiny", "train", False, 128)


def sec_infer_compiled(ctx):
    _bench(ctx, "mambaout_tiny", "infer", True, 256)


def sec_train_compiled(ctx):
    _bench(ctx, "mambaout_tiny", "train", True, 128)


def sec_others_eager(ctx):
    for name in ("mambaout_femto", "mambaout_base"):
        _bench(ctx, name, "infer", False, 256)


# --- the parent: run each section in its own process group under a timeout, then the tables --------------------


def run_section(name: str, timeout: float, extra: list[str], out: Path) -> str:
    cmd = [sys.executable, __file__, "--section", name, "--out", str(out), *extra]
    env = dict(os.environ)
    if "--smoke" in extra and name in SMOKE_INTERPRETED:  # the kernels on CPU tensors, through Triton's interpreter
        env["TRITON_INTERPRET"] = "1"
    log = out / f"section-{name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: compile workers included
            proc.wait()
            status = f"TIMEOUT after {timeout:.0f} s"
    for line in log.read_text(errors="replace").splitlines():
        print(f"    {line}", flush=True)
    return status


def _fmt(v, unit=""):
    return "not measured" if v is None else f"{v:,.0f}{unit}"


def tables(results: list[dict], statuses: dict[str, str]) -> str:
    bench = {(r["mode"], r["compile"], r["impl"]): r for r in results if r["kind"] == "bench" and "tiny" in r["model"]}

    def ips(mode, compiled, impl):
        r = bench.get((mode, compiled, impl))
        return None if r is None else r["img_per_s"]

    def mem(mode, compiled, impl):
        r = bench.get((mode, compiled, impl))
        return None if r is None else r["peak_mem_mib"] / 1024

    lines = ["## mambaout_tiny vs timm (bf16, channels-last, 224 px), img/s", ""]
    lines.append(
        "| case | timm eager | timm compiled | ours eager | ours eager fused | ours compiled | ours compiled fused |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for mode, label in (("infer", "inference, bs 256"), ("train", "AdamW training step, bs 128")):
        cells = [ips(mode, c, i) for c, i in ((False, "timm"), (True, "timm"), (False, "ours"), (False, "ours-fused"))]
        cells += [ips(mode, True, "ours"), ips(mode, True, "ours-fused")]
        lines.append(f"| {label} | " + " | ".join(_fmt(c) for c in cells) + " |")
        if mode == "train":
            cells = [
                mem(mode, c, i) for c, i in ((False, "timm"), (True, "timm"), (False, "ours"), (False, "ours-fused"))
            ]
            cells += [mem(mode, True, "ours"), mem(mode, True, "ours-fused")]
            lines.append("| training peak GiB | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    tc_inf, tc_tr = ips("infer", True, "timm"), ips("train", True, "timm")
    lines += [
        "",
        "Targets (issue 9): inference eager >= timm compiled, compiled >= 1.5x timm compiled; training >= 1.5x "
        "timm compiled at <= 0.75x its peak memory.",
        "",
    ]
    for impl in ("ours", "ours-fused"):
        checks = []
        if tc_inf and ips("infer", False, impl):
            checks.append(f"eager inference {ips('infer', False, impl) / tc_inf:.2f}x timm compiled")
        if tc_inf and ips("infer", True, impl):
            checks.append(f"compiled inference {ips('infer', True, impl) / tc_inf:.2f}x")
        if tc_tr and ips("train", True, impl):
            checks.append(
                f"compiled training {ips('train', True, impl) / tc_tr:.2f}x at "
                f"{mem('train', True, impl) / mem('train', True, 'timm'):.2f}x memory"
            )
        lines.append(f"- {impl}: " + ("; ".join(checks) if checks else "not measured"))
    first = [r for r in results if r["kind"] == "first_call"]
    lines += [
        "",
        "## First call, mambaout_tiny bs16 224 px bf16 (fresh process; targets: fused cold <= 20 s, warm <= 3 s)",
        "",
    ]
    lines += ["| path | first forward s | first backward s |", "|---|---|---|"]
    lines += [f"| {r['label']} | {r['forward_s']:.2f} | {r['backward_s']:.2f} |" for r in first] or [
        "| - | not measured | |"
    ]
    speed = [r for r in results if r["kind"] == "kernel_speed"]
    if speed:
        lines += ["", "## Fused gate vs plain PyTorch per stage shape (bf16, ms, batch 64)", ""]
        lines += [
            "| model | stage | dim | HxW | plain fwd | fused fwd | plain fwd+bwd | fused fwd+bwd | fused faster |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            lines.append(
                f"| {r['model']} | {r['stage']} | {r['dim']} | {r['H']}x{r['H']} | {r['plain_fwd']:.3f} | "
                f"{r['fused_fwd']:.3f} | {r['plain_fwdbwd']:.3f} | {r['fused_fwdbwd']:.3f} | {'yes' if r['faster'] else 'no'} |"
            )
    lines += ["", "## Sections", ""] + [f"- {k}: {v}" for k, v in statuses.items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md, the CSV and logs")
    p.add_argument("--budget", type=float, default=420.0, help="total seconds for all sections (default 420)")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all, in order)")
    p.add_argument("--timeout", action="append", default=[], metavar="NAME=S", help="override a section's timeout")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, to test this script")
    p.add_argument("--section", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--probe-first-call", type=int, help=argparse.SUPPRESS)  # grandchild mode
    p.add_argument("--hang", default="", help=argparse.SUPPRESS)  # test hook: this section sleeps forever
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe_first_call is not None:
        probe_first_call(bool(args.probe_first_call), args.smoke)
        return 0
    if args.section:
        return child(args, out)
    timeouts = dict(SECTIONS)
    for item in args.timeout:
        key, _, value = item.partition("=")
        if key not in timeouts:
            p.error(f"--timeout {item!r}: unknown section; sections are {', '.join(SECTIONS)}")
        timeouts[key] = float(value)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; sections are {', '.join(SECTIONS)}")
    (out / "results.jsonl").write_text("")
    statuses = {}
    for name in names:
        left = args.budget - (time.time() - T0)
        if left < 5:
            statuses[name] = "SKIPPED (total budget spent)"
            say(f"=== {name}: skipped, {left:.0f} s of the budget left")
            continue
        timeout = min(timeouts[name], left)
        say(f"=== {name} (timeout {timeout:.0f} s)")
        extra = (["--smoke"] if args.smoke else []) + (["--hang", args.hang] if args.hang else [])
        statuses[name] = run_section(name, timeout, extra, out)
        say(f"--- {name}: {statuses[name]}")
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    env = next((r for r in results if r["kind"] == "env"), {})
    head = "# gpu_check" + (
        " --smoke (toy sizes on CPU: tests the script; the numbers mean nothing)" if args.smoke else ""
    )
    head += f"\n\n{env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
    head += f"timm {env.get('timm', '?')}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
    report = head + tables(results, statuses) + "\n"
    (out / "gpu_check.md").write_text(report)
    print(report, flush=True)
    say(f"wrote {out / 'gpu_check.md'}")
    return 0


def child(args, out: Path) -> int:
    ctx = argparse.Namespace(out=out, smoke=args.smoke, device="cpu" if args.smoke else "cuda")
    ctx.passthrough = ["--smoke"] if args.smoke else []
    if args.hang == args.section:
        say("simulated hang (test hook)")
        time.sleep(10**6)
    if args.smoke:
        say(smoke_threads())
    else:
        import torch

        if not torch.cuda.is_available():
            say("no CUDA device visible to torch; run with --smoke to test the script on CPU")
            return 2
    try:
        globals()[f"sec_{args.section}"](ctx)
    except Exception as e:  # noqa: BLE001 - report it; the parent goes on with the next section
        say(f"{type(e).__name__}: {e}")
        print(traceback.format_exc(), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
