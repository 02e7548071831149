"""The host level: every table's cached rows in host memory, in the TBE's own weight layout.

On CUDA the rows are fbgemm UVM weights allocated host-mapped (cudaHostAlloc, never managed memory), so
the GPU reads them in place: the TBE for ids not in HBM, the admission kernel when it copies rows into HBM.
The CPU writes them through a host view of the same memory (rows fetched from the tiers land by one copy).
Without CUDA they are the TBE's host weights. Row 0 of each table holds the default vector; the rest are
the index's entries in order (set_index.py), so the index gives the row directly.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from torchrec_hps.config import TableSpec
from torchrec_hps.modules.cache.hbm_level import HostRowLayout
from torchrec_hps.modules.cache.set_index import SetIndex


def _host_view(mapped: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over the memory of a CUDA tensor allocated host-mapped (cudaHostAlloc): with unified
    addressing the host and the device use one address. Checked once: a byte written through the host view
    must read back through the device tensor."""
    import ctypes

    import numpy as np

    buf = (ctypes.c_uint8 * mapped.numel()).from_address(mapped.data_ptr())
    view = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
    view[0] = 173
    torch.cuda.synchronize(mapped.device)
    if int(mapped[0]) != 173:
        raise RuntimeError("the host level's UVM weights are not host-mapped memory (no host view)")
    view[0] = 0
    return view


class HostRows:
    """Typed views of one TBE's per-table weights, for the host (writes) and the device (reads)."""

    def __init__(self, tbe: torch.nn.Module, specs: Sequence[TableSpec], index: SetIndex, row_dtype: torch.dtype,
                 default_value: float) -> None:
        cuda = tbe.uvm_size > 0
        flat_dev = tbe.weights_uvm if cuda else tbe.weights_host
        flat_host = _host_view(flat_dev) if cuda else flat_dev
        self.cuda = cuda
        offsets = list(tbe.weights_physical_offsets)
        byte_rows = [w for w, _ in tbe.split_embedding_weights()]
        row_bytes = [int(w.shape[1]) for w in byte_rows]
        self.host: List[torch.Tensor] = []
        self.device: List[torch.Tensor] = []
        for spec, off, rb, w in zip(specs, offsets, row_bytes, byte_rows):
            n = int(w.shape[0])
            for flat, out in ((flat_host, self.host), (flat_dev, self.device)):
                out.append(flat[off:off + n * rb].view(n, rb).view(row_dtype)[:, :spec.dim])
        for rows in self.host:
            rows.fill_(default_value)
        dev = index.device
        assert all(o % 4 == 0 and rb % 4 == 0 for o, rb in zip(offsets, row_bytes))
        self.layout = HostRowLayout(
            words=flat_dev.view(torch.int32), entry_base=index.entry_base,
            word_offset=torch.tensor([o // 4 for o in offsets], dtype=torch.int64, device=dev),
            row_words=torch.tensor([rb // 4 for rb in row_bytes], dtype=torch.int64, device=dev),
            max_row_words=max(rb // 4 for rb in row_bytes))
        self.default_value = default_value

    def write(self, t: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows (any float dtype, on the host) into table t's host rows at `slots` (host tensor). On CUDA the
        caller has made sure no queued kernel still reads these rows."""
        dst = self.host[t]
        dst[slots.cpu()] = rows.cpu().to(dst.dtype)

    def read(self, t: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows (float32) of table t at `slots`, on the slots' device (a GPU gather reads host memory)."""
        src = self.device[t] if slots.is_cuda else self.host[t]
        return src[slots.to(torch.int64)].float()

    def reset(self, t: int, slots: torch.Tensor) -> None:
        dst = self.host[t]
        dst[slots.cpu()] = self.default_value
