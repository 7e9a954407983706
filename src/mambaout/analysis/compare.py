"""Side-by-side params, MACs and throughput of registered models, measured the same way in one process.

The README's Mamba-vs-MambaOut and kernel-size tables take their cost columns from here, so every model in a
table is timed by the same code, on the same inputs, interleaved (model A, model B, A, B, ...) so that load from
other processes hits them alike; the median of the repeats is reported.

Inference is timed twice: as users get it (MambaOut's Gated CNN blocks may take the package's fused CPU fast
path, `mambaout.kernels`), and with every block on its plain PyTorch forward (`kernels.reference_mode()`), which
is the like-for-like comparison with the Mamba block (it has no fused kernel). Training always runs the plain
forward (the fast path is inference-only).

    python -m mambaout.analysis.compare mambaout_pico mambaout_pico_ssm --img-size 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mambaout import kernels
from mambaout.analysis.flops import count_macs, count_params
from mambaout.models.factory import create_model


def _inference_step(model, x):
    with torch.inference_mode():
        model(x)


def _train_step(model, x, y, opt):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def compare(
    names: list[str],
    img_size: int = 64,
    batch_size: int = 64,
    num_classes: int = 10,
    repeats: int = 5,
    steps: int = 3,
    model_kwargs: list[dict] | None = None,
) -> list[dict]:
    """Params, MACs at `img_size` and median inference / training images per second of each model.

    Args:
        names: Registered model names.
        img_size, batch_size, num_classes: The setting timed (the Imagenette CPU recipes': 64 px, 64, 10).
        repeats: Interleaved rounds over all models; the median round is reported.
        steps: Timed batches per model per round (after one warm-up batch).
        model_kwargs: Per-name extra `create_model` arguments (e.g. `{'kernel_size': 3}`), or None.
    """
    if repeats < 1 or steps < 1:
        raise ValueError(f"repeats and steps must be >= 1, got repeats={repeats}, steps={steps}")
    model_kwargs = model_kwargs or [{} for _ in names]
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size)
    y = torch.randint(0, num_classes, (batch_size,))
    models = [create_model(n, num_classes=num_classes, **kw) for n, kw in zip(names, model_kwargs)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    infer = [[] for _ in models]
    infer_ref = [[] for _ in models]
    train = [[] for _ in models]
    for m, opt in zip(models, opts):  # warm-up: allocator, thread pools
        _inference_step(m.eval(), x)
        _train_step(m.train(), x, y, opt)
    for _ in range(repeats):
        for i, (m, opt) in enumerate(zip(models, opts)):
            m.eval()
            t = time.perf_counter()
            for _ in range(steps):
                _inference_step(m, x)
            infer[i].append(steps * batch_size / (time.perf_counter() - t))
            with kernels.reference_mode():
                t = time.perf_counter()
                for _ in range(steps):
                    _inference_step(m, x)
                infer_ref[i].append(steps * batch_size / (time.perf_counter() - t))
            m.train()
            t = time.perf_counter()
            for _ in range(steps):
                _train_step(m, x, y, opt)
            train[i].append(steps * batch_size / (time.perf_counter() - t))
    return [
        dict(
            model=n,
            model_kwargs=kw,
            params_m=round(count_params(m) / 1e6, 3),
            macs_m=round(count_macs(m, img_size) / 1e6, 2),
            infer_img_s=round(statistics.median(infer[i]), 1),
            infer_ref_img_s=round(statistics.median(infer_ref[i]), 1),
            train_img_s=round(statistics.median(train[i]), 1),
            img_size=img_size,
            batch_size=batch_size,
            threads=torch.get_num_threads(),
        )
        for i, (n, kw, m) in enumerate(zip(names, model_kwargs, models))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m mambaout.analysis.compare", description=__doc__
    )
    parser.add_argument("models", nargs="+", help="registered names; NAME:kernel_size=K adds create_model arguments")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names, kws = [], []
    for spec in args.models:
        name, _, extra = spec.partition(":")
        kw = {}
        for item in filter(None, extra.split(",")):
            k, _, v = item.partition("=")
            kw[k] = int(v) if v.lstrip("-").isdigit() else v
        names.append(name)
        kws.append(kw)
    rows = compare(names, args.img_size, args.batch_size, repeats=args.repeats, model_kwargs=kws)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
