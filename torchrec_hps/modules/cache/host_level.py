"""The host level: every table's cached rows in host memory, in the TBE's own weight layout.

On CUDA the rows are fbgemm UVM weights allocated host-mapped (cudaHostAlloc, never managed memory), so
the GPU reads them in place: the TBE for ids not in HBM, the admission kernel when it copies rows into HBM.
Rows fetched from the tiers are written by the GPU too (one copy up, one scatter into host memory), in
stream order with the lookups: host stores into this write-combined memory would need fences the GPU
cannot see. Without CUDA they are the TBE's host weights. Row 0 of each table holds the default vector;
the rest are the index's entries in order (set_index.py), so the index gives the row directly.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from torchrec_hps.config import TableSpec
from torchrec_hps.modules.cache.hbm_level import HostRowLayout
from torchrec_hps.modules.cache.set_index import SetIndex


class HostRows:
    """Typed per-table views of one TBE's weights, and their layout as the admission kernel reads them."""

    def __init__(self, tbe: torch.nn.Module, specs: Sequence[TableSpec], index: SetIndex, row_dtype: torch.dtype,
                 default_value: float) -> None:
        cuda = tbe.uvm_size > 0
        flat_dev = tbe.weights_uvm if cuda else tbe.weights_host
        offsets = list(tbe.weights_physical_offsets)
        byte_rows = [w for w, _ in tbe.split_embedding_weights()]
        row_bytes = [int(w.shape[1]) for w in byte_rows]
        self.rows: List[torch.Tensor] = []  # per table [rows, dim] views, on the TBE's device
        for spec, off, rb, w in zip(specs, offsets, row_bytes, byte_rows):
            n = int(w.shape[0])
            self.rows.append(flat_dev[off:off + n * rb].view(n, rb).view(row_dtype)[:, :spec.dim])
        for rows in self.rows:
            rows.fill_(default_value)
        dev = index.device
        assert all(o % 4 == 0 and rb % 4 == 0 for o, rb in zip(offsets, row_bytes))
        self.layout = HostRowLayout(
            words=flat_dev.view(torch.int32), entry_base=index.entry_base,
            word_offset=torch.tensor([o // 4 for o in offsets], dtype=torch.int64, device=dev),
            row_words=torch.tensor([rb // 4 for rb in row_bytes], dtype=torch.int64, device=dev),
            max_row_words=max(rb // 4 for rb in row_bytes))

    def write(self, t: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows (any float dtype) into table t's host rows at `slots`; on CUDA a scatter on the current stream."""
        dst = self.rows[t]
        dst[slots.to(dst.device, torch.int64)] = rows.to(dst.device, dst.dtype)

    def read(self, t: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows (float32) of table t at `slots` (on CUDA a GPU gather that reads host memory)."""
        src = self.rows[t]
        return src[slots.to(src.device, torch.int64)].float()
