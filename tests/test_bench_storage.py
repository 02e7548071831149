"""The storage benchmark runs end to end on the real servers (tiny sizes; no time is asserted)."""
from __future__ import annotations

import json

import numpy as np

from apps import bench_storage
from torchrec_hps.workload import ZipfKeys


def test_zipf_keys_are_skewed_and_scattered():
    z = ZipfKeys(10_000, alpha=1.09, seed=0)
    keys = z.sample(50_000)
    assert keys.min() >= 0 and keys.max() < 10_000
    counts = np.bincount(keys, minlength=10_000)
    hottest = np.argsort(counts)[::-1]
    assert counts[hottest[:100]].sum() > 0.4 * len(keys)  # a few keys take most lookups
    assert hottest[0] == z.perm[0] and hottest[0] != 0  # the hottest rank is scattered by the permutation


def test_bench_storage_cli_writes_json(servers, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_storage.main(["--rows", "3000", "--dim", "16", "--batches", "256", "--seconds", "0.05",
                             "--redis-url", servers.redis_url, "--cluster-nodes", *servers.cluster_nodes,
                             "--rocksdb-path", str(tmp_path / "db"), "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["tier"] for r in data["results"]} == {"memory", "redis", "redis_cluster", "rocksdb"}
    assert all(r["ours_rows_per_s"] > 0 and r["naive_rows_per_s"] > 0 for r in data["results"])
    assert "| rocksdb | 256 |" in capsys.readouterr().out


def test_module_bench_writes_json_and_png(tmp_path):
    from apps import bench_module

    rc = bench_module.main(["--tables", "2", "--rows", "2000", "--dim", "8", "--batches", "16", "64",
                            "--ratios", "0.05", "0.5", "--json", str(tmp_path / "m.json"), "--png", str(tmp_path / "m.png")])
    assert rc == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data) == 4 and all(0.0 <= r["hit_rate"] <= 1.0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in data)
    big = [r["hit_rate"] for r in data if r["cache_ratio"] == 0.5]
    small = [r["hit_rate"] for r in data if r["cache_ratio"] == 0.05]
    assert min(big) > max(small)  # a bigger cache hits more on Zipf ids
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
