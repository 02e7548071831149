"""fbgemm's IntNBit TBE lookup without its Python forward.

`IntNBitTableBatchedEmbeddingBagsCodegen.forward` moves inputs to the device, checks bounds, applies
pruning remaps and pops prefetched cache locations before calling its op; a cache group's rows need none
of that (they are ours, always in range, and the cache locations are our HBM rows, computed by the probe),
and at small batches that Python costs as much as the kernel. So the group binds the op's arguments once
and calls it directly. The op reads a row from `lxu_cache_weights[location]` where the location is not -1,
else from the table's own (UVM, host-mapped) weights at the index: fbgemm's two-level read, our levels.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PooledLookup = Callable[..., torch.Tensor]


def _layout_args(tbe: torch.nn.Module) -> dict:
    """The op's arguments that describe the tables' rows and the output, whoever holds the rows."""
    return dict(
        weights_tys=tbe.weights_tys, D_offsets=tbe.D_offsets, total_D=tbe.total_D, max_int2_D=tbe.max_int2_D,
        max_int4_D=tbe.max_int4_D, max_int8_D=tbe.max_int8_D, max_float16_D=tbe.max_float16_D,
        max_float32_D=tbe.max_float32_D, pooling_mode=int(tbe.pooling_mode), output_dtype=tbe.output_dtype,
        row_alignment=tbe.row_alignment, max_float8_D=tbe.max_float8_D, fp8_exponent_bits=tbe.fp8_exponent_bits,
        fp8_exponent_bias=tbe.fp8_exponent_bias)


def bind_pooled_lookup(tbe: torch.nn.Module, cache_rows: Optional[torch.Tensor] = None) -> PooledLookup:
    """A function (indices, offsets, per_sample_weights, locations) -> pooled output [B, total_D] over
    `tbe`'s weights and, where `locations` (int32, one per index) is not -1, the rows of `cache_rows`
    ([rows, max row bytes] uint8 on the device): fbgemm's own kernel and arguments."""
    op = torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function
    bound = dict(
        _layout_args(tbe),
        dev_weights=tbe.weights_host if tbe.host_size > 0 else tbe.weights_dev,
        uvm_weights=tbe.weights_uvm,
        weights_placements=tbe.weights_placements,
        weights_offsets=tbe.weights_offsets,
        lxu_cache_weights=cache_rows if cache_rows is not None else tbe.lxu_cache_weights,
    )

    no_locations = torch.empty(0, dtype=torch.int32, device=tbe.weights_placements.device)

    def pooled_lookup(indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor] = None,
                      locations: Optional[torch.Tensor] = None) -> torch.Tensor:
        return op(indices=indices, offsets=offsets, indice_weights=per_sample_weights,
                  lxu_cache_locations=locations if cache_rows is not None else no_locations, **bound)

    return pooled_lookup


def resident_binding_fits(tbe: torch.nn.Module, cache_rows: torch.Tensor) -> bool:
    """Whether every table's rows have the HBM rows' width (the TBE then reads HBM rows as its own)."""
    return all(int(w.shape[1]) == int(cache_rows.shape[1]) for w, _ in tbe.split_embedding_weights())


def bind_resident_lookup(tbe: torch.nn.Module, cache_rows: torch.Tensor, first_rows) -> PooledLookup:
    """A function (indices, offsets, per_sample_weights) -> pooled output over `cache_rows` taken as the
    tables' own weights (fbgemm's DEVICE placement): table t's id k is row first_rows[t] + k. For a group
    whose every row is resident (resident.py); needs resident_binding_fits."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation

    op = torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function
    dev = cache_rows.device
    row_bytes = int(cache_rows.shape[1])
    placements = torch.full_like(tbe.weights_placements, EmbeddingLocation.DEVICE.value)
    offsets = torch.tensor([int(r) * row_bytes for r in first_rows], dtype=tbe.weights_offsets.dtype, device=dev)
    bound = dict(
        _layout_args(tbe),
        dev_weights=cache_rows.view(-1), uvm_weights=torch.empty(0, dtype=torch.uint8, device=dev),
        weights_placements=placements, weights_offsets=offsets,
        lxu_cache_weights=torch.empty(0, 0, dtype=torch.uint8, device=dev),
        lxu_cache_locations=torch.empty(0, dtype=torch.int32, device=dev))

    def resident_lookup(indices: torch.Tensor, offsets: torch.Tensor,
                        per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return op(indices=indices, offsets=offsets, indice_weights=per_sample_weights, **bound)

    return resident_lookup
