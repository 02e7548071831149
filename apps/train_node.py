"""Trainer process: `python -m apps.train_node --config hps.yaml --steps 100` (see torchrec_hps.nodes)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from torchrec_hps.config_file import load_config
from torchrec_hps.nodes import run_trainer


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--checkpoint", help="start from this state dict")
    p.add_argument("--save", help="write the final state dict here")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    run_trainer(load_config(args.config), args.steps, checkpoint=args.checkpoint, save=args.save,
                batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
