"""Values the cache's kernels and its Python side share: the set layout, slot codes, flags and the hash.

Both levels are set-associative: an id of table t lives in one set of t's range of sets (chosen by a hash
of the id, or id // WAYS where the level holds the whole table), in any of its ways. So the index costs a fixed amount per cached row whatever the id space
(ids may be raw 64-bit hashes), and a lookup reads one set, not a per-row map.
"""
from __future__ import annotations

import torch

WAYS = 16  # ways per set of the host level's index: 16 int64 keys = one 128-byte line per probe
HBM_WAYS = 16  # ways per set of the HBM level (tags are host-level entries)
NO_WAY = -1  # a host entry without an HBM row (its int8 way code)
EMPTY_KEY = -1  # a free way of the host index (ids are >= 0)
NO_ROW = -1  # "not in HBM": fbgemm's TBE then reads the row from the host level (kCacheLocationMissing)
DEFAULT_SLOT = 0  # host-level row 0 of every table holds the default vector (misses, bad ids, padding)
RESERVED_SLOTS = 1
MAX_TICK = 1 << 30  # ticks are int32; past this they are rebased (LRU order is kept)

# bits of the lookup's flags word
FLAG_MISS = 1  # an id is in neither level
FLAG_INVALID = 2  # an id is out of its table's range
FLAG_LAYOUT = 4  # lengths and ids disagree (or a negative length)

# admission into HBM of rows that the host level holds
ADMIT_NEVER, ADMIT_ALWAYS, ADMIT_SECOND = 0, 1, 2
ADMISSION = {"never": ADMIT_NEVER, "always": ADMIT_ALWAYS, "second_access": ADMIT_SECOND}

HASH_MUL = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing)
HASH_MASK = (1 << 62) - 1


def mix64(ids: torch.Tensor) -> torch.Tensor:
    """A non-negative 62-bit hash of int64 ids; the Triton kernels compute the same bits."""
    h = ids.to(torch.int64)
    h = (h ^ (h >> 31)) * HASH_MUL
    return (h ^ (h >> 29)) & HASH_MASK


def set_of(ids: torch.Tensor, set_base: torch.Tensor, n_sets: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """The set of each id, given its table's first set, set count and whether it is direct-mapped (tensors
    aligned with ids). A table the level holds whole is direct-mapped: id k goes to set k // WAYS, so every
    id has a way and no set ever overflows; other tables hash."""
    return set_base + torch.where(direct, ids // WAYS, mix64(ids)) % n_sets


def hbm_set_of(entries: torch.Tensor, n_sets: int, direct: bool) -> torch.Tensor:
    """The HBM set of host entries: fixed by the entry, so an entry's HBM row is found from its way alone
    (one byte per entry). An HBM level with a row per entry maps entry e to set e // HBM_WAYS; others hash."""
    e = entries.to(torch.int64)
    return (e // HBM_WAYS if direct else mix64(e)) % n_sets
