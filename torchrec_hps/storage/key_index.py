"""The memory tier's key -> slot index, sized by the rows it caches, not by the table's id space.

`KeyIndex`: an open-addressing hash table (linear probing, tombstones), 12 bytes per entry at 2-4 entries
per slot: 24-48 bytes per cached row (a 500M-row table with a 100K-row tier: 3 MB, not the 2 GB a dense map
took). Every operation is
batched and vectorized: each probe round advances all unresolved keys at once (numpy), so a batch costs a
few rounds, never a per-key loop. One per partition: its writer (under the partition's lock) is its only
writer. `DenseIndex` (one gather per lookup) where the id space is at most 4 rows per cached row."""
from __future__ import annotations

import numpy as np

EMPTY = -1
TOMBSTONE = -2  # a removed entry: lookups probe past it, inserts reuse it
_MUL = np.uint64(0x9E3779B97F4A7C15)
_MAX_LOAD = 0.7  # live entries + tombstones above this share of the table: rebuild


class KeyIndex:
    def __init__(self, slots: int) -> None:
        """An index for at most `slots` keys (ids >= 0)."""
        self._bits = max(4, int(np.ceil(np.log2(max(2 * slots, 16)))))
        self._alloc(1 << self._bits)
        self._limit = slots

    def _alloc(self, size: int) -> None:
        self.keys = np.full(size, EMPTY, dtype=np.int64)
        self.slots = np.full(size, -1, dtype=np.int32)
        self._mask = np.uint64(size - 1)
        self._shift = np.uint64(64 - int(np.log2(size)))
        self._used = 0  # live entries + tombstones

    def nbytes(self) -> int:
        return self.keys.nbytes + self.slots.nbytes

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * _MUL) >> self._shift).astype(np.int64)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Where each key sits (-1: absent)."""
        n = len(keys)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return out
        pos = self._home(keys)
        pending = np.arange(n)
        mask = int(self._mask)
        for _ in range(len(self.keys)):
            found = self.keys[pos]
            hit = found == keys[pending]
            out[pending[hit]] = pos[hit]
            more = ~(hit | (found == EMPTY))
            if not more.any():
                break
            pending, pos = pending[more], (pos[more] + 1) & mask
        return out

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key (-1: absent)."""
        pos = self._positions(keys)
        out = np.full(len(keys), -1, dtype=np.int32)
        held = pos >= 0
        out[held] = self.slots[pos[held]]
        return out

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Index distinct keys that are absent."""
        if len(keys) == 0:
            return
        if self._used + len(keys) > _MAX_LOAD * len(self.keys):
            self._rebuild(extra=len(keys))
        pos = self._home(keys)
        pending = np.arange(len(keys))
        mask = int(self._mask)
        while len(pending):
            p = pos[pending]
            free = self.keys[p] < 0  # empty or a tombstone
            took = np.zeros(len(pending), dtype=bool)
            if free.any():
                cand = np.flatnonzero(free)
                claimed, first = np.unique(p[cand], return_index=True)  # one key per free position a round
                winners = cand[first]
                self._used += int((self.keys[claimed] == EMPTY).sum())
                self.keys[claimed] = keys[pending[winners]]
                self.slots[claimed] = slots[pending[winners]]
                took[winners] = True
            pending = pending[~took]
            pos[pending] = (pos[pending] + 1) & mask

    def remove(self, keys: np.ndarray) -> None:
        pos = self._positions(keys)
        pos = pos[pos >= 0]
        self.keys[pos] = TOMBSTONE
        self.slots[pos] = -1

    def _rebuild(self, extra: int) -> None:
        live = self.keys >= 0
        keys, slots = self.keys[live], self.slots[live]
        size = len(self.keys)
        while (len(keys) + extra) > _MAX_LOAD * size / 1.5:  # grow only if live entries need it
            size *= 2
        self._alloc(size)
        self.insert(keys, slots)


class DenseIndex:
    """A dense key -> slot map for tables whose id space is small next to the rows cached (at most
    DENSE_ROWS_PER_SLOT table rows per slot: 4 bytes a row stays within 16 bytes per cached row). One gather
    per lookup, no probing. Shared by a table's partitions: each key's cell has one writer, its partition's."""

    def __init__(self, num_rows: int) -> None:
        self.map = np.full(num_rows, -1, dtype=np.int32)

    def nbytes(self) -> int:
        return self.map.nbytes

    def get(self, keys: np.ndarray) -> np.ndarray:
        return self.map[keys]

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        self.map[keys] = slots

    def remove(self, keys: np.ndarray) -> None:
        self.map[keys] = -1


DENSE_ROWS_PER_SLOT = 4
