"""Chaos soak against the test harness's real servers (tests/chaos.py): `python -m apps.chaos_soak --seconds 600`.
Starts the servers if needed; prints the table of faults injected vs survived and the checks; exit 1 on any
failed lookup, wrong or too-stale row, or lost update."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--staleness", type=float, default=30.0, help="bound on a served row's age (seconds)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.staleness <= 0:
        p.error("--seconds and --staleness must be > 0")
    from tests.chaos import run_soak
    from tests.servers import SERVERS

    SERVERS.up(take_over=False)
    report = run_soak(args.seconds, seed=args.seed, staleness_s=args.staleness)
    print(report.table())
    for e in report.errors[:20]:
        print("error:", e)
    bad = report.failed_lookups + report.wrong_rows + report.stale_rows + report.lost_updates
    return 1 if bad or report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
