"""Training deltas from TorchRec's ModelDeltaTracker under DistributedModelParallel (CPU, gloo, world
size 1), published to the real broker and applied to real tiers."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_hps.config import KafkaConfig, TableSpec
from torchrec_hps.storage import StorageHierarchy
from torchrec_hps.train_bridge import DeltaPublisher, TrackerDeltaPublisher, UpdateConsumer

TABLES = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=20, feature_names=["f1"]),
          EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"])]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=TABLES, device=torch.device("meta"))
        self.dense = torch.nn.Linear(8, 1)  # DMP needs a dense parameter to wrap in DDP

    def forward(self, kjt):
        return self.dense(self.ebc(kjt).values()).sum()


@pytest.fixture
def dmp(tmp_path):
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.model_tracker.types import DeltaTrackerConfig, TrackingMode
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _Model()
        apply_optimizer_in_backward(torch.optim.SGD, model.ebc.parameters(), {"lr": 0.5})
        constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                       for t in TABLES}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
        dmp.init_torchrec_delta_tracker(DeltaTrackerConfig(tracking_mode=TrackingMode.ID_ONLY))
        yield dmp
    finally:
        dist.destroy_process_group()


def test_tracked_rows_of_a_dmp_step_reach_the_tiers(dmp, kafka_bootstrap, tier_factory, namespace):
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, poll_timeout=0.5)
    h = StorageHierarchy([tier_factory("memory"), tier_factory("rocksdb")])
    h.add_tables([TableSpec(namespace, t.name, t.num_embeddings, t.embedding_dim) for t in TABLES])
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-dmp")
    bridge = TrackerDeltaPublisher(dmp, DeltaPublisher(kafka, namespace, ["t1", "t2"]))
    dense_opt = torch.optim.SGD(dmp.module.dense.parameters(), lr=0.1)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 4, 5]),
                                              lengths=torch.tensor([2, 1, 1, 1]))
    dmp(kjt).backward()
    dense_opt.step()
    assert bridge.publish_step() == 5  # t1 rows 1, 2, 3 and t2 rows 4, 5
    deadline = time.monotonic() + 30
    while consumer.stats.applied_rows < 5 and time.monotonic() < deadline:
        consumer.poll_once()
    state = dmp.state_dict()
    for table, ids in (("t1", [1, 2, 3]), ("t2", [4, 5])):
        want = state[f"ebc.embedding_bags.{table}.weight"].local_shards()[0].tensor[ids]
        got = h.get(f"{namespace}.{table}", torch.tensor(ids))
        assert got.found.all()
        torch.testing.assert_close(got.rows, want, rtol=0, atol=0)
    assert not h.get(f"{namespace}.t1", torch.tensor([0, 4])).found.any()  # untouched rows were not sent
    assert bridge.publish_step() == 0  # nothing changed since
    bridge.publisher.config.publish_every_steps = 2
    for step in range(1, 5):
        dmp(kjt).backward()
        assert bridge.step_done() == (step % 2 == 0)
    consumer.stop()
