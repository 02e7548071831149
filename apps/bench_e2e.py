"""End-to-end benchmark: torchrec's DLRM, ours at a 10% HBM cache vs TorchRec's inference model all in HBM,
with fbgemm's UVM cache, and CPU-only, on a stream of new Zipf batches (needs CUDA and fbgemm-gpu)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from torchrec_hps.bench import save_json


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python -m apps.bench_e2e --rows 1000000")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    p.add_argument("--budget", type=float, default=0.1, help="HBM cache share of the rows (ours and the UVM cache)")
    p.add_argument("--batches", default="256,2048,16384")
    p.add_argument("--reps", type=int, default=30, help="timed batches per size, each new")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", default="results/bench_e2e.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_e2e: CUDA is not available here; run it on a GPU machine", file=sys.stderr)
        return 2
    from torchrec_hps.bench.e2e_bench import run_e2e_bench

    results = run_e2e_bench(num_tables=args.tables, rows=args.rows, budget=args.budget, reps=args.reps,
                            warmup=args.warmup, batches=[int(b) for b in args.batches.split(",")])
    save_json(args.json, {"device": torch.cuda.get_device_name(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
