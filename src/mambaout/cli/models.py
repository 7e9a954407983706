"""`mambaout models [PATTERN]`: the registered models with parameters, MACs and published accuracy.

The MambaOut families come first; the models of the paper's comparisons (`mambaout.analysis`: DeiT ViTs, MambaOut
with Mamba's SSM) follow in a table of their own.
"""

from __future__ import annotations

import json

from mambaout.cli.common import Parser, model_counts
from mambaout.models.variants import get_variant, list_aliases, list_models
from mambaout.utils.limits import check_img_size

GROUPS = {"mambaout": "MambaOut", "analysis": "analysis models (the paper's comparisons, mambaout.analysis)"}


def model_rows(pattern: str | None = None, img_size: int = 224) -> list[dict]:
    rows = []
    for group in GROUPS:
        for name in list_models(pattern, group=group):
            variant, _ = get_variant(name)
            params, macs = model_counts(name, img_size)
            w = variant.default_weights
            top1, source = (w.top1, w.top1_source) if w else (None, "")
            macs_g = None if macs is None else round(macs / 1e9, 2)
            row = dict(model=name, group=group, params_m=round(params / 1e6, 2), macs_g=macs_g, top1=top1)
            rows.append(dict(row, weights=[f"{name}.{x.tag}" for x in variant.weights], source=source))
    return rows


def format_table(rows: list[dict], img_size: int) -> str:
    header = f"{'model':<24} {'params (M)':>10} {f'MACs@{img_size} (G)':>15} {'top-1 (%)':>9}  weights"
    lines = []
    for group, title in GROUPS.items():
        group_rows = [r for r in rows if r["group"] == group]
        if not group_rows:
            continue
        lines += ([""] if lines else []) + [title, header, "-" * len(header)]
        for r in group_rows:
            top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
            weights = ", ".join(r["weights"]) or "-"
            macs = f"{r['macs_g']:>15.2f}" if r["macs_g"] is not None else f"{'n/a (size)':>15}"
            lines.append(f"{r['model']:<24} {r['params_m']:>10.2f} {macs} {top1:>9}  {weights}")
    shown = {r["model"] for r in rows}
    aliases = [f"{alias} = {name}" for alias, name in list_aliases().items() if name in shown]
    if aliases:
        lines += ["", "also known as: " + "; ".join(aliases)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="mambaout models", description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. '*_rw'")
    parser.add_argument("--img-size", type=int, default=224, check=check_img_size, help="resolution for the MAC count")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = model_rows(args.pattern, args.img_size)
    if not rows:
        parser.error(f"no model matches {args.pattern!r}; run 'mambaout models' for the list")
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, args.img_size))
    return 0
