"""The HBM level: a pool of rows in device memory over the host level, filled from it by kernels.

Rows of every table share one pool (fbgemm's `lxu_cache_weights` layout: one row per slot, as wide as the
widest table's row). The pool is set-associative over host-level entries, and an entry's HBM set is fixed
by the entry (`hbm_set_of`), so the entry needs only its way: `way_of_host[e]` (int8, NO_WAY if none) and
`tags[r]` is the host entry that HBM row r copies (-1 free). A row's recency is its entry's tick in the
host index (every lookup that reads the row touches the entry), so the level keeps no ticks of its own:
5 bytes per host entry and HBM row together at a 1:4 ratio, against 12 before. One probe of the host index
gives both levels. The HBM level is inclusive: an entry the host level drops is dropped here too (`drop`).

Admission runs on the device with no host sync, over the candidates the probe appended (entries touched
first in this lookup, not in HBM): `select` ranks each candidate within its HBM set and picks the set's
k-th least recently used way not used by this lookup; `apply` evicts the way's old entry, copies the row
from host-mapped memory (zero-copy over PCIe) and gives the entry its way; `relocate` points the lookup's
positions at the rows just admitted (a binary search of the sorted candidates), so the TBE reads them from
HBM. Candidates are sorted first: host rows in address order cross PCIe faster (and admission in probe
order gave wrong rows in one GPU test, fp16 with host-level misses, whose cause is not found yet; sorted,
it passes). A candidate left without a way (every way of its set used by this lookup) is copied into a
staging row for this lookup only (no entry points at it: only this lookup's positions, through relocate),
so each row crosses PCIe once per lookup however often the lookup repeats it; past the staging rows, the
TBE reads it from the host level in place.
The torch versions are the reference and the CPU path (tests build an HBM level in host memory).
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch

from torchrec_hps.modules.cache.layout import HASH_MASK, HASH_MUL, HBM_WAYS, NO_WAY, RESERVED_SLOTS, hbm_set_of
from torchrec_hps.modules.cache.set_index import _NEVER, pick_ways

try:
    import triton
    import triton.language as tl

    from torchrec_hps.modules.cache.triton_util import _upper_bound
except ImportError:  # pragma: no cover
    triton = None

BLOCK = 64  # candidates per program of the select kernel
COPY_BLOCK = 16  # per program of the apply kernel: more programs keep more PCIe reads in flight
CAND_PAD = (1 << 31) - 1  # the candidate buffer's tail: sorts after every entry


@dataclass
class HostRowLayout:
    """Where the host level's rows are, as the admission kernels read them (int32 words)."""

    words: torch.Tensor  # int32 view of every table's host rows, device-accessible (host-mapped on CUDA)
    entry_base: torch.Tensor  # int64 [T]: first index entry of each table
    word_offset: torch.Tensor  # int64 [T]: first word of each table's rows
    row_words: torch.Tensor  # int64 [T]: words per row (padded)
    max_row_words: int


class HBMLevel:
    def __init__(self, n_rows: int, row_bytes: int, host_ticks: torch.Tensor, device: torch.device) -> None:
        """`host_ticks`: the host index's ticks (one per entry), which order this level's evictions too."""
        num_entries = host_ticks.numel()
        # as many rows as host entries: direct-mapped (entry e -> set e // ways), so every entry has a row
        self.direct = n_rows >= num_entries
        assert num_entries % HBM_WAYS == 0, "host entries come in whole sets of the HBM level's ways"
        self.n_sets = max(1, -(-int(min(n_rows, num_entries)) // HBM_WAYS))
        self.capacity = self.n_sets * HBM_WAYS
        self.device = device
        self.n_staging = 0 if self.direct else min(max(self.capacity // 2, 4096), 1 << 20)
        self.rows = torch.zeros(self.capacity + self.n_staging, row_bytes, dtype=torch.uint8, device=device)
        self.stage_count = torch.zeros(1, dtype=torch.int32, device=device)
        self.row_words = self.rows.view(torch.int32)
        self.tags = torch.full((self.capacity,), -1, dtype=torch.int32, device=device)
        self.host_ticks = host_ticks
        self.way_of_host = torch.full((num_entries,), NO_WAY, dtype=torch.int8, device=device)
        self.set_fill = torch.zeros(self.n_sets, dtype=torch.int32, device=device)

    def index_bytes(self) -> int:
        """Bytes of bookkeeping: per HBM row its tag, per host entry its way, per set a fill counter."""
        return 4 * self.capacity + self.way_of_host.numel() + 4 * self.n_sets

    def set_of(self, entries: torch.Tensor) -> torch.Tensor:
        return hbm_set_of(entries, self.n_sets, self.direct)

    def rows_of(self, entries: torch.Tensor) -> torch.Tensor:
        """The HBM rows of host entries (int64, -1 where none)."""
        way = self.way_of_host[entries].to(torch.int64)
        return torch.where(way >= 0, self.set_of(entries) * HBM_WAYS + way, torch.full_like(way, -1))

    # ---- admission (inside the lookup, on the device) ----
    def admit(self, cand: torch.Tensor, cand_count: torch.Tensor, victims: torch.Tensor, scalars: torch.Tensor,
              host: HostRowLayout, entries: torch.Tensor, locs: torch.Tensor, sort_idx: torch.Tensor,
              copy_programs: Optional[int] = None, copy_block: int = 0) -> None:
        """Admit the candidates (their tail past cand_count holds CAND_PAD), then point `locs` (the lookup's
        HBM rows) at what was admitted or staged. `sort_idx` (int64, as many as cand) takes the sort's
        unused indices: the caller's own buffer, as a captured graph writes it on every replay (a scratch
        shared by shapes and regrown for a larger one was freed under the older graphs: use after free).
        `copy_programs` bounds the copy kernel's grid (a prefetch leaves the other SMs to the caller's dense
        layers running beside it)."""
        torch.sort(cand, out=(cand, sort_idx))
        if triton is None or not cand.is_cuda:
            self._admit_torch(cand, int(cand_count[0]), victims, int(scalars[1]), host, stage=True)
        else:
            self.set_fill.zero_()
            self.stage_count.zero_()
            grid = (triton.cdiv(cand.numel(), BLOCK),)
            _select_kernel[grid](cand, cand_count, scalars, self.set_fill, self.tags, self.host_ticks, victims,
                                 self.n_sets, self.stage_count, self.capacity, self.n_staging, DIRECT=self.direct,
                                 W=HBM_WAYS, BLOCK_SIZE=BLOCK)
            n_tables = host.entry_base.numel()
            block = copy_block or COPY_BLOCK
            blocks = triton.cdiv(cand.numel(), block)
            programs = min(blocks, copy_programs or blocks)
            _apply_kernel[(programs,)](cand, cand_count, victims, self.tags, self.way_of_host,
                                self.capacity, host.words, host.entry_base, host.word_offset, host.row_words, n_tables,
                                self.row_words, self.row_words.shape[1], triton.cdiv(blocks, programs),
                                SEARCH_STEPS=max(1, n_tables.bit_length() + 1),
                                MAX_WORDS=triton.next_power_of_2(host.max_row_words), W=HBM_WAYS, BLOCK_SIZE=block)
        relocate(entries, locs, cand, cand_count, victims)

    def _admit_torch(self, cand: torch.Tensor, count: int, victims: torch.Tensor, tick: int,
                     host: HostRowLayout, stage: bool = False) -> None:
        e = cand[:count].to(torch.int64)
        if count == 0:
            return
        hs = self.set_of(e)
        base = (hs * HBM_WAYS).view(-1, 1) + torch.arange(HBM_WAYS, device=e.device).view(1, -1)
        tags = self.tags[base].to(torch.int64)
        occupied = tags >= 0
        ticks = self.host_ticks[tags.clamp(min=0)].to(torch.int64).abs()
        score = torch.where(occupied, ticks, torch.full_like(ticks, -1))
        score = torch.where(occupied & (ticks == tick), torch.full_like(ticks, _NEVER), score)
        # with a row per entry, entry e takes way e % HBM_WAYS of set e // HBM_WAYS (no other entry maps
        # there), so its row is e: the probe finds it from the way's presence alone
        way = e % HBM_WAYS if self.direct else pick_ways(hs, score)
        chosen = torch.where(way >= 0, hs * HBM_WAYS + way, torch.full_like(way, -1))
        if stage and self.n_staging:  # the first n_staging left without a way, in candidate order
            left = way < 0
            slot = torch.cumsum(left.to(torch.int64), 0) - 1
            chosen = torch.where(left & (slot < self.n_staging), self.capacity + slot, chosen)
        victims[:count] = chosen.to(torch.int32)
        staged = chosen >= self.capacity
        self._copy_rows(chosen[staged], e[staged], host)  # no pointer: this lookup reaches them by relocate
        ok = way >= 0
        rows, e = (hs * HBM_WAYS + way)[ok], e[ok]
        old = self.tags[rows].to(torch.int64)
        self.way_of_host[old[old >= 0]] = NO_WAY
        self.tags[rows] = e.to(torch.int32)
        self._copy_rows(rows, e, host)
        self.way_of_host[e] = way[ok].to(torch.int8)

    def fill(self, entries: torch.Tensor, tick: int, host: HostRowLayout) -> None:
        """Admit host entries from the host side (prefill), by the same rule as a lookup's admission."""
        entries = entries[self.way_of_host[entries] < 0].to(torch.int32)
        for lo in range(0, entries.numel(), 1 << 20):
            part = entries[lo:lo + (1 << 20)]
            self._admit_torch(part, part.numel(), torch.empty_like(part), tick, host)

    def _copy_rows(self, rows: torch.Tensor, entries: torch.Tensor, host: HostRowLayout) -> None:
        table = torch.searchsorted(host.entry_base, entries, right=True) - 1
        start = host.word_offset[table] + (RESERVED_SLOTS + entries - host.entry_base[table]) * host.row_words[table]
        w = torch.arange(host.max_row_words, device=rows.device).view(1, -1)
        inside = w < host.row_words[table].view(-1, 1)
        src = torch.where(inside, start.view(-1, 1) + w, torch.zeros_like(w))
        data = host.words[src.to(host.words.device)].to(rows.device)
        cur = self.row_words[rows, :host.max_row_words]
        self.row_words[rows, :host.max_row_words] = torch.where(inside, data, cur)

    # ---- the host side (miss path, updates) ----
    def drop(self, entries: torch.Tensor) -> None:
        """Host entries that left the host level (evicted or invalidated): free their HBM rows."""
        if entries.numel() == 0:
            return
        rows = self.rows_of(entries)
        self.tags[rows[rows >= 0]] = -1
        self.way_of_host[entries] = NO_WAY

    def refresh(self, entries: torch.Tensor, host: HostRowLayout) -> None:
        """Re-copy the HBM rows of host entries whose host rows were rewritten (updates, refresh)."""
        if entries.numel() == 0:
            return
        rows = self.rows_of(entries)
        held = rows >= 0
        if bool(held.any()):
            self._copy_rows(rows[held], entries[held], host)


def relocate(entries: torch.Tensor, locs: torch.Tensor, cand: torch.Tensor, cand_count: torch.Tensor,
             victims: torch.Tensor) -> None:
    """locs[p] = the row admitted or staged for entries[p] where the probe found none in HBM: the victim of
    its candidate, found by binary search in the sorted candidates (unchanged where it was no candidate)."""
    if triton is None or not locs.is_cuda:
        c = int(cand_count[0])
        if c == 0:
            return
        sorted_cand = cand[:c].to(torch.int64)
        e = entries.to(torch.int64)
        at = torch.searchsorted(sorted_cand, e).clamp(max=c - 1)
        found = (e >= 0) & (locs < 0) & (sorted_cand[at] == e)
        locs.copy_(torch.where(found, victims[at], locs))
        return
    _relocate_kernel[(triton.cdiv(locs.numel(), 1024),)](entries, locs, cand, cand_count, victims, locs.numel(),
                                                         max(1, cand.numel().bit_length()), BLOCK_SIZE=1024)


if triton is not None:
    _RESERVED, _NO_WAY_C = tl.constexpr(RESERVED_SLOTS), tl.constexpr(NO_WAY)
    _MUL, _MASK, _NEVER_C = tl.constexpr(HASH_MUL), tl.constexpr(HASH_MASK), tl.constexpr(_NEVER)

    @triton.jit
    def _select_kernel(cand_ptr, cand_count_ptr, scalars_ptr, set_fill_ptr, tags_ptr, host_ticks_ptr, victims_ptr,
                       n_sets, stage_count_ptr, capacity, n_staging, DIRECT: tl.constexpr, W: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
        c = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = c < tl.load(cand_count_ptr)
        if tl.max(valid.to(tl.int32), axis=0) == 0:
            return
        tick = tl.load(scalars_ptr + 1)
        e = tl.load(cand_ptr + c, mask=valid, other=0).to(tl.int64)
        if DIRECT:
            hs = (e // W) % n_sets
        else:
            h = (e ^ (e >> 31)) * _MUL
            h = (h ^ (h >> 29)) & _MASK
            hs = h % n_sets
        rank = tl.atomic_add(set_fill_ptr + hs, tl.full([BLOCK_SIZE], 1, tl.int32), mask=valid)
        ways = tl.arange(0, W)
        at = hs[:, None] * W + ways[None, :]
        tags = tl.load(tags_ptr + at, mask=valid[:, None], other=-1)
        occupied = tags >= 0
        # a row's recency is its entry's tick (negative: inserted, not looked up since)
        ticks = tl.abs(tl.load(host_ticks_ptr + tags, mask=occupied, other=0)).to(tl.int64)
        score = tl.where(occupied, ticks, -1)
        score = tl.where(occupied & (ticks == tick), _NEVER_C, score)
        # each way's position in the set's eviction order (ties by way index, as a stable sort)
        s_i = score[:, :, None]
        s_j = score[:, None, :]
        earlier = (s_j < s_i) | ((s_j == s_i) & (ways[None, None, :] < ways[None, :, None]))
        order = tl.sum(earlier.to(tl.int32), axis=2)
        pick = (order == rank[:, None]) & (score != _NEVER_C)
        way = tl.max(tl.where(pick, ways[None, :], -1), axis=1)
        if DIRECT:  # a row per entry: entry e's own way (see _admit_torch)
            way = e % W
        victim = tl.where(way >= 0, hs * W + way, -1)
        left = valid & (way < 0)
        n_left = tl.sum(left.to(tl.int32), axis=0)
        at = tl.atomic_add(stage_count_ptr, n_left, mask=n_left > 0)
        slot = at + tl.cumsum(left.to(tl.int32), axis=0) - 1
        victim = tl.where(left & (slot < n_staging), capacity + slot, victim)
        tl.store(victims_ptr + c, victim.to(tl.int32), mask=valid)

    # `iters` is a runtime value, not specialized: as a constant it compiled a kernel for every candidate
    # buffer size a bounded (prefetch) grid met, each compile holding the serving queue for a second
    @triton.jit(do_not_specialize=["iters"])
    def _apply_kernel(cand_ptr, cand_count_ptr, victims_ptr, tags_ptr, way_ptr, capacity, host_words_ptr,
                      entry_base_ptr, word_offset_ptr, row_words_ptr, n_tables, hbm_words_ptr, hbm_row_stride, iters,
                      SEARCH_STEPS: tl.constexpr, MAX_WORDS: tl.constexpr, W: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr):
        count = tl.load(cand_count_ptr)
        # grid-stride over the candidate buffer in `iters` rounds: a bounded grid (a prefetch's) walks every
        # candidate; rounds past the count do nothing (a while loop: Triton's interpreter runs it too)
        it = 0
        while it < iters:
            c = (it * tl.num_programs(0) + tl.program_id(0)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            if tl.max((c < count).to(tl.int32), axis=0) > 0:
                _apply_block(c, count, cand_ptr, victims_ptr, tags_ptr, way_ptr, capacity, host_words_ptr,
                             entry_base_ptr, word_offset_ptr, row_words_ptr, n_tables, hbm_words_ptr,
                             hbm_row_stride, SEARCH_STEPS, MAX_WORDS, W, BLOCK_SIZE)
            it += 1

    @triton.jit
    def _apply_block(c, count, cand_ptr, victims_ptr, tags_ptr, way_ptr, capacity, host_words_ptr, entry_base_ptr,
                     word_offset_ptr, row_words_ptr, n_tables, hbm_words_ptr, hbm_row_stride,
                     SEARCH_STEPS: tl.constexpr, MAX_WORDS: tl.constexpr, W: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        valid = c < count
        e = tl.load(cand_ptr + c, mask=valid, other=0).to(tl.int64)
        row = tl.load(victims_ptr + c, mask=valid, other=-1).to(tl.int64)
        ok = valid & (row >= 0)
        kept = ok & (row < capacity)  # staged rows (>= capacity) are for this lookup only: no tag, no way
        old = tl.load(tags_ptr + row, mask=kept, other=-1)
        tl.store(way_ptr + old, tl.full([BLOCK_SIZE], _NO_WAY_C, tl.int8), mask=kept & (old >= 0))
        tl.store(tags_ptr + row, e.to(tl.int32), mask=kept)
        table = _upper_bound(e, entry_base_ptr, n_tables, SEARCH_STEPS, BLOCK_SIZE) - 1
        n_words = tl.load(row_words_ptr + table, mask=ok, other=0)
        src = tl.load(word_offset_ptr + table, mask=ok, other=0) + \
            (_RESERVED + e - tl.load(entry_base_ptr + table, mask=ok, other=0)) * n_words
        src = tl.multiple_of(src, 4)  # rows start on 16-byte boundaries (fbgemm pads them): 16-byte loads
        w = tl.arange(0, MAX_WORDS)
        inside = ok[:, None] & (w[None, :] < n_words[:, None])
        data = tl.load(host_words_ptr + src[:, None] + w[None, :], mask=inside, other=0)
        tl.store(hbm_words_ptr + row[:, None] * hbm_row_stride + w[None, :], data, mask=inside)
        tl.store(way_ptr + e, (row % W).to(tl.int8), mask=kept)

    # the number of halvings is a runtime value (one compile for every lookup size)
    @triton.jit(do_not_specialize=["steps"])
    def _relocate_kernel(entries_ptr, locs_ptr, cand_ptr, cand_count_ptr, victims_ptr, bucket, steps,
                         BLOCK_SIZE: tl.constexpr):
        p = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inb = p < bucket
        entry = tl.load(entries_ptr + p, mask=inb, other=-1)
        loc = tl.load(locs_ptr + p, mask=inb, other=0)
        need = inb & (entry >= 0) & (loc < 0)
        if tl.max(need.to(tl.int32), axis=0) == 0:
            return
        count = tl.load(cand_count_ptr)
        lo = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
        hi = tl.zeros([BLOCK_SIZE], dtype=tl.int32) + count
        it = 0
        while it < steps:  # lower bound of the entry in the sorted candidates
            active = need & (lo < hi)
            mid = (lo + hi) // 2
            cm = tl.load(cand_ptr + mid, mask=active, other=0)
            right = active & (cm < entry)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
            it += 1
        inside = need & (lo < count)
        found = inside & (tl.load(cand_ptr + lo, mask=inside, other=-1) == entry)
        tl.store(locs_ptr + p, tl.load(victims_ptr + lo, mask=found, other=-1), mask=found)
