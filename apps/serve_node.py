"""Inference node process: `python -m apps.serve_node --config hps.yaml --duration 30` (see torchrec_hps.nodes)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from torchrec_hps.config_file import load_config
from torchrec_hps.nodes import run_inference_node


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of serving")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--group-id", help="Kafka consumer group (one per node for node-local tiers)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--stop-file", help="stop serving (then drain and exit) once this file exists")
    args = p.parse_args(argv)
    run_inference_node(load_config(args.config), args.duration, batch_size=args.batch_size, group_id=args.group_id,
                       metrics_port=args.metrics_port, stop_file=args.stop_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
