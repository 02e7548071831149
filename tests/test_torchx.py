"""TorchX components on the local scheduler, against the real Redis, Kafka and RocksDB: a bulk load (through
the `torchx run` CLI), then a trainer and an inference node side by side; the node applies every update."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

ROOT = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).parent / "torchx")


@pytest.mark.slow
def test_loader_then_trainer_and_inference_node(tmp_path, namespace, redis_url, kafka_bootstrap):
    from torchx.runner import get_runner
    from torchx.specs import AppState

    from apps import components
    from torchrec_hps.config import RedisTierConfig, RocksDBTierConfig, TableSpec
    from torchrec_hps.storage import RedisTier, RocksDBTier, StorageHierarchy

    tables = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=300, feature_names=["f1"]),
              EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=50, feature_names=["f2"])]
    torch.manual_seed(0)
    torch.save(EmbeddingBagCollection(tables=tables).state_dict(), tmp_path / "init.pt")
    config = tmp_path / "hps.yaml"
    config.write_text(f"""
model: {namespace}
cache: {{cache_ratio: 0.2, min_cache_rows: 1, hit_rate_threshold: 1.0}}
storage:
  memory: {{capacity: 100}}
  redis: {{url: "{redis_url}"}}
  rocksdb: {{path: {tmp_path}/rocksdb}}
kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}
tables:
  - {{name: t1, num_embeddings: 300, embedding_dim: 8, feature_names: [f1]}}
  - {{name: t2, num_embeddings: 50, embedding_dim: 8, feature_names: [f2]}}
""")
    out = subprocess.run([TORCHX, "run", "-s", "local_cwd", "--wait", "--log", "apps/components.py:bulk_loader",
                          "--config", str(config), "--checkpoint", str(tmp_path / "init.pt")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{namespace}.t1: 300 rows" in out.stdout + out.stderr

    runner = get_runner()
    log_dir = {"log_dir": str(tmp_path / "torchx")}
    stop = tmp_path / "stop"  # the node serves until the trainer is done, however long that takes here
    node = runner.run(components.inference_node(str(config), duration=300.0, group_id=f"{namespace}-n0",
                                                stop_file=str(stop)), scheduler="local_cwd", cfg=log_dir)
    train = runner.run(components.trainer(str(config), steps=8, checkpoint=str(tmp_path / "init.pt"),
                                          save=str(tmp_path / "final.pt")), scheduler="local_cwd", cfg=log_dir)
    try:
        assert runner.wait(train, wait_interval=1).state == AppState.SUCCEEDED
    finally:
        stop.write_text("done")
    assert runner.wait(node, wait_interval=1).state == AppState.SUCCEEDED
    final = torch.load(tmp_path / "final.pt")
    red = RedisTier(RedisTierConfig(url=redis_url))
    rocks = RocksDBTier(RocksDBTierConfig(path=str(tmp_path / "rocksdb")))
    h = StorageHierarchy([red, rocks])
    h.add_tables([TableSpec(namespace, t.name, t.num_embeddings, t.embedding_dim) for t in tables])
    try:
        for t in tables:
            res = h.get(f"{namespace}.{t.name}", torch.arange(t.num_embeddings))
            torch.testing.assert_close(res.rows, final[f"embedding_bags.{t.name}.weight"], rtol=0, atol=0)
            assert torch.equal(rocks.get(f"{namespace}.{t.name}", torch.arange(t.num_embeddings))[0],
                               final[f"embedding_bags.{t.name}.weight"])
    finally:
        for t in tables:
            red.drop_table(f"{namespace}.{t.name}")
        h.close()
    logs = "".join(p.read_text() for p in (tmp_path / "torchx").rglob("*") if p.is_file() and "std" in p.name)
    node_report = json.loads(next(line for line in logs.splitlines() if '"inference_node"' in line))["inference_node"]
    assert node_report["lag"] == 0 and node_report["applied_rows"] > 0 and node_report["lookups"] > 0
