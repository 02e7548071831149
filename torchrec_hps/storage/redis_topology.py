"""Where each Redis Cluster slot lives: its primary and its replicas, read from CLUSTER SLOTS.

The Redis tier routes every command through this map. It is re-read when a node answers MOVED (resharded,
or a failover the node already knows of) and, at most once per `refresh_interval`, while a node is failing:
a dead primary's replica is promoted by the cluster within about `cluster-node-timeout` plus an election,
and the next refresh routes its slots there, so lookups come back to Redis instead of falling through to
the tier below for good. With `read_from_replicas`, gets go to a slot's replicas (in turn) unless the
replica is failing or has not acknowledged the last write to its primary (then to the primary).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Sequence, Tuple

NUM_SLOTS = 16384


def _addr(entry) -> str:
    host = entry[0].decode() if isinstance(entry[0], bytes) else entry[0]
    return f"{host}:{entry[1]}"


class ClusterTopology:
    def __init__(self, startup_nodes: Sequence[str], slots_of: Callable[[str], list], refresh_interval: float) -> None:
        """`slots_of(addr)`: CLUSTER SLOTS asked of one node (raises on failure)."""
        self._startup = list(startup_nodes)
        self._slots_of = slots_of
        self.refresh_interval = refresh_interval
        self._lock = threading.Lock()
        self.owner: List[str] = [""] * NUM_SLOTS
        self.replicas: Dict[str, Tuple[str, ...]] = {}  # primary -> its replicas
        self._stale_until: Dict[str, float] = {}  # primary -> replicas not to read until then
        self._turn = 0
        self._last_refresh = 0.0
        self.known: List[str] = []  # every node seen, primaries and replicas

    def refresh(self, prefer_last: Sequence[str] = ()) -> None:
        """Re-read the map from the first node that answers (nodes in `prefer_last`, e.g. failing ones, last)."""
        with self._lock:
            self._last_refresh = time.monotonic()
            seen = list(dict.fromkeys(self.known + self._startup))
            order = [a for a in seen if a not in prefer_last] + [a for a in seen if a in prefer_last]
            errors = []
            for addr in order:
                try:
                    slots = self._slots_of(addr)
                except Exception as e:  # the next candidate
                    errors.append(f"{addr}: {e}")
                    continue
                owner = [""] * NUM_SLOTS
                replicas: Dict[str, Tuple[str, ...]] = {}
                for start, end, primary, *rest in slots:
                    p = _addr(primary)
                    owner[start:end + 1] = [p] * (end - start + 1)
                    replicas[p] = tuple(_addr(r) for r in rest)
                self.owner, self.replicas = owner, replicas
                self.known = list(dict.fromkeys(seen + list(replicas) + [r for rs in replicas.values() for r in rs]))
                return
            from torchrec_hps.storage.interface import TierError

            raise TierError(f"redis cluster: no startup node or known node answered CLUSTER SLOTS ({'; '.join(errors)})")

    def refresh_due(self) -> bool:
        return time.monotonic() - self._last_refresh >= self.refresh_interval

    def read_node(self, primary: str, usable: Callable[[str], bool]) -> str:
        """The node to read a primary's slots from: one of its replicas in turn, if any is usable and its
        replicas are not marked stale, else the primary."""
        if self._stale_until.get(primary, 0.0) > time.monotonic():
            return primary
        candidates = [r for r in self.replicas.get(primary, ()) if usable(r)]
        if not candidates:
            return primary
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    def mark_stale(self, primary: str, seconds: float) -> None:
        """A write to `primary` was not acknowledged by its replicas in time: read from the primary a while."""
        self._stale_until[primary] = time.monotonic() + seconds

    def replica_count(self, primary: str) -> int:
        return len(self.replicas.get(primary, ()))
