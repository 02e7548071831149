"""All-cached forward, 8 x 4M x 128 (as bench_gpu): CUDA-event p50 vs fbgemm DEVICE, and torch.profiler's
device time per kernel per lookup, at B=16384 L=32 and L=1."""
import statistics, torch
from torch.profiler import profile, ProfilerActivity
from torchrec import EmbeddingBagConfig
from torchrec_hps.bench.gpu_bench import GPUZipfStream, _fbgemm_tbe
from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import StorageHierarchy
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
dev = torch.device("cuda")
T, R = 8, 1_000_000
tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=128, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(num_partitions=4)))
m = HPSEmbeddingBagCollection(tables, HPSConfig(model="p", cache=CacheConfig(cache_ratio=1.0, host_cache_ratio=1.0, hit_rate_threshold=1.0)), storage=storage, device=dev)
device_tbe = _fbgemm_tbe([(t.name, R, 128) for t in tables], EmbeddingLocation.DEVICE, dev, 0.1)
for t in tables:
    for lo in range(0, R, 1_000_000):
        storage.put(f"p.{t.name}", torch.arange(lo, lo + 1_000_000), torch.randn(1_000_000, 128))
    m.prefill(t.name, torch.arange(R))
stream = GPUZipfStream(T, R, 1.09, dev)
names = [t.feature_names[0] for t in tables]
def timed(fn, items):
    ev = []
    for x in items:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(x); b.record(); b.synchronize(); ev.append(a.elapsed_time(b))
    return statistics.median(ev)
for B, L in ((16384, 32), (16384, 1)):
    kjts = [stream.batch(names, B, L) for _ in range(40)]
    idx = [(k.values().int(), k.offsets().int()) for k in kjts]
    for k in kjts[:10]: m(k)
    for k in idx[:10]: device_tbe(*k)
    for rep in range(2):
        ours = timed(m, kjts[10:]); dv = timed(lambda i: device_tbe(*i), idx[10:])
        print(f"B={B} L={L}: ours {ours:.3f} ms, DEVICE {dv:.3f} ms, {dv/ours:.2f}x")
    n = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in kjts[10:10 + n]: m(k)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in idx[10:10 + n]: device_tbe(*k)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=5, max_name_column_width=60))
