"""Run as `TRITON_INTERPRET=1 python -m tests.modules.triton_kernel_check`: the all-hit path's Triton kernels
(probe_kernel.py, hbm_level.py, offsets_kernel.py, resident.py), run by Triton's interpreter on the CPU, against their torch references
on random inputs (test_triton_kernels.py)."""
from __future__ import annotations

import os
import sys

import torch


def _two_levels(lfu: bool, hbm: bool, admission: int, all_direct: bool = False, touch: bool = True,
                hbm_whole: bool = False):
    """A host index of 4 tables (one direct-mapped, or all: the probe's one-key path) with ids inserted, and an
    HBM level holding some (`hbm_whole`: one with a row for every entry, holding some)."""
    from torchrec_hps.modules.cache.hbm_level import HBMLevel, HostRowLayout
    from torchrec_hps.modules.cache.probe_kernel import ProbeTables
    from torchrec_hps.modules.cache.set_index import SetIndex

    g = torch.Generator().manual_seed(0)
    rows = [200, 60, 500, 30]
    caps = rows if all_direct else [48, 60, 96, 16]
    index = SetIndex(caps, torch.device("cpu"), lfu=lfu, whole=[True] * 4 if all_direct else [False, True, False, False])
    for t, (r, c) in enumerate(zip(rows, caps)):
        ids = torch.randperm(r, generator=g)[:c - 8] if (t != 1 or all_direct) else torch.arange(r)
        index.insert(torch.full_like(ids, t), ids, tick=3, protect_tick=3)
    index.ticks[index.keys >= 0] = torch.randint(1, 6, (int((index.keys >= 0).sum()),), generator=g,
                                                 dtype=torch.int32)
    words = torch.randint(-1000, 1000, (sum((c + 1) * 8 for c in index.capacities),), generator=g, dtype=torch.int32)
    offsets = [0]
    for c in index.capacities[:-1]:
        offsets.append(offsets[-1] + (c + 1) * 8)
    layout = HostRowLayout(words=words, entry_base=index.entry_base, word_offset=torch.tensor(offsets),
                           row_words=torch.full((4,), 8), max_row_words=8)
    level = None
    if hbm:
        level = HBMLevel(index.num_entries if hbm_whole else 64, 64, index.ticks, torch.device("cpu"))
        level.n_staging = 24  # fewer than the candidates left without a way: both cases
        level.rows = torch.zeros(level.capacity + level.n_staging, 64, dtype=torch.uint8)
        level.row_words = level.rows.view(torch.int32)
        level.fill(torch.nonzero(index.keys >= 0).view(-1)[::3][:40], tick=2, host=layout)
        assert int((level.tags >= 0).sum()) > 20, "the fixture's HBM level holds too few rows"
        assert level.direct == hbm_whole
    ft = [0, 1, 2, 3, 0]  # feature -> table (two features share table 0)

    def per_feature(vals, dummy):
        return torch.tensor(list(vals) + [dummy], dtype=torch.int64)

    tables = ProbeTables(
        feature_rows=per_feature([rows[t] for t in ft], 0),
        feature_set_base=per_feature(index.set_base[ft].tolist(), 0),
        feature_n_sets=per_feature(index.n_sets[ft].tolist(), 1),
        feature_entry_base=per_feature(index.entry_base[ft].tolist(), 0),
        feature_direct=per_feature(index.direct[ft].tolist(), 0).to(torch.bool),
        keys=index.keys, ticks=index.ticks, freq=index.freq,
        hbm_way=level.way_of_host if level else None, hbm_n_sets=level.n_sets if level else 1,
        hbm_direct=hbm_whole,
        admission=admission, all_direct=all_direct, touch=touch)
    assert bool(index.direct.all()) == all_direct
    return index, level, layout, tables, ft


def _clone_state(index, level):
    return [x.clone() for x in (index.ticks, index.freq if index.freq is not None else index.ticks)] + \
        ([x.clone() for x in (level.tags, level.way_of_host, level.rows)] if level else [])


def _restore(index, level, state):
    index.ticks.copy_(state[0])
    if index.freq is not None:
        index.freq.copy_(state[1])
    if level:
        for x, y in zip((level.tags, level.way_of_host, level.rows), state[2:]):
            x.copy_(y)


def check_probe_and_admission() -> None:
    import triton

    from torchrec_hps.modules.cache import hbm_level as hl
    from torchrec_hps.modules.cache import probe_kernel as pk
    from torchrec_hps.modules.cache.layout import ADMIT_ALWAYS, ADMIT_NEVER, ADMIT_SECOND, HBM_WAYS, WAYS

    g = torch.Generator().manual_seed(2)
    seen_flags, admitted, staged = set(), 0, 0
    for trial in range(11):  # the last three: every table direct-mapped (the last recording no use)
        lfu, hbm = trial % 2 == 1, trial % 4 != 3
        admission = [ADMIT_ALWAYS, ADMIT_SECOND, ADMIT_ALWAYS, ADMIT_NEVER][trial % 4]
        # trials 9 and 10: an HBM level with a row per entry (the probe's one-byte path; no admission)
        index, level, layout, tables, ft = _two_levels(lfu, hbm, ADMIT_NEVER if trial in (9, 10) else admission,
                                                       all_direct=trial >= 8, touch=trial != 10,
                                                       hbm_whole=trial in (9, 10))
        bucket, n_features = 1024, len(ft)
        n = int(torch.randint(1, bucket, (1,), generator=g))
        ends = torch.minimum(torch.randint(0, n + 1, (n_features,), generator=g).cumsum(0), torch.tensor(n))
        ends[-1] = n
        # each position's id: mostly one its table holds, else random (misses; bad ids on odd trials);
        # trials 6 and 7 only held ids (all hits)
        fidx = torch.searchsorted(ends, torch.arange(bucket), right=True).clamp(max=n_features - 1)
        values = torch.randint(-2 if trial % 2 else 0, 30, (bucket,), generator=g)
        for f, t in enumerate(ft):
            held = index.keys[index.entry_base[t]:index.entry_base[t] + index.capacities[t]]
            held = held[held >= 0]
            at = fidx == f
            pick = held[torch.randint(0, len(held), (int(at.sum()),), generator=g)]
            keep = torch.rand(len(pick), generator=g) < (1.0 if trial in (6, 7) else 0.7)
            values[at] = torch.where(keep, pick, values[at])
        scalars = torch.tensor([n, 9, 1, 6])
        state = _clone_state(index, level)
        results = []
        for fused in (False, True):
            _restore(index, level, state)
            out = pk.ProbeOut(slots=torch.full((bucket,), -7, dtype=torch.int32),
                              locs=torch.full((bucket,), -7, dtype=torch.int32),
                              entries=torch.full((bucket,), -7, dtype=torch.int32),
                              cand=torch.zeros(bucket, dtype=torch.int32), cand_count=torch.zeros(1, dtype=torch.int32),
                              flags=torch.zeros(1, dtype=torch.int32), counts=torch.zeros(4, n_features, dtype=torch.int64))
            if fused:
                pk.launch_probe(values, scalars, ends, tables, out)
            else:
                pk.probe_torch(values, scalars, ends, tables, out)
            cands = torch.sort(out.cand[:int(out.cand_count)]).values
            victims = torch.full((bucket,), -7, dtype=torch.int32)
            if level is not None and not level.direct:
                c = int(out.cand_count)
                out.cand[:c] = cands  # sorted, as admit() sorts them
                if fused:
                    level.set_fill.zero_()
                    level.stage_count.zero_()
                    grid = (triton.cdiv(bucket, hl.BLOCK),)
                    hl._select_kernel[grid](out.cand, out.cand_count, scalars, level.set_fill, level.tags, index.ticks,
                                            victims, level.n_sets, level.stage_count, level.capacity,
                                            level.n_staging, DIRECT=level.direct, W=HBM_WAYS, BLOCK_SIZE=hl.BLOCK)
                    blocks = triton.cdiv(bucket, hl.COPY_BLOCK)  # a bounded grid (2 programs): the grid-stride path
                    hl._apply_kernel[(2,)](out.cand, out.cand_count, victims, level.tags, level.way_of_host,
                                           level.capacity, layout.words, layout.entry_base, layout.word_offset,
                                           layout.row_words, 4, level.row_words, level.row_words.shape[1],
                                           triton.cdiv(blocks, 2), SEARCH_STEPS=3, MAX_WORDS=8, W=HBM_WAYS,
                                           BLOCK_SIZE=hl.COPY_BLOCK)
                    hl._relocate_kernel[(1,)](out.entries, out.locs, out.cand, out.cand_count, victims, bucket,
                                              bucket.bit_length(), BLOCK_SIZE=1024)
                else:
                    level._admit_torch(out.cand, c, victims, 9, layout, stage=True)
                    hl.relocate(out.entries, out.locs, out.cand, out.cand_count, victims)
                admitted += int(((victims[:c] >= 0) & (victims[:c] < level.capacity)).sum())
                staged += int((victims[:c] >= level.capacity).sum())
            results.append((out.slots.clone(), out.locs.clone(), out.entries.clone(), out.flags.clone(),
                            out.counts.clone(), cands, index.ticks.clone(),
                            index.freq.clone() if lfu else None, victims.clone(),
                            *(x.clone() for x in ((level.tags, level.way_of_host, level.rows)
                                                  if level else ()))))
        names = ("slots", "locs", "entries", "flags", "counts", "candidates", "host ticks", "LFU counts", "victims",
                 "HBM tags", "HBM ways", "HBM rows")
        for name, ref, got in zip(names, *results):
            if ref is not None:
                assert torch.equal(ref, got), f"trial {trial}: {name} differ"
        seen_flags.add(int(results[0][3]))
    assert {0, 1, 3} <= seen_flags, f"the trials did not cover hits, misses and bad ids: {seen_flags}"
    assert admitted > 0 and staged > 0, f"the trials did not admit ({admitted}) and stage ({staged}) rows"
    assert WAYS == 16 and HBM_WAYS == 16
    print(f"probe and admission kernels match the torch reference; flags seen {sorted(seen_flags)}, "
          f"{admitted} rows admitted, {staged} staged")


def check_offsets() -> None:
    import triton

    from torchrec_hps.modules.cache import offsets_kernel as ok

    g = torch.Generator().manual_seed(1)
    seen = set()
    for trial in range(12):
        n_features = [1, 3, 8][trial % 3]
        batch = [1, 7, 300, 1000][trial % 4]
        lengths = torch.randint(0, 4, (n_features * batch,), generator=g)
        n = int(lengths.sum())
        if trial % 4 == 1:
            lengths[int(torch.randint(0, len(lengths), (1,), generator=g))] = -2  # a negative length
        if trial % 4 == 2:
            n += 3  # ids and lengths disagree
        scalars = torch.tensor([n, 5, trial % 3, 6])  # counted on 2 of 3 trials (if no blocking flag)
        outs = []
        for fused in (False, True):
            offsets = torch.full((n_features * batch + 1,), -7, dtype=torch.int32)
            ends = torch.full((n_features,), -7, dtype=torch.int64)
            flags = torch.full((1,), 9, dtype=torch.int32)
            totals = torch.arange(12, dtype=torch.int64).view(4, 3)
            flags_out = torch.full((1,), 13, dtype=torch.int32)
            table = torch.arange(n_features) % 3
            counts = torch.randint(0, 9, (4, n_features), generator=torch.Generator().manual_seed(trial))
            if fused:
                scratch = ok.OffsetsScratch(lengths.numel(), lengths.device)
                grid = (scratch.n_chunks,)
                dev_scalars = torch.zeros(4, dtype=torch.int64)
                ok._chunk_sums_kernel[grid](lengths, lengths.numel(), scratch.chunk_sums, scratch.chunk_neg, flags,
                                            scalars, dev_scalars, CH=ok.CHUNK)
                assert torch.equal(dev_scalars, scalars), "the scalars were not copied"
                ok._offsets_kernel[grid](lengths, lengths.numel(), scratch.chunk_sums, scratch.chunk_neg,
                                         scratch.n_chunks, dev_scalars, offsets, ends, batch, flags, LAYOUT=ok.FLAG_LAYOUT,
                                         CH=ok.CHUNK, SUMS=4)  # narrow: several rounds
                ok._commit_counts_kernel[(1,)](flags, dev_scalars, counts, n_features, totals, 3, table, flags_out,
                                               COPY_OUT=True, F_BLOCK=triton.next_power_of_2(n_features))
            else:
                ok.offsets_and_checks_torch(lengths, scalars, n_features, batch, offsets, ends, flags)
                ok.commit_counts_torch(flags, scalars, counts, totals, table, flags_out)
            outs.append((offsets, ends, totals, flags, flags_out))
        for name, ref, out in zip(("offsets", "ends", "totals", "flags", "flags copy"), *outs):
            assert torch.equal(ref, out), f"trial {trial}: {name} differ: {ref} vs {out}"
        seen.add(int(outs[0][3]))
    assert seen == {0, ok.FLAG_LAYOUT}, seen
    print("offsets kernels match the torch reference")


def check_resident() -> None:
    import triton

    from torchrec_hps.modules.cache import resident as rk

    g = torch.Generator().manual_seed(2)
    seen = set()
    for trial in range(8):
        n_features = [1, 3, 8, 5][trial % 4]
        rows = torch.tensor([int(r) for r in torch.randint(5, 3000, (n_features,), generator=g)] + [0])
        per = torch.randint(0, 700, (n_features,), generator=g)
        n = int(per.sum())
        ends = torch.cumsum(per, 0)
        bucket = max(1024, triton.next_power_of_2(n + 1))
        values = torch.cat([torch.randint(0, int(r), (int(c),), generator=g) for r, c in zip(rows, per)]
                           + [torch.randint(-5, 9, (bucket - n,), generator=g)])
        if trial % 2 == 1 and n:
            values[int(torch.randint(0, n, (1,), generator=g))] = [-1, 10 ** 9][trial % 4 // 2]  # out of range
        entry_base = torch.cat([torch.tensor([0]), torch.cumsum(rows[:-1] + 16, 0)])
        outs = []
        for fused in (False, True):
            index = torch.full((bucket,), -7, dtype=torch.int32)
            locs = torch.full((bucket,), -7, dtype=torch.int32) if trial % 4 < 2 else None
            flags = torch.zeros(1, dtype=torch.int32)
            counts = torch.randint(0, 9, (4, n_features), generator=torch.Generator().manual_seed(trial))
            args = (values, torch.tensor([n, 3, 1, 6]), ends, rows, trial % 2, trial % 3 == 0, index, flags, counts,
                    locs, entry_base)
            (rk.launch_resident_index if fused else rk.resident_index_torch)(*args)
            outs.append((index, flags, counts, locs if locs is not None else index))
        for name, ref, out in zip(("index", "flags", "counts", "locs"), *outs):
            assert torch.equal(ref, out), f"trial {trial}: {name} differ: {ref} vs {out}"
        seen.add(int(outs[0][1]))
    assert seen == {0, rk.FLAG_INVALID}, seen
    print("resident kernel matches the torch reference")


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    check_probe_and_admission()
    check_offsets()
    check_resident()
    return 0


if __name__ == "__main__":
    sys.exit(main())
