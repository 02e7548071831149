"""ids -> (host-level row, HBM row) for every id of a lookup, all tables at once: the lookup's first kernel.

Per id position p < n (ids feature-major, `ends[f]` = one past feature f's last id): find the feature,
check the id against its table's range, probe its set in the host level's index (set_index.py), and write
- `slots[p]`: the row in its table's host rows (the TBE's index; DEFAULT_SLOT on a miss or a bad id),
- `locs[p]`: its HBM row, or NO_ROW (the TBE then reads the host row in place, over PCIe),
- `entries[p]`: the index entry, or -1;
touch the entry's tick (and, once per lookup, its LFU count; the HBM row's recency is the entry's tick); append each entry touched first in this
lookup that is not in HBM (and passes the admission rule) to `cand` for hbm_level.admit; OR into `flags`
whether an id is in neither level (FLAG_MISS) or out of range (FLAG_INVALID); and count per feature: ids,
ids not served from HBM, ids in neither level, distinct hits (into `counts` [4, F], zeroed by the caller).
Where every table is held whole (direct-mapped) an id has one possible entry, so the kernel reads that one
key (`all_direct`); where besides HBM has a row for every entry nothing is ever evicted or admitted, so it
records no use (`touch=False`: no ticks, counts of first touches or candidates; the miss path counts the
distinct hits itself). On CUDA one Triton kernel; the torch version is the CPU path and the kernel's test
reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from torchrec_hps.modules.cache.layout import (ADMIT_ALWAYS, ADMIT_NEVER, ADMIT_SECOND, DEFAULT_SLOT, FLAG_INVALID,
                                               FLAG_MISS, HASH_MASK, HASH_MUL, HBM_WAYS, NO_ROW, RESERVED_SLOTS,
                                               WAYS, hbm_set_of, set_of)

try:  # Triton comes with torch on Linux; the kernel is only launched on CUDA tensors
    import triton
    import triton.language as tl

    from torchrec_hps.modules.cache.triton_util import _count, _upper_bound
except ImportError:  # pragma: no cover
    triton = None

BLOCK = 128
BLOCK_DIRECT = 512
WARPS_DIRECT = 4  # warps per program of the one-key path


@dataclass
class ProbeTables:
    """Per feature, plus one dummy entry at index F for positions past the ids (0 rows): its table's id
    bound, first set, set count and first entry; the index; and the HBM level's arrays (None without)."""

    feature_rows: torch.Tensor  # int64 [F+1]; hashed-id tables: 2^63-1
    feature_set_base: torch.Tensor  # int64 [F+1]
    feature_n_sets: torch.Tensor  # int64 [F+1]
    feature_entry_base: torch.Tensor  # int64 [F+1]
    feature_direct: torch.Tensor  # bool [F+1]: the table is direct-mapped (held whole)
    keys: torch.Tensor  # int64 [entries]
    ticks: torch.Tensor  # int32 [entries]
    freq: Optional[torch.Tensor]  # uint8 [entries], LFU only: lookups that used the entry, saturating
    hbm_way: Optional[torch.Tensor]  # int8 [entries]: the entry's way in its HBM set (hbm_level.py), or NO_WAY
    hbm_n_sets: int = 1
    hbm_direct: bool = False  # the HBM level has a row per entry (entry e in set e // HBM_WAYS)
    admission: int = ADMIT_NEVER
    all_direct: bool = False  # every table direct-mapped: the kernel reads one key per id, no set
    # record use (ticks, LFU counts, first touches, candidates): needed unless nothing is ever
    # evicted or admitted (every table held whole and an HBM row for every entry)
    touch: bool = True


@dataclass
class ProbeOut:
    slots: torch.Tensor  # int32 [bucket]
    locs: torch.Tensor  # int32 [bucket]
    entries: torch.Tensor  # int32 [bucket]
    cand: torch.Tensor  # int32 [bucket]
    cand_count: torch.Tensor  # int32 [1]
    flags: torch.Tensor  # int32 [1]
    counts: torch.Tensor  # int64 [4, F]: ids, not from HBM, in neither level, distinct hits


def _admit(old: torch.Tensor, mode: int) -> torch.Tensor:
    if mode == ADMIT_ALWAYS:
        return torch.ones_like(old, dtype=torch.bool)
    if mode == ADMIT_SECOND:
        return old > 0  # looked up in an earlier lookup since it was inserted
    return torch.zeros_like(old, dtype=torch.bool)


def probe_torch(values: torch.Tensor, scalars: torch.Tensor, ends: torch.Tensor, t: ProbeTables, out: ProbeOut) -> None:
    """Reference implementation (any device); `scalars` = [n, tick, ...]."""
    bucket = out.slots.numel()
    n, tick = int(scalars[0]), int(scalars[1])
    n_features = ends.numel()
    dev = out.slots.device
    pos = torch.arange(bucket, device=dev)
    fidx = torch.searchsorted(ends, pos, right=True)
    live = pos < n
    v = values[:bucket].to(torch.int64)
    valid = live & (v >= 0) & (v < t.feature_rows[fidx])
    safe = torch.where(valid, v, torch.zeros_like(v))
    sets = set_of(safe, t.feature_set_base[fidx], t.feature_n_sets[fidx], t.feature_direct[fidx])
    match = (t.keys.view(-1, WAYS)[sets] == safe.view(-1, 1)) & valid.view(-1, 1)
    hit = match.any(1)
    entry = torch.where(hit, sets * WAYS + match.to(torch.int8).argmax(1), torch.full_like(sets, -1))
    slot = torch.where(hit, RESERVED_SLOTS + entry - t.feature_entry_base[fidx], torch.full_like(sets, DEFAULT_SLOT))
    loc = torch.full_like(sets, NO_ROW)
    if t.hbm_way is not None:
        e = entry.clamp(min=0)
        way = torch.where(hit, t.hbm_way[e].to(torch.int64), torch.full_like(e, -1))
        loc = torch.where(way >= 0, hbm_set_of(e, t.hbm_n_sets, t.hbm_direct) * HBM_WAYS + way, loc)
    out.slots.copy_(slot.to(torch.int32))
    out.locs.copy_(loc.to(torch.int32))
    out.entries.copy_(entry.to(torch.int32))
    bits = (valid & ~hit).any().to(torch.int32) * FLAG_MISS + (live & ~valid).any().to(torch.int32) * FLAG_INVALID
    out.flags.bitwise_or_(bits.view(1))
    f = fidx.clamp(max=n_features)  # n_features: the dummy bin, dropped
    for row, mask in enumerate((live, valid & (loc < 0), valid & ~hit)):
        out.counts[row] += torch.bincount(f[mask], minlength=n_features + 1)[:n_features]
    if not t.touch:
        return
    # first touches in this lookup: distinct entries whose tick was not yet this tick
    hpos = torch.nonzero(hit).view(-1)
    he = entry[hpos]
    order = torch.argsort(he, stable=True)
    first_sorted = torch.ones_like(he, dtype=torch.bool)
    if he.numel() > 1:
        first_sorted[1:] = he[order][1:] != he[order][:-1]
    first_in = torch.empty_like(first_sorted)
    first_in[order] = first_sorted
    old = t.ticks[he].to(torch.int64)
    first = first_in & (old != tick)
    t.ticks[he] = tick
    if t.freq is not None:  # one count per lookup (its first touch), saturating at 255
        fe = he[first]
        t.freq[fe] = (t.freq[fe].to(torch.int32) + 1).clamp(max=255).to(torch.uint8)
    hl = loc[hpos]
    if t.hbm_way is not None:
        new = he[first & (hl < 0) & _admit(old, t.admission)].to(torch.int32)
        c0 = int(out.cand_count[0])
        out.cand[c0:c0 + new.numel()] = new
        out.cand_count += new.numel()
    out.counts[3] += torch.bincount(f[hpos[first]], minlength=n_features + 1)[:n_features]


if triton is not None:
    # Triton kernels read module globals only as constexprs
    _RESERVED, _DEFAULT, _NO_ROW = tl.constexpr(RESERVED_SLOTS), tl.constexpr(DEFAULT_SLOT), tl.constexpr(NO_ROW)
    _MISS, _INVALID = tl.constexpr(FLAG_MISS), tl.constexpr(FLAG_INVALID)
    _MUL, _MASK = tl.constexpr(HASH_MUL), tl.constexpr(HASH_MASK)

    @triton.jit
    def _probe_kernel(values_ptr, scalars_ptr, ends_ptr, n_features, rows_ptr, set_base_ptr, n_sets_ptr,
                      entry_base_ptr, direct_ptr, keys_ptr, ticks_ptr, freq_ptr, hbm_way_ptr, hbm_n_sets, slots_ptr,
                      locs_ptr, entries_ptr, cand_ptr, cand_count_ptr, flags_ptr, counts_ptr, bucket,
                      SEARCH_STEPS: tl.constexpr, LFU: tl.constexpr, HBM: tl.constexpr, ADMIT: tl.constexpr,
                      ALL_DIRECT: tl.constexpr, TOUCH: tl.constexpr, HBM_DIRECT: tl.constexpr, W: tl.constexpr,
                      HW: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        pos = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bucket = pos < bucket
        n = tl.load(scalars_ptr)
        tick = tl.load(scalars_ptr + 1).to(tl.int32)
        fidx = _upper_bound(pos, ends_ptr, n_features, SEARCH_STEPS, BLOCK_SIZE)
        live = pos < n
        v = tl.load(values_ptr + pos, mask=live, other=0).to(tl.int64)
        rows = tl.load(rows_ptr + fidx, mask=in_bucket, other=0)
        valid = live & (v >= 0) & (v < rows)
        safe = tl.where(valid, v, 0)
        if ALL_DIRECT:  # id k of a direct-mapped table is entry set_base * W + k (set k // W, way k % W)
            at = tl.load(set_base_ptr + fidx, mask=in_bucket, other=0) * W + safe
            if HBM and HBM_DIRECT:
                # HBM row e copies entry e, and only a held entry has one: the entry's one-byte way (an
                # array that stays in L2) answers for both levels; the key is read only where it is -1
                in_hbm = valid & (tl.load(hbm_way_ptr + at, mask=valid, other=-1) >= 0)
                hit = in_hbm | (valid & (tl.load(keys_ptr + at, mask=valid & (~in_hbm), other=-1) == safe))
            else:
                hit = valid & (tl.load(keys_ptr + at, mask=valid, other=-1) == safe)
            entry = tl.where(hit, at, -1)
        else:
            h = (safe ^ (safe >> 31)) * _MUL
            h = (h ^ (h >> 29)) & _MASK
            direct = tl.load(direct_ptr + fidx, mask=in_bucket, other=0) != 0
            h = tl.where(direct, safe // W, h)
            n_sets = tl.load(n_sets_ptr + fidx, mask=in_bucket, other=1)
            sets = tl.load(set_base_ptr + fidx, mask=in_bucket, other=0) + h % n_sets
            ways = tl.arange(0, W)
            # a direct-mapped table keeps id k in way k % W: read that one key, not the whole set
            lanes = valid[:, None] & ((~direct)[:, None] | (ways[None, :] == (safe % W)[:, None]))
            keys = tl.load(keys_ptr + sets[:, None] * W + ways[None, :], mask=lanes, other=-1)
            match = (keys == safe[:, None]) & valid[:, None]
            way = tl.max(tl.where(match, ways[None, :], -1), axis=1)
            hit = way >= 0
            entry = tl.where(hit, sets * W + way, -1)
        slot = tl.where(hit, _RESERVED + entry - tl.load(entry_base_ptr + fidx, mask=in_bucket, other=0),
                        _DEFAULT)
        loc = tl.full([BLOCK_SIZE], _NO_ROW, tl.int32)
        if HBM and ALL_DIRECT and HBM_DIRECT:
            loc = tl.where(in_hbm, entry, _NO_ROW).to(tl.int32)
        elif HBM:
            way = tl.load(hbm_way_ptr + entry, mask=hit, other=-1).to(tl.int64)
            if HBM_DIRECT:  # entry e in way e % HW of set e // HW: row e
                loc = tl.where(way >= 0, entry, _NO_ROW).to(tl.int32)
            else:
                he = (entry ^ (entry >> 31)) * _MUL
                hset = ((he ^ (he >> 29)) & _MASK) % hbm_n_sets
                loc = tl.where(way >= 0, hset * HW + way, _NO_ROW).to(tl.int32)
        if TOUCH:
            # read first (hot ids repeat within a lookup), exchange only where the tick changes; the
            # exchange says which position touched the entry first in this lookup
            seen = tl.load(ticks_ptr + entry, mask=hit, other=0)
            need = hit & (seen != tick)
            old = tl.atomic_xchg(ticks_ptr + entry, tl.full([BLOCK_SIZE], 0, tl.int32) + tick, mask=need)
            first = need & (old != tick)
        if TOUCH and LFU:  # only the first touch counts: one writer per entry, so a plain byte store
            count = tl.load(freq_ptr + entry, mask=first, other=0).to(tl.int32)
            tl.store(freq_ptr + entry, tl.minimum(count + 1, 255).to(tl.uint8), mask=first)
        if TOUCH and HBM:
            if ADMIT == 1:
                is_cand = first & (loc < 0)
            elif ADMIT == 2:
                is_cand = first & (loc < 0) & (old > 0)
            else:
                is_cand = first & (loc < 0) & (old != old)
            n_cand = tl.sum(is_cand.to(tl.int32), axis=0)
            at = tl.atomic_add(cand_count_ptr, n_cand, mask=n_cand > 0)
            offs = at + tl.cumsum(is_cand.to(tl.int32), axis=0) - 1
            tl.store(cand_ptr + offs, entry.to(tl.int32), mask=is_cand)
        tl.store(slots_ptr + pos, slot.to(tl.int32), mask=in_bucket)
        tl.store(locs_ptr + pos, loc, mask=in_bucket)
        tl.store(entries_ptr + pos, entry.to(tl.int32), mask=in_bucket)
        bits = tl.max((valid & (~hit)).to(tl.int32), axis=0) * _MISS + \
            tl.max((live & (~valid)).to(tl.int32), axis=0) * _INVALID
        tl.atomic_or(flags_ptr, bits, mask=bits != 0)
        _count(counts_ptr, fidx, live, n_features)
        _count(counts_ptr + n_features, fidx, valid & (loc < 0), n_features)
        _count(counts_ptr + 2 * n_features, fidx, valid & (~hit), n_features)
        if TOUCH:
            _count(counts_ptr + 3 * n_features, fidx, first, n_features)


def probe(values: torch.Tensor, scalars: torch.Tensor, ends: torch.Tensor, t: ProbeTables, out: ProbeOut) -> None:
    """As probe_torch; one kernel launch on CUDA (values int32 or int64, at least bucket long)."""
    if triton is None or not values.is_cuda:
        probe_torch(values, scalars, ends, t, out)
        return
    launch_probe(values, scalars, ends, t, out)


def launch_probe(values, scalars, ends, t: ProbeTables, out: ProbeOut) -> None:
    bucket = out.slots.numel()
    n_features = ends.numel()
    hbm = t.hbm_way is not None
    # the one-key path keeps little per id: wider programs, fewer of the per-program counter atomics
    block = BLOCK_DIRECT if t.all_direct else BLOCK
    _probe_kernel[(triton.cdiv(bucket, block),)](
        values, scalars, ends, n_features, t.feature_rows, t.feature_set_base, t.feature_n_sets,
        t.feature_entry_base, t.feature_direct, t.keys, t.ticks, t.freq if t.freq is not None else t.ticks,
        t.hbm_way if hbm else t.ticks, t.hbm_n_sets, out.slots, out.locs, out.entries,
        out.cand, out.cand_count, out.flags, out.counts, bucket,
        SEARCH_STEPS=max(1, int(n_features).bit_length() + 1), LFU=t.freq is not None, HBM=hbm, ADMIT=t.admission,
        ALL_DIRECT=t.all_direct, TOUCH=t.touch, HBM_DIRECT=t.hbm_direct, W=WAYS, HW=HBM_WAYS, BLOCK_SIZE=block,
        num_warps=WARPS_DIRECT if t.all_direct else 4)
