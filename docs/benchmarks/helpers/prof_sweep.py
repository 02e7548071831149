"""Probe kernel's one-key path: programs of BLOCK ids x warps, swept; per setting the probe's own time (CUDA
events over direct launches on a shape's buffers) and the all-cached forward's p50 vs fbgemm DEVICE."""
import statistics, torch
from torchrec import EmbeddingBagConfig
from torchrec_hps.bench.gpu_bench import GPUZipfStream, _fbgemm_tbe
from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.modules.cache import probe_kernel as pk
from torchrec_hps.storage import StorageHierarchy
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
dev = torch.device("cuda")
T, R = 8, 1_000_000
tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=128, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(num_partitions=4)))
m = HPSEmbeddingBagCollection(tables, HPSConfig(model="p", cache=CacheConfig(cache_ratio=1.0, host_cache_ratio=1.0, hit_rate_threshold=1.0)), storage=storage, device=dev)
device_tbe = _fbgemm_tbe([(t.name, R, 128) for t in tables], EmbeddingLocation.DEVICE, dev, 0.1)
for t in tables:
    storage.put(f"p.{t.name}", torch.arange(R), torch.randn(R, 128))
    m.prefill(t.name, torch.arange(R))
g = m.engine.groups[0]
stream = GPUZipfStream(T, R, 1.09, dev)
names = [t.feature_names[0] for t in tables]
def ev_ms(fn, items):
    out = []
    for x in items:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(x); b.record(); b.synchronize(); out.append(a.elapsed_time(b))
    return statistics.median(out)
batches = {L: [stream.batch(names, 16384, L) for _ in range(30)] for L in (32, 1)}
idx = {L: [(k.values().int(), k.offsets().int()) for k in ks] for L, ks in batches.items()}
ref = {}
for block, warps in ((512, 4), (512, 8), (1024, 4), (1024, 8), (2048, 8), (2048, 16), (256, 4), (256, 2), (512, 4)):
    pk.BLOCK_DIRECT, pk.WARPS_DIRECT = block, warps
    g.path.release()
    line = f"block {block:5d} warps {warps:2d}:"
    for L in (32, 1):
        ks = batches[L]
        for k in ks[:8]: m(k)
        out = m(ks[0]).values()
        if L not in ref: ref[L] = out.clone()
        assert torch.equal(out, ref[L]), f"block {block} warps {warps}: outputs differ"
        ours = ev_ms(m, ks[8:])
        dv = ev_ms(lambda i: device_tbe(*i), idx[L][8:])
        shape = next(s for key, s in g.path._shapes.items() if key[0] == 16384 and not key[3] and s.values.numel() >= ks[-1].values().numel())
        probe_t = ev_ms(lambda _: pk.launch_probe(shape.values, shape.scalars, shape.ends, g.probe_tables, shape.probe_out), range(20))
        line += f"  L={L}: probe {probe_t*1e3:6.1f} us, forward {ours:.3f} ms vs DEVICE {dv:.3f} ({dv/ours:.2f}x)"
    print(line, flush=True)
