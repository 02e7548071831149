"""`torchrec-hps` command line: thin entry points over the package."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    import torchrec_hps
    from torchrec_hps.demo import run_demo

    torchrec_hps.check_environment(verbose=True)
    result = run_demo(batches=args.batches, batch_size=args.batch_size, cache_ratio=args.cache_ratio)
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec-hps", description="Hierarchical parameter server for TorchRec.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded demo (no server needed)",
                          description="Swap a small DLRM onto the parameter server (memory + local RocksDB), serve "
                                      "Zipf ids through a small cache, print hit rates and check equality.",
                          epilog="example: torchrec-hps demo --batches 20 --cache-ratio 0.01")
    demo.add_argument("--batches", type=int, default=40)
    demo.add_argument("--batch-size", type=int, default=512)
    demo.add_argument("--cache-ratio", type=float, default=0.05, help="share of each table the cache holds")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
