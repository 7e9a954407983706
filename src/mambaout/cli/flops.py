"""`mambaout flops`: parameters and MACs of the registered models at any resolution, or the paper's Transformer
FLOPs argument (Eq. 6-7) with `--transformer --dim D --tokens L`.

MACs are counted as the paper counts them (fvcore's convention: convs, linears and LayerNorms; attention's
matrix products and the SSM's scan added for the models that have them). Examples:

    mambaout flops                                   # every model at 224 px
    mambaout flops --models 'mambaout_*' --img-size 384
    mambaout flops --transformer --dim 384 --tokens 196 2304 4096 --plot share.png
"""

from __future__ import annotations

import argparse
import fnmatch
import json

from mambaout.analysis.flops import plot_quadratic_share, transformer_flops
from mambaout.cli.common import Parser, fail, model_counts
from mambaout.models.variants import list_models
from mambaout.utils.files import check_writable
from mambaout.utils.limits import check_img_size


def flops_rows(patterns: list[str] | None = None, img_size: int = 224) -> list[dict]:
    """Params and MACs of every registered model matching any of `patterns` (all when None), in registry order."""
    names = list_models()
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    rows = []
    for name in names:
        params, macs = model_counts(name, img_size)
        # MACs in millions too: small models at small sizes
        g, m = (None, None) if macs is None else (round(macs / 1e9, 2), round(macs / 1e6, 1))
        rows.append(dict(model=name, img_size=img_size, params_m=round(params / 1e6, 2), macs_g=g, macs_m=m))
    return rows


def format_rows(rows: list[dict]) -> str:
    size = rows[0]["img_size"]
    header = f"{'model':<24} {'params (M)':>10} {f'MACs@{size} (G)':>15} {f'MACs@{size} (M)':>15}"
    lines = [header, "-" * len(header)]
    for r in rows:
        macs = f"{r['macs_g']:>15.2f} {r['macs_m']:>15.1f}" if r["macs_g"] is not None else f"{'n/a (size)':>15}"
        lines.append(f"{r['model']:<24} {r['params_m']:>10.2f} {macs}")
    return "\n".join(lines)


def format_transformer(rows: list[dict]) -> str:
    d = rows[0]["dim"]
    lines = [
        f"Transformer block FLOPs, paper Eq. 6: 24·D²·L + 4·D·L² (D = {d}; 2 FLOPs per multiply-accumulate)",
        f"Eq. 7: the quadratic term dominates when L > 6·D = {rows[0]['threshold']}",
        "",
        f"{'L':>8} {'24·D²·L (G)':>13} {'4·D·L² (G)':>13} {'total (G)':>11} {'quadratic share':>16}  long sequence?",
    ]
    for r in rows:
        lines.append(
            f"{r['tokens']:>8} {r['linear'] / 1e9:>13.3f} {r['quadratic'] / 1e9:>13.3f} {r['total'] / 1e9:>11.3f} "
            f"{100 * r['quadratic_share']:>15.1f}%  {'yes' if r['long_sequence'] else 'no'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="mambaout flops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", metavar="PATTERN", help="names or shell-style patterns (default: all)")
    img_help = "input resolution for the model count"
    parser.add_argument("--img-size", type=int, default=224, check=check_img_size, help=img_help)
    parser.add_argument("--transformer", action="store_true", help="the Transformer FLOPs argument (Eq. 6-7)")
    parser.add_argument("--dim", type=int, nargs="+", help="with --transformer: width D (several for the plot)")
    parser.add_argument("--tokens", type=int, nargs="+", help="with --transformer: sequence length(s) L")
    plot_help = "with --transformer: save the quadratic share against L"
    parser.add_argument("--plot", metavar="PNG", check=lambda path: check_writable(path, "--plot"), help=plot_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    if args.transformer:
        if not args.dim:
            parser.error("--transformer needs --dim D (e.g. --dim 384 for ViT-S, 768 for ViT-B)")
        if any(d < 1 for d in args.dim) or any(t < 1 for t in args.tokens or []):
            parser.error("--dim and --tokens must be positive integers")
        tokens = args.tokens or [6 * args.dim[0]]
        tables = ([transformer_flops(d, t) for t in tokens] for d in args.dim)
        print("\n\n".join(json.dumps(rows, indent=2) if args.json else format_transformer(rows) for rows in tables))
        if args.plot:
            try:
                plot_quadratic_share(args.dim, args.plot, max_tokens=max(max(tokens), 4 * 6 * max(args.dim)))
            except OSError as e:
                return fail("flops", e)
            print(f"\nplot saved to {args.plot}")
        return 0

    if args.dim or args.tokens or args.plot:
        parser.error("--dim, --tokens and --plot go with --transformer")
    rows = flops_rows(args.models, args.img_size)
    if not rows:
        parser.error(f"no model matches {args.models}; run 'mambaout models' for the list")
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0
