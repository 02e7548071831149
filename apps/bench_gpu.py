"""GPU benchmark: ours vs fbgemm DEVICE and MANAGED_CACHING on a stream of new Zipf(1.09) batches (needs CUDA
and fbgemm-gpu)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from torchrec_hps.bench import save_json


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python -m apps.bench_gpu --rows 4000000")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=4_000_000, help="rows per table")
    p.add_argument("--budget", type=float, default=0.1, help="HBM budget of the caches, as a share of the rows")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=30, help="timed batches per shape, each new")
    p.add_argument("--warmup", type=int, default=20, help="untimed batches per shape before them")
    p.add_argument("--json", default="results/bench_gpu.json")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our budget variant per shape")
    p.add_argument("--admission", default="always",
                   help="HBM admission policies of the budget variants, comma-separated (always, second_access, never)")
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu"], help="eviction policy of the budget variants")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available here; run it on a GPU machine", file=sys.stderr)
        return 2
    from torchrec_hps.bench.gpu_bench import run_gpu_bench

    results = run_gpu_bench(num_tables=args.tables, rows=args.rows, dim=args.dim, reps=args.reps,
                            warmup=args.warmup, budget=args.budget, profile=args.profile,
                            admissions=[a.strip() for a in args.admission.split(",") if a.strip()],
                            eviction=args.eviction)
    save_json(args.json, {"device": torch.cuda.get_device_name(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
