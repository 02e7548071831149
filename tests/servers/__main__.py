"""``python -m tests.servers up|down|status``: what ``make test`` calls."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from tests.servers import SERVERS, __doc__ as _doc


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=_doc.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    if args.action == "up":
        SERVERS.up()
        print(f"servers up in {time.monotonic() - t0:.1f}s: redis {SERVERS.redis_url}, "
              f"cluster {','.join(SERVERS.cluster_nodes)}, kafka {SERVERS.kafka.bootstrap}")
    elif args.action == "down":
        SERVERS.down()
        print("servers down")
    else:  # exit 1 if any is down (make bench-storage leaves running servers it did not start)
        status = SERVERS.status()
        for name, ok in status.items():
            print(f"{name}: {'up' if ok else 'DOWN'}")
        return 0 if all(status.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
