"""Run as `TRITON_INTERPRET=1 python -m tests.modules.triton_kernel_check`: the all-hit path's Triton kernels
(remap_kernel.py, offsets_kernel.py), run by Triton's interpreter on the CPU, against their torch references
on random inputs (test_triton_kernels.py)."""
from __future__ import annotations

import os
import sys

import torch


def check_remap() -> None:
    import triton

    from torchrec_hps.modules.cache.remap_kernel import (BLOCK, MISS_SLOT, RemapTables, _remap_touch_kernel,
                                                         remap_and_touch_torch)

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([200, 60, 500, 30])
    n_features = len(rows)
    base = torch.cat([torch.zeros(1, dtype=torch.int64), rows.cumsum(0)])
    remap = torch.randint(0, 50, (int(base[-1]) + 1,), generator=g, dtype=torch.int32)
    remap[-1] = 1  # the sentinel: ABSENT
    slot_base = torch.tensor([0, 52, 114, 616, 0])

    def tables(lfu: bool) -> RemapTables:
        return RemapTables(torch.cat([rows, torch.zeros(1, dtype=torch.int64)]), base.clone(), slot_base, remap,
                           torch.zeros(700, dtype=torch.int64), torch.zeros(700, dtype=torch.int64) if lfu else None)

    seen_flags = set()
    for trial in range(8):
        bucket = 2048
        n = int(torch.randint(0, bucket, (1,), generator=g))
        ends = torch.minimum(torch.randint(0, n + 1, (n_features,), generator=g).cumsum(0), torch.tensor(n))
        low = -3 if trial % 2 else 0  # odd trials include out-of-range ids
        values = torch.randint(low, 30, (bucket,), generator=g)
        if trial >= 6:
            values[:] = 3
            remap[base[:-1] + 3] = 5  # id 3 cached in every table: an all-hit batch
        scalars = torch.tensor([n, 7 + trial])
        for lfu in (False, True):
            ref, out = tables(lfu), tables(lfu)
            ref_slots, out_slots = torch.zeros(bucket, dtype=torch.int32), torch.zeros(bucket, dtype=torch.int32)
            ref_flags, out_flags = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
            remap_and_touch_torch(values, scalars, ends, ref, ref_slots, ref_flags)
            _remap_touch_kernel[(triton.cdiv(bucket, BLOCK),)](
                values, scalars, ends, n_features, out.feature_rows, out.feature_base, out.feature_slot_base,
                out.remap, out.last_access, out.freq if lfu else out.last_access, out_slots, out_flags, bucket,
                MISS=MISS_SLOT, SEARCH_STEPS=n_features.bit_length() + 1, LFU=lfu, BLOCK_SIZE=BLOCK)
            assert torch.equal(ref_slots, out_slots), f"trial {trial}: slots differ"
            assert torch.equal(ref_flags, out_flags), f"trial {trial}: flags {ref_flags} vs {out_flags}"
            assert torch.equal(ref.last_access, out.last_access), f"trial {trial}: LRU ticks differ"
            if lfu:
                assert torch.equal(ref.freq, out.freq), f"trial {trial}: LFU counts differ"
            seen_flags.add(int(ref_flags))
    assert {0, 1, 3} <= seen_flags, f"the trials did not cover hits and misses: {seen_flags}"
    print(f"remap kernel matches the torch reference; flags seen {sorted(seen_flags)}")


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
        scalars = torch.tensor([n, 5])
        outs = []
        for fused in (False, True):
            offsets = torch.full((n_features * batch + 1,), -7, dtype=torch.int32)
            ends = torch.full((n_features,), -7, dtype=torch.int64)
            counts = torch.full((n_features,), -7, dtype=torch.int64)
            flags = torch.full((1,), 9, dtype=torch.int32)
            ids = torch.arange(4, dtype=torch.int64)
            flags_out = torch.full((1,), 13, dtype=torch.int32)
            table = torch.arange(n_features) % 3
            if fused:
                scratch = ok.OffsetsScratch(lengths.numel(), lengths.device)
                grid = (scratch.n_chunks,)
                dev_scalars = torch.zeros(2, dtype=torch.int64)
                ok._chunk_sums_kernel[grid](lengths, lengths.numel(), scratch.chunk_sums, scratch.chunk_neg, flags,
                                            scalars, dev_scalars, CH=ok.CHUNK)
                assert torch.equal(dev_scalars, scalars), "the scalars were not copied"
                ok._offsets_kernel[grid](lengths, lengths.numel(), scratch.chunk_sums, scratch.chunk_neg,
                                         scratch.n_chunks, dev_scalars, offsets, ends, batch, flags, LAYOUT=ok.FLAG_LAYOUT,
                                         CH=ok.CHUNK, MAX_CHUNKS=triton.next_power_of_2(scratch.n_chunks))
                ok._commit_ids_kernel[(1,)](flags, ends, n_features, counts, ids, table, flags_out, COPY_OUT=True,
                                            F_BLOCK=triton.next_power_of_2(n_features))
            else:
                ok.offsets_and_checks_torch(lengths, scalars, n_features, batch, offsets, ends, flags)
                ok.commit_ids_torch(flags, ends, counts, ids, table, flags_out)
            outs.append((offsets, ends, counts, flags, ids, flags_out))
        for name, ref, out in zip(("offsets", "ends", "counts", "flags", "ids", "flags copy"), *outs):
            assert torch.equal(ref, out), f"trial {trial}: {name} differ: {ref} vs {out}"
        seen.add(int(outs[0][3]))
    assert seen == {0, ok.FLAG_LAYOUT}, seen
    print("offsets kernels match the torch reference")


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    check_remap()
    check_offsets()
    return 0


if __name__ == "__main__":
    sys.exit(main())
