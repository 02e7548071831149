"""Serving benchmark: `python -m apps.bench_serving [--gpu-workers N] [--json out.json]` (see
torchrec_hps/bench/serving_bench.py for what is measured)."""
from __future__ import annotations

import argparse
import json

import torchrec_hps  # noqa: F401  (loads fbgemm quietly before torchrec)
from torchrec_hps.bench.serving_bench import run_serving_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cache-ratio", type=float, default=0.1)
    p.add_argument("--gpu-workers", type=int, default=0)
    p.add_argument("--cpu-workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load probe")
    p.add_argument("--max-qps", type=float, default=400.0, help="the top of the QPS search")
    p.add_argument("--p99-targets", default="20,50", help="ms, comma-separated")
    p.add_argument("--batch-sizes", default="32,64,128,256,512,1024,2048", help="the static sweep's batch sizes")
    p.add_argument("--thresholds", default="1,64,256", help="the static sweep's offload thresholds (GPU workers)")
    p.add_argument("--tune-seconds", type=float, default=15.0, help="unmeasured load per probe, tuner on")
    p.add_argument("--size-mean", type=float, default=270.0, help="mean samples per query (lognormal, max 700)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    out = run_serving_bench(tables=a.tables, rows=a.rows, dim=a.dim, cache_ratio=a.cache_ratio,
                            gpu_workers=a.gpu_workers, cpu_workers=a.cpu_workers, duration=a.duration,
                            max_qps=a.max_qps, p99_targets=[float(x) for x in a.p99_targets.split(",")],
                            batch_sizes=[int(x) for x in a.batch_sizes.split(",")],
                            thresholds=[int(x) for x in a.thresholds.split(",")], tune_s=a.tune_seconds,
                            size_mean=a.size_mean)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
