"""Update-path benchmark entry point: `python -m apps.bench_update` (Kafka from `make servers-up`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from torchrec_hps.bench.update_bench import run_update_bench


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python -m apps.bench_update --rows 50000")
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--commit-intervals", default="0,1",
                   help="seconds, comma-separated, each measured in turn (0: commit every batch, logged writes)")
    p.add_argument("--json", default="results/bench_update.json")
    args = p.parse_args(argv)
    runs = []
    for interval in (float(x) for x in args.commit_intervals.split(",")):
        print(f"commit_interval={interval:g}s")
        runs.append(run_update_bench(args.bootstrap, rows=args.rows, dim=args.dim, rounds=args.rounds,
                                     commit_interval=interval))
    base = runs[0]["steady_rows_per_s"]
    for r in runs[1:]:
        print(f"applied rows/s after the first batch, commit_interval={r['commit_interval']:g}s vs "
              f"{runs[0]['commit_interval']:g}s: {r['steady_rows_per_s'] / base:.2f}x")
    result = {"runs": runs}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
