"""End-to-end benchmark: torchrec's own DLRM served five ways on one stream of new Zipf batches, one run.

Model: `torchrec.models.dlrm.DLRM`, `num_tables` tables x `rows` x `dim` fp32, one Zipf(1.09) id per feature
(one popularity order for the whole stream, every timed batch new), 13 dense features, bottom MLP
512-256-dim, top MLP 1024-1024-512-256-1. Variants:
- `torchrec all HBM`: `quantize_inference_model` (fp32 weights), every row in HBM (fbgemm TBE, DEVICE);
- `torchrec UVM cache`: the same, each TBE moved to fbgemm's UVM cache at `budget` of its rows
  (`move_to_device_with_cache`), the TorchRec user's option today for tables beyond HBM;
- `ours`: `swap_in_hps` at `cache_ratio=budget`, the host level holding every row, synchronous (exact);
- `ours + prefetch`: the same module in a serving loop that registers batch i+1 (its host KJT, pinned) for
  prefetch before batch i's forward, whose lookup launches i+1's misses and copy into HBM on a side stream
  right after i's TBE, overlapping i's MLPs; the time per batch holds both (its own stream of batches);
- `CPU only`: the float model on the host's cores (fewer batches: it is slow).
Each GPU variant with fp32 MLPs and with bf16 autocast. p50/p99 of CUDA-event times per batch; outputs
of ours checked against the all-HBM model's and the CPU model's.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from torchrec_hps.bench.gpu_bench import GPUZipfStream, _times_ms

BATCHES = (256, 2048, 16384)


def _dlrm(num_tables: int, rows: int, dim: int, dev: torch.device):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
              for i in range(num_tables)]
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables, device=dev)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[512, 256, dim],
                over_arch_layer_sizes=[1024, 1024, 512, 256, 1], dense_device=dev).eval(), tables


def run_e2e_bench(num_tables: int = 26, rows: int = 1_000_000, dim: int = 128, batches: Sequence[int] = BATCHES,
                  reps: int = 30, warmup: int = 20, budget: float = 0.1, cpu_reps: int = 5,
                  log: Callable[[str], None] = print) -> List[Dict]:
    from torchrec.inference.modules import quantize_inference_model

    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
    from torchrec_hps.modules.swap import swap_in_hps
    from torchrec_hps.storage import StorageHierarchy

    dev = torch.device("cuda")
    model, tables = _dlrm(num_tables, rows, dim, dev)
    names = [t.feature_names[0] for t in tables]
    variants: Dict[str, torch.nn.Module] = {}
    with torch.no_grad():
        cpu_model = copy.deepcopy(model).to("cpu")
        variants["torchrec all HBM"] = quantize_inference_model(copy.deepcopy(model), quantization_dtype=torch.float)
        uvm = quantize_inference_model(copy.deepcopy(model), quantization_dtype=torch.float)
        for m in uvm.modules():
            for tbe in getattr(m, "_emb_modules", []):
                tbe.move_to_device_with_cache(dev, budget)
        variants[f"torchrec UVM cache {budget:.0%}"] = uvm
        cfg = HPSConfig(model="e2e", cache=CacheConfig(cache_ratio=budget, host_cache_ratio=1.0, hit_rate_threshold=1.0))
        storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig()))
        ours, _ = swap_in_hps(copy.deepcopy(model), cfg, storage=storage, device=dev)
        hps = ours.sparse_arch.embedding_bag_collection
        chunk = 1 << 20
        for t in tables:  # the host level holds every row (HPS: the full copy in memory)
            for lo in range(0, rows, chunk):
                hps.prefill(t.name, torch.arange(lo, min(lo + chunk, rows)))
        variants[f"ours {budget:.0%} sync"] = ours
    del model
    torch.cuda.empty_cache()
    log(f"DLRM: {num_tables} tables x {rows:,} rows x {dim} fp32, one Zipf(1.09) id per feature, every timed batch "
        f"new ({warmup} warm-up, {reps} timed); {torch.cuda.get_device_name()}; CPU only on "
        f"{torch.get_num_threads()} threads")
    stream = GPUZipfStream(num_tables, rows, 1.09, dev, seed=1)
    results: List[Dict] = []
    for batch in batches:
        # one stream per MLP precision, so neither run replays the other's batches
        # one stream per (MLP precision, prefetch or not), so no run replays another's batches
        keys = [(mlp, pre) for mlp in ("fp32", "bf16") for pre in (False, True)]
        kjts = {k: [stream.batch(names, batch, 1) for _ in range(warmup + reps)] for k in keys}
        dense = {k: [torch.randn(batch, 13, device=dev) for _ in range(warmup + reps)] for k in keys}
        # the serving loop prefetches from the batch's host tensors, assembled in pinned memory (so their copy
        # to the device is asynchronous and overlaps too)
        host_kjts = {k: [_pinned(kjt) for kjt in kjts[k]] for k in keys if k[1]}
        rows_out = []
        with torch.no_grad():
            last_dense, last_kjt = dense[("fp32", False)][-1], kjts[("fp32", False)][-1]
            ref = variants["torchrec all HBM"](last_dense, last_kjt)
            got = variants[f"ours {budget:.0%} sync"](last_dense, last_kjt)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            cpu_out = cpu_model(last_dense.cpu(), last_kjt.to(torch.device("cpu")))
            torch.testing.assert_close(got.cpu(), cpu_out, rtol=1e-3, atol=1e-3)
            cpu_times = []
            for i in range(cpu_reps):
                t0 = time.perf_counter()
                cpu_model(dense[("fp32", False)][warmup + i].cpu(),
                          kjts[("fp32", False)][warmup + i].to(torch.device("cpu")))
                cpu_times.append((time.perf_counter() - t0) * 1e3)
            cpu_p50 = statistics.median(cpu_times)
            rows_out.append(dict(variant="CPU only", mlp="fp32", batch=batch, p50_ms=cpu_p50,
                                 p99_ms=float(np.percentile(cpu_times, 99)), hit_rate=None))
            runs = [(name, m, False) for name, m in variants.items()]
            runs.append((f"ours {budget:.0%} + prefetch", variants[f"ours {budget:.0%} sync"], True))
            for name, m, pre in runs:
                for mlp in ("fp32", "bf16"):
                    def step(i, m=m, mlp=mlp, pre=pre):
                        if pre and i + 1 < warmup + reps:  # the serving loop: batch i+1's rows during i's MLPs
                            hps.prefetch(host_kjts[(mlp, pre)][i + 1])
                        # with prefetch the forward takes the very KJT registered (its lookup reuses that work)
                        kjt = host_kjts[(mlp, pre)][i] if pre else kjts[(mlp, pre)][i]
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mlp == "bf16"):
                            return m(dense[(mlp, pre)][i], kjt)
                    before = _hits(m)
                    times = _times_ms(step, warmup, reps)
                    after = _hits(m)
                    hit = None if before is None else (after[1] - before[1]) / max(after[0] - before[0], 1)
                    rows_out.append(dict(variant=name, mlp=mlp, batch=batch, p50_ms=statistics.median(times),
                                         p99_ms=float(np.percentile(times, 99)), hit_rate=hit))
        all_hbm = {r["mlp"]: r["p50_ms"] for r in rows_out if r["variant"] == "torchrec all HBM"}
        for r in rows_out:
            r["vs_all_hbm"] = all_hbm.get(r["mlp"], all_hbm["fp32"]) / r["p50_ms"]
            r["vs_cpu"] = cpu_p50 / r["p50_ms"]
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
            log(f"B={batch:6d}  {r['variant']:22s} {r['mlp']}  p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms  "
                f"hit {hit:>5s}  x all-HBM {r['vs_all_hbm']:.2f}  x CPU {r['vs_cpu']:.1f}")
        results += rows_out
        del kjts, dense
    storage.close()
    return results


def _pinned(kjt):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().cpu().pin_memory(),
                             lengths=kjt.lengths().cpu().pin_memory())


def _hits(module):
    """(ids, ids served from HBM) of an HPS module inside `module`, or None for other models."""
    from torchrec_hps.modules import HPSEmbeddingBagCollection

    for m in module.modules():
        if isinstance(m, HPSEmbeddingBagCollection):
            stats = [s for k, s in m.stats().items() if k != "_module"]
            return sum(s["ids"] for s in stats), sum(s["hits"] for s in stats)
    return None
