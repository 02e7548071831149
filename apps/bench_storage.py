"""Storage benchmark entry point: `python -m apps.bench_storage` (servers from `make servers-up`)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from typing import List, Optional

from torchrec_hps.bench.storage_bench import results_json, results_table, run_storage_bench


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python -m apps.bench_storage --rows 200000 "
                                "--tiers memory rocksdb --json results/storage.json")
    p.add_argument("--rows", type=int, default=500_000, help="rows in the benchmark table (default 500000)")
    p.add_argument("--dim", type=int, default=128, help="embedding dim; 128 fp32 = 512-byte rows")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--tiers", nargs="+", default=["memory", "redis", "redis_cluster", "rocksdb"])
    p.add_argument("--redis-url", default="redis://127.0.0.1:16379")
    p.add_argument("--cluster-nodes", nargs="+", default=["127.0.0.1:17001", "127.0.0.1:17002", "127.0.0.1:17003"])
    p.add_argument("--rocksdb-path", default=None, help="folder for the RocksDB tier (default: a temp folder)")
    p.add_argument("--alpha", type=float, default=1.09, help="Zipf exponent of the keys")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    p.add_argument("--json", default="results/bench_storage.json", help="where to write the results")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_storage_bench(
            num_rows=args.rows, dim=args.dim, batches=args.batches, tiers=args.tiers, redis_url=args.redis_url,
            cluster_nodes=args.cluster_nodes, rocksdb_path=args.rocksdb_path or os.path.join(tmp, "rocksdb"),
            alpha=args.alpha, min_seconds=args.seconds)
    print(results_table(results))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            f.write(results_json(results, rows=args.rows, dim=args.dim, alpha=args.alpha, cpus=os.cpu_count(),
                                 machine=platform.machine(), python=platform.python_version()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
