"""Timeline of one all-cached forward at B=16384 L=1 (8 x 1M x 128): host ops and GPU kernels with offsets
from the forward's start, from torch.profiler (CPU + CUDA), plus cProfile's top functions."""
import cProfile, pstats, statistics, time, torch
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
for t in tables:
    storage.put(f"p.{t.name}", torch.arange(R), torch.randn(R, 128))
    m.prefill(t.name, torch.arange(R))
stream = GPUZipfStream(T, R, 1.09, dev)
names = [t.feature_names[0] for t in tables]
kjts = [stream.batch(names, 16384, 1) for _ in range(60)]
for k in kjts[:20]: m(k)
torch.cuda.synchronize()
host = []
for k in kjts[20:40]:
    t0 = time.perf_counter(); m(k); host.append((time.perf_counter() - t0) * 1e6); torch.cuda.synchronize()
print(f"host time per forward (then sync): p50 {statistics.median(host):.1f} us")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for k in kjts[40:44]:
        torch.cuda.synchronize()
        with torch.profiler.record_function("FORWARD"):
            m(k)
        torch.cuda.synchronize()
ev = [e for e in prof.events()]
fw = [e for e in ev if e.name == "FORWARD"][-1]
t0 = fw.time_range.start
print(f"FORWARD host span {fw.time_range.elapsed_us():.1f} us")
rows = []
for e in ev:
    s = e.time_range.start
    if s < t0 - 5 or s > t0 + 600: continue
    kind = "GPU" if e.device_type == torch.autograd.DeviceType.CUDA else "cpu"
    rows.append((s - t0, e.time_range.elapsed_us(), kind, e.name[:90]))
for r in sorted(rows)[:120]:
    print(f"{r[0]:8.1f} {r[1]:8.1f} {r[2]} {r[3]}")
pr = cProfile.Profile(); pr.enable()
for k in kjts[44:60]: m(k)
torch.cuda.synchronize(); pr.disable()
st = pstats.Stats(pr).stats
top = sorted(((v[2] / 16 * 1e6, v[3] / 16 * 1e6, v[1], f"{k[0].split('/')[-1]}:{k[1]}({k[2]})") for k, v in st.items()), reverse=True)[:30]
print("  tottime/forward us, cumtime/forward us, calls, function")
for r in top: print(f"  {r[0]:8.1f} {r[1]:8.1f} {r[2]:5d} {r[3]}")
