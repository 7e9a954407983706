"""`mambaout models [PATTERN]`: the registered variants with parameters, MACs and published accuracy."""

from __future__ import annotations

import argparse
import json

import torch

from mambaout.analysis.flops import count_macs, count_params
from mambaout.model import MambaOut
from mambaout.variants import get_variant, list_models


def model_rows(pattern: str | None = None, img_size: int = 224) -> list[dict]:
    rows = []
    for name in list_models(pattern):
        variant, _ = get_variant(name)
        with torch.device("meta"):  # shapes only: counts in milliseconds without allocating weights
            model = (variant.builder or MambaOut)(**variant.kwargs)  # ViT / Mamba-block models have their own
        w = variant.default_weights
        rows.append(
            dict(
                model=name,
                params_m=round(count_params(model) / 1e6, 2),
                macs_g=round(count_macs(model, img_size) / 1e9, 2),
                top1=w.top1 if w else None,
                weights=[f"{name}.{x.tag}" for x in variant.weights],
                source=w.top1_source if w else "",
            )
        )
    return rows


def format_table(rows: list[dict], img_size: int) -> str:
    header = f"{'model':<24} {'params (M)':>10} {f'MACs@{img_size} (G)':>15} {'top-1 (%)':>9}  weights"
    lines = [header, "-" * len(header)]
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        lines.append(
            f"{r['model']:<24} {r['params_m']:>10.2f} {r['macs_g']:>15.2f} {top1:>9}  {', '.join(r['weights']) or '-'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mambaout models", description=__doc__)
    parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. '*_rw'")
    parser.add_argument("--img-size", type=int, default=224, help="resolution for the MAC count")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = model_rows(args.pattern, args.img_size)
    if not rows:
        parser.error(f"no model matches {args.pattern!r}; run 'mambaout models' for the list")
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, args.img_size))
    return 0
