"""Side-by-side params, MACs and throughput of registered models, measured the same way in one process.

The Mamba-vs-MambaOut and kernel-size tables of docs/analysis.md come from here: models timed interleaved (A, B, A,
B, ...) so that load from other processes hits them alike, median round reported. Inference is timed on the CPU
fast path and with every block on its plain forward (`kernels.reference_mode()`, like for like with the Mamba block);
training always runs the plain forward (the fast path is inference-only).

    python -m mambaout.analysis.compare mambaout_pico mambaout_pico_ssm --img-size 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from mambaout import kernels
from mambaout.analysis.flops import count_macs, count_params
from mambaout.models.factory import create_model


def _inference_step(model, x, y, opt):
    with torch.inference_mode():
        model(x)


def _train_step(model, x, y, opt):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# the measures of each model: (its batch step, the model's mode, the kernels mode it runs in)
MEASURES = {
    "infer_img_s": (_inference_step, "eval", contextlib.nullcontext),
    "infer_ref_img_s": (_inference_step, "eval", kernels.reference_mode),
    "train_img_s": (_train_step, "train", contextlib.nullcontext),
}


def compare(
    names: list[str],
    img_size: int = 64,
    batch_size: int = 64,
    num_classes: int = 10,
    repeats: int = 5,
    steps: int = 3,
    model_kwargs: list[dict] | None = None,
) -> list[dict]:
    """Params, MACs at `img_size` and median inference / training images per second of each of `names`, over
    `repeats` interleaved rounds of `steps` batches each (after one warm-up batch); `model_kwargs`: per-name extra
    `create_model` arguments (e.g. `{'kernel_size': 3}`)."""
    if repeats < 1 or steps < 1:
        raise ValueError(f"repeats and steps must be >= 1, got repeats={repeats}, steps={steps}")
    model_kwargs = model_kwargs or [{} for _ in names]
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size)
    y = torch.randint(0, num_classes, (batch_size,))
    models = [create_model(n, num_classes=num_classes, **kw) for n, kw in zip(names, model_kwargs)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    speeds = [{key: [] for key in MEASURES} for _ in models]
    for m, opt in zip(models, opts):  # warm-up: allocator, thread pools
        _inference_step(m.eval(), x, y, opt)
        _train_step(m.train(), x, y, opt)
    for _ in range(repeats):
        for m, opt, speed in zip(models, opts, speeds):
            for key, (step, mode, context) in MEASURES.items():
                getattr(m, mode)()
                with context():
                    t = time.perf_counter()
                    for _ in range(steps):
                        step(m, x, y, opt)
                    speed[key].append(steps * batch_size / (time.perf_counter() - t))
    rows = []
    for n, kw, m, speed in zip(names, model_kwargs, models, speeds):
        row = dict(model=n, model_kwargs=kw, params_m=round(count_params(m) / 1e6, 3))
        row.update(macs_m=round(count_macs(m, img_size) / 1e6, 2))
        row.update({key: round(statistics.median(v), 1) for key, v in speed.items()})
        rows.append(dict(row, img_size=img_size, batch_size=batch_size, threads=torch.get_num_threads()))
    return rows


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
    for spec in args.models:  # NAME:key=value,key=value
        name, _, extra = spec.partition(":")
        pairs = [item.partition("=") for item in extra.split(",") if item]
        names.append(name)
        kws.append({k: int(v) if v.lstrip("-").isdigit() else v for k, _, v in pairs})
    for r in compare(names, args.img_size, args.batch_size, repeats=args.repeats, model_kwargs=kws):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
