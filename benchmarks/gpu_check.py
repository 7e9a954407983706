"""One GPU call: is the fused path right on this card, and how fast is it against timm? (~5-8 minutes on an H100)

    python benchmarks/gpu_check.py --out "$OUT"          # on a machine with one CUDA GPU, torch, timm, triton

No install needed (it puts ../src on sys.path). Sections, each in its own try/except so one failure does not cost
the rest; every section prints what it measured or what failed, and a time budget skips what cannot finish:

1. correctness: the Triton `gated_dwconv` forward and backward against the PyTorch reference (fp32 tight, bf16
   within bf16 tolerance) on odd shapes and on mambaout_tiny's stage shapes; one block and the whole tiny model
   (bf16 autocast, forward + backward) against timm and against our plain forward.
2. kernel: the fused gate kernel vs the PyTorch ops it replaces (split, conv, cat, GELU, product), forward+backward.
3. the comparison table, ours vs timm measured in the same run (same weights, dtype, layout, batch):
   tiny inference bs256 bf16 channels-last eager and compiled; tiny training step bs128 bf16 AdamW eager and
   compiled, with peak memory; femto and base inference bs256 bf16 eager.

Writes `gpu_check.md` (tables + log) and `benchmark-<device>-torch<ver>.csv` into --out.
`--smoke` runs every section at toy sizes on CPU (set TRITON_INTERPRET=1 to include the kernel checks) to test
the script itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

LOG: list[str] = []
T0 = time.time()


def say(msg: str = "") -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def section(name: str, budget_s: float, deadline_s: float):
    """Decorator: run the section unless fewer than `budget_s` seconds remain; log its exception and go on."""

    def wrap(fn):
        def run(*args, **kwargs):
            left = deadline_s - (time.time() - T0)
            if left < budget_s:
                say(f"SKIPPED {name}: {left:.0f}s left of the time budget, it needs about {budget_s:.0f}s")
                return None
            say(f"=== {name}")
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - report and continue with the next section
                say(f"FAILED {name}: {type(e).__name__}: {e}")
                LOG.append("```\n" + traceback.format_exc() + "```")
                return None

        return run

    return wrap


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check_kernel(device: str, smoke: bool) -> list[str]:
    from mambaout.kernels import gated_dwconv as gd

    if not gd.triton_available(device):
        raise RuntimeError(f"Triton kernels unavailable on {device} (set TRITON_INTERPRET=1 for CPU)")
    shapes = [(2, 13, 11, 50, 37, 7), (2, 13, 11, 37, 37, 3), (1, 9, 5, 20, 7, 5)]
    if not smoke:  # mambaout_tiny's four stages at 224 px, batch 8: hidden 256/512/1024/1536, conv 96..576
        shapes += [
            (8, 56, 56, 256, 96, 7),
            (8, 28, 28, 512, 192, 7),
            (8, 14, 14, 1024, 384, 7),
            (8, 7, 7, 1536, 576, 7),
        ]
    out = []
    for B, H, W, hid, cc, k in shapes:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            torch.manual_seed(0)
            y = torch.randn(B, H, W, 2 * hid, device=device, dtype=dtype, requires_grad=True)
            w = (0.2 * torch.randn(cc, 1, k, k, device=device)).requires_grad_()
            b = torch.randn(cc, device=device, requires_grad=True)
            dz = torch.randn(B, H, W, hid, device=device, dtype=dtype)
            z = gd.gated_dwconv(y, w, b, hid, "gelu")
            g = torch.autograd.grad(z, (y, w, b), dz)
            # reference in fp32 from the same (rounded) inputs
            yr, wr, br = (t.detach().float().requires_grad_() for t in (y, w, b))
            zr = gd.gated_dwconv_reference(yr, wr, br, hid, "gelu")
            gr = torch.autograd.grad(zr, (yr, wr, br), dz.float())
            errs = [rel(z, zr)] + [rel(a, c) for a, c in zip(g, gr)]
            ok = all(e <= tol for e in errs)
            line = (
                f"{'ok  ' if ok else 'FAIL'} gated_dwconv B{B} {H}x{W} hidden {hid} conv {cc} k{k} {str(dtype)[6:]}: "
                f"rel err out {errs[0]:.1e}, dy {errs[1]:.1e}, dw {errs[2]:.1e}, db {errs[3]:.1e} (tol {tol:.0e})"
            )
            say(line)
            out.append(line)
    return out


def check_model(device: str, smoke: bool) -> None:
    from mambaout import kernels
    from mambaout.commands.benchmark import build_pair

    name = "mambaout_femto" if smoke else "mambaout_tiny"
    size, bs = (64, 2) if smoke else (224, 16)
    ref, ours = build_pair(name, torch.device(device))
    x = torch.randn(bs, 3, size, size, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        ac = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
        with torch.no_grad(), ac:
            a, b = ref.eval()(x), ours.eval()(x)
            with kernels.reference_mode():
                c = ours(x)
        say(f"{name} eval {str(dtype)[6:]}: ours vs timm rel {rel(b, a):.1e}, ours vs our reference {rel(b, c):.1e}")
        grads = []
        for m, mode in ((ref, None), (ours, None), (ours, "reference")):
            m.train().zero_grad(set_to_none=True)
            with ac, kernels.reference_mode() if mode else _null():
                m(x).float().logsumexp(-1).mean().backward()
            grads.append([p.grad.float().clone() for p in (m.stages[0].blocks[0].fc1.weight, m.stem.conv1.weight)])
        say(
            f"{name} train {str(dtype)[6:]} grads (stage0 fc1, stem conv1): ours vs timm "
            f"{rel(grads[1][0], grads[0][0]):.1e}, {rel(grads[1][1], grads[0][1]):.1e}; "
            f"ours vs our reference {rel(grads[1][0], grads[2][0]):.1e}, {rel(grads[1][1], grads[2][1]):.1e}"
        )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def kernel_speed(device: str, smoke: bool) -> None:
    from mambaout.kernels import gated_dwconv as gd

    B, H, hid, cc = (2, 8, 24, 8) if smoke else (256, 56, 256, 96)
    y = torch.randn(B, H, H, 2 * hid, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(cc, 1, 7, 7, device=device, requires_grad=True)
    b = torch.randn(cc, device=device, requires_grad=True)
    dz = torch.randn(B, H, H, hid, device=device, dtype=torch.bfloat16)

    def ref():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            z = gd.gated_dwconv_reference(y, w, b, hid, "gelu")
        z.backward(dz)

    def fused():
        gd.gated_dwconv(y, w, b, hid, "gelu").backward(dz)

    def fwd_only(f):
        def run():
            with torch.no_grad():
                f()

        return run

    for label, fn in (
        ("reference fwd", fwd_only(lambda: gd.gated_dwconv_reference(y, w.bfloat16(), b.bfloat16(), hid, "gelu"))),
        ("fused fwd", fwd_only(lambda: gd.gated_dwconv(y, w, b, hid, "gelu"))),
        ("reference fwd+bwd", ref),
        ("fused fwd+bwd", fused),
    ):
        ms = _time(fn, device, 3 if smoke else 20)
        nbytes = y.numel() * 2 + dz.numel() * 2
        say(f"gate B{B} {H}x{H} hidden {hid} conv {cc} bf16 {label}: {ms:.3f} ms ({nbytes / ms / 1e6:.0f} GB/s of y+z)")


def _time(fn, device, iters):
    for _ in range(3):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def table(rows: list[dict]) -> str:
    head = "| model | mode | batch | dtype | compiled | impl | img/s | ms/step | peak MiB | vs timm |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch_size']} | {r['dtype']} | {r['compile']} | {r['impl']} | "
            f"{r['img_per_s']:.0f} | {r['ms_per_step']:.1f} | {r['peak_mem_mib']:.0f} | {r['speedup_vs_timm']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md and the CSV")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, to test this script")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device visible to torch; run with --smoke to test the script on CPU")
        return 2
    from mambaout.commands.benchmark import benchmark_model, default_csv, device_name, write_csv

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    say(f"{device_name(torch.device(device))}, torch {torch.__version__}, triton {tv}")
    say(f"budget {args.budget:.0f}s; started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    deadline = args.budget
    section("1a correctness: gated_dwconv kernel vs reference", 30, deadline)(check_kernel)(device, args.smoke)
    section("1b correctness: model vs timm and vs our reference", 30, deadline)(check_model)(device, args.smoke)
    section("2 kernel speed: fused gate vs PyTorch ops", 20, deadline)(kernel_speed)(device, args.smoke)

    big = not args.smoke
    plan = [  # (label, kwargs, seconds it needs), most important first
        ("tiny infer bs256 bf16 eager", dict(name="mambaout_tiny", batch_size=256 if big else 2), 40),
        ("tiny infer bs256 bf16 compiled", dict(name="mambaout_tiny", batch_size=256 if big else 2, compile=True), 120),
        ("tiny train bs128 bf16 eager", dict(name="mambaout_tiny", mode="train", batch_size=128 if big else 2), 60),
        (
            "tiny train bs128 bf16 compiled",
            dict(name="mambaout_tiny", mode="train", batch_size=128 if big else 2, compile=True),
            150,
        ),
        ("femto infer bs256 bf16 eager", dict(name="mambaout_femto", batch_size=256 if big else 2), 30),
        ("base infer bs256 bf16 eager", dict(name="mambaout_base", batch_size=256 if big else 2), 45),
    ]
    rows: list[dict] = []
    csv_path = out / default_csv(torch.device(device))
    for label, kw, need in plan:
        kw = dict(
            dtype="bf16",
            channels_last=True,
            device=device,
            img_size=224 if big else 64,
            warmup=3 if big else 1,
            iters=10 if big else 1,
            with_reference=not kw.get("compile", False),
            **kw,
        )

        def run(kw=kw):
            r = benchmark_model(**kw)
            for x in r:
                say(
                    f"{x['model']} {x['mode']} bs{x['batch_size']} {x['impl']:<15} {x['img_per_s']:>9.1f} img/s "
                    f"{x['ms_per_step']:>8.1f} ms  peak {x['peak_mem_mib']:>8.0f} MiB  {x['speedup_vs_timm']:.2f}x timm"
                )
            write_csv(r, csv_path)
            return r

        got = section(f"3 {label}", need, deadline)(run)()
        rows += got or []
    md = [
        "# gpu_check",
        "",
        f"{device_name(torch.device(device))}, torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}",
        "",
        table(rows) if rows else "(no benchmark rows)",
        "",
        "## log",
        "",
        *LOG,
    ]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    say(f"wrote {out / 'gpu_check.md'} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
