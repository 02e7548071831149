"""Module benchmark entry point: `python -m apps.bench_module` (hit rate and latency vs batch and cache ratio)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from torchrec_hps.bench.module_bench import plot_module_bench, run_module_bench


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python -m apps.bench_module --rows 50000")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05, 0.2, 0.5])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="results/bench_module.json")
    p.add_argument("--png", default="results/bench_module.png")
    args = p.parse_args(argv)
    results = run_module_bench(num_tables=args.tables, rows=args.rows, dim=args.dim, batches=args.batches,
                               ratios=args.ratios, device=args.device)
    for path in (args.json, args.png):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    plot_module_bench(results, args.png)
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
