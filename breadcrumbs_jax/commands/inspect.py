"""``breadcrumbs-jax inspect CKPT``: a checkpoint's leaves, shapes, dtypes and sizes, from metadata only."""

from __future__ import annotations

import argparse
import json

from ..io import open_source
from ..plan import LeafRule


def _size(n: int) -> str:
    units, k, x = ("B", "KiB", "MiB", "GiB", "TiB"), 0, float(n)
    while x >= 1024 and k < len(units) - 1:
        x, k = x / 1024, k + 1
    return f"{n} B" if k == 0 else f"{x:.1f} {units[k]}"


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="list a checkpoint's leaves without loading them",
                              description="List the leaves of an Orbax, safetensors or msgpack checkpoint "
                              "(path, shape, dtype, size) from its metadata; no weights are read.")
    p.add_argument("checkpoint")
    p.add_argument("--pattern", action="append", default=[], help="only leaves matching this glob (or re:regex)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = open_source(args.checkpoint)
    try:
        leaves = [i for p, i in source.leaves().items()
                  if not args.pattern or any(LeafRule(pat).matches(p) for pat in args.pattern)]
    finally:
        source.close()
    total = sum(i.nbytes for i in leaves)
    if args.json:
        print(json.dumps({
            "path": args.checkpoint, "format": source.format, "layout": source.layout, "bytes": total,
            "leaves": [{"path": i.path, "shape": list(i.shape), "dtype": i.dtype, "bytes": i.nbytes} for i in leaves],
        }, indent=1))
        return 0
    rows = [("leaf", "shape", "dtype", "size")]
    rows += [(i.path, "x".join(map(str, i.shape)) or "scalar", i.dtype, _size(i.nbytes)) for i in leaves]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    fmt = lambda r: "  ".join(x.rjust(w) if c == 3 else x.ljust(w) for c, (x, w) in enumerate(zip(r, widths))).rstrip()  # noqa: E731
    print(fmt(rows[0]))
    print("  ".join("-" * w for w in widths))
    for r in rows[1:]:
        print(fmt(r))
    params = sum(i.size for i in leaves)
    print(f"{source.format} ({source.layout} layout): {len(leaves)} leaves, {params:,} entries, {_size(total)}")
    return 0
