"""The update path against the real Kafka broker and real tiers."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_hps.config import CacheConfig, HPSConfig, KafkaConfig, TableSpec
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import StorageHierarchy, bulk_load
from torchrec_hps.train_bridge import DeltaPublisher, EBCDeltaPublisher, UpdateConsumer, encode

TABLES = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=500, feature_names=["f1"]),
          EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=100, feature_names=["f2"])]


@pytest.fixture
def kafka(kafka_bootstrap):
    return KafkaConfig(bootstrap_servers=kafka_bootstrap, max_message_bytes=4096, poll_timeout=0.5,
                       retry_backoff=0.2)


def _hierarchy(tier_factory, namespace, bottom="rocksdb"):
    h = StorageHierarchy([tier_factory("memory", capacity=200), tier_factory(bottom)])
    h.add_tables([TableSpec(namespace, t.name, t.num_embeddings, t.embedding_dim) for t in TABLES])
    return h


def _drain(consumer, want_rows, timeout=60.0):
    deadline = time.monotonic() + timeout
    while consumer.stats.applied_rows < want_rows and time.monotonic() < deadline:
        consumer.poll_once()
    return consumer.stats.applied_rows


def test_published_rows_reach_tiers_and_cache(kafka, tier_factory, namespace):
    h = _hierarchy(tier_factory, namespace)
    ref = EmbeddingBagCollection(tables=TABLES)
    bulk_load(h.tiers[-1:], namespace, ref, progress=False)
    hps = HPSEmbeddingBagCollection(TABLES, HPSConfig(namespace, CacheConfig(cache_ratio=1.0, hit_rate_threshold=1.0)),
                                    storage=h)
    hps.prefill("t1", torch.arange(500))
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], modules=[hps], group_id=f"{namespace}-node0")
    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    ids = torch.arange(0, 500, 3)
    new = torch.randn(len(ids), 8)
    assert pub.publish("t1", ids, new) > 1  # 4 KiB messages: several per partition
    pub.flush()
    assert _drain(consumer, len(ids)) == len(ids)
    got = h.get(f"{namespace}.t1", ids)
    torch.testing.assert_close(got.rows, new, rtol=0, atol=0)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2"], values=torch.tensor([3, 1]),
                                              lengths=torch.tensor([1, 1]))
    torch.testing.assert_close(hps(kjt).to_dict()["f1"][0], new[1], rtol=0, atol=0)  # the cached row changed
    assert consumer.lag() == 0
    consumer.stop()
    hps.close()


def test_stopped_consumer_catches_up_from_committed_offsets(kafka, tier_factory, namespace):
    h = _hierarchy(tier_factory, namespace)
    group = f"{namespace}-node1"
    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    first = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=group)
    pub.publish("t2", torch.arange(10), torch.full((10, 4), 1.0))
    pub.flush()
    assert _drain(first, 10) == 10
    first.stop()  # the node goes down; training goes on
    truth = {}
    for version in range(2, 12):
        ids = torch.from_numpy(np.random.default_rng(version).choice(100, 20, replace=False))
        pub.publish("t2", ids, torch.full((20, 4), float(version)))
        truth.update({int(i): float(version) for i in ids})
    pub.flush()
    second = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=group)
    assert _drain(second, 200) == 200  # exactly the 10 x 20 rows published while it was down
    keys = torch.tensor(sorted(truth))
    got = h.get(f"{namespace}.t2", keys)
    assert got.rows[:, 0].tolist() == [truth[int(k)] for k in keys]
    second.stop()


def test_a_consumer_killed_between_commits_loses_no_update(kafka, tmp_path, namespace):
    """Applied rows go to RocksDB without its write-ahead log until the next commit: a consumer SIGKILLed
    after applying (nothing committed, nothing flushed) leaves them for the group's next consumer, which
    Kafka sends them to again; a clean stop persists and commits, so nothing is applied twice after it."""
    import os
    import subprocess
    import sys

    from torchrec_hps.config import RocksDBTierConfig, StorageConfig

    path, group = str(tmp_path / "db"), f"{namespace}-crash"
    pub = DeltaPublisher(kafka, namespace, ["t2"])
    pub.publish("t2", torch.arange(100), torch.full((100, 4), 3.0))
    pub.flush()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-m", "tests.bridge.crash_consumer", kafka.bootstrap_servers, path,
                              namespace, group, "100"], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "applied 100", line
    finally:
        child.kill()  # SIGKILL: no stop, no flush, no commit
        child.wait(30)
    storage = StorageHierarchy.from_config(StorageConfig(rocksdb=RocksDBTierConfig(path=path)))
    storage.add_tables([TableSpec(namespace, "t2", 100, 4)])
    second = UpdateConsumer(kafka, namespace, storage, ["t2"], group_id=group)
    assert not storage.get(f"{namespace}.t2", torch.arange(100)).found.any()  # unlogged, unflushed: gone
    assert _drain(second, 100) == 100  # nothing was committed: Kafka sends them again
    got = storage.get(f"{namespace}.t2", torch.arange(100))
    assert got.found.all() and got.rows.eq(3.0).all()
    second.stop()  # persists, then commits
    storage.close()
    storage = StorageHierarchy.from_config(StorageConfig(rocksdb=RocksDBTierConfig(path=path)))
    storage.add_tables([TableSpec(namespace, "t2", 100, 4)])
    third = UpdateConsumer(kafka, namespace, storage, ["t2"], group_id=group)
    deadline = time.monotonic() + 30
    while not third._consumer.assignment() and time.monotonic() < deadline:
        assert third.poll_once(timeout=0.5) == 0
    assert third._consumer.assignment() and third.lag() == 0 and third.stats.applied_rows == 0
    got = storage.get(f"{namespace}.t2", torch.arange(100))
    assert got.found.all() and got.rows.eq(3.0).all()  # durable across the reopen without any WAL
    third.stop()
    storage.close()


def test_corrupt_and_foreign_messages_are_skipped_and_counted(kafka, tier_factory, namespace):
    from confluent_kafka import Producer

    h = _hierarchy(tier_factory, namespace)
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-node2")
    good = encode(np.array([5]), np.full((1, 8), 9.0, np.float32))
    bad = [b"not an update", good[:-1], good[:-5] + b"\x00" + good[-4:],
           encode(np.array([5]), np.ones((1, 4), np.float32))]  # wrong dim for t1
    raw = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    topic = kafka.topic(namespace, "t1")
    for value in bad + [good]:
        raw.produce(topic, value=value, partition=1)
    raw.flush(30)
    _drain(consumer, 1)
    assert consumer.stats.rejected_messages == 4
    assert h.get(f"{namespace}.t1", torch.tensor([5])).rows[0, 0] == 9.0
    consumer.stop()


def test_poison_message_is_rejected_alone_and_the_rest_applies(kafka, tier_factory, namespace):
    """A well-formed message (valid checksum) with ids -1 and N+5 used to stall every update behind it."""
    from confluent_kafka import Producer

    h = _hierarchy(tier_factory, namespace)
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-poison")
    raw = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    topic = kafka.topic(namespace, "t2")
    raw.produce(topic, value=encode(np.array([-1, 105]), np.ones((2, 4), np.float32)), partition=0)
    raw.produce(topic, value=encode(np.array([50]), np.full((1, 4), np.nan, np.float32)), partition=0)
    for i in range(10):
        raw.produce(topic, value=encode(np.array([i]), np.full((1, 4), 3.0, np.float32)), partition=0)
    raw.flush(30)
    assert _drain(consumer, 10, timeout=20) == 10
    assert consumer.stats.rejected_messages == 2 and consumer.stats.apply_failures == 0
    assert h.get(f"{namespace}.t2", torch.arange(10)).rows.eq(3.0).all()
    assert not h.get(f"{namespace}.t2", torch.tensor([50])).found.any()  # the NaN row was not written
    consumer.stop()


@pytest.mark.slow
def test_tier_down_during_apply_is_retried_without_committing(kafka, servers, tier_factory, namespace):
    from confluent_kafka import Producer

    h = _hierarchy(tier_factory, namespace, bottom="redis")
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-node3")
    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    servers.redis.kill()
    try:
        raw = Producer({"bootstrap.servers": kafka.bootstrap_servers})
        for partition in range(kafka.num_partitions):  # garbage in every partition, re-read on each retry
            raw.produce(kafka.topic(namespace, "t2"), value=b"garbage", partition=partition)
        raw.flush(30)
        pub.publish("t2", torch.arange(30), torch.full((30, 4), 4.0))
        pub.flush()
        deadline = time.monotonic() + 30
        while consumer.stats.apply_failures == 0 and time.monotonic() < deadline:
            consumer.poll_once()
        assert consumer.stats.apply_failures > 0 and consumer.stats.applied_rows == 0
    finally:
        servers.redis.start(fresh=False)
    time.sleep(0.6)  # past the Redis tier's retry_interval
    assert _drain(consumer, 30) == 30
    assert h.get(f"{namespace}.t2", torch.arange(30)).rows.eq(4.0).all()
    assert consumer.stats.rejected_messages == kafka.num_partitions  # once each, however often re-read
    consumer.stop()


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(kafka, servers, tier_factory, namespace):
    h = _hierarchy(tier_factory, namespace)
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-node4")
    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    pub.publish("t1", torch.arange(50), torch.full((50, 8), 1.0))
    pub.flush()
    assert _drain(consumer, 50) == 50
    servers.kafka.restart()
    pub.publish("t1", torch.arange(50, 120), torch.full((70, 8), 2.0))
    pub.flush()
    assert _drain(consumer, 120, timeout=120) == 120
    got = h.get(f"{namespace}.t1", torch.arange(120))
    assert got.found.all() and got.rows[50:, 0].eq(2.0).all()
    consumer.stop()


def test_training_to_inference_end_to_end(kafka, tier_factory, namespace):
    """Train a small EBC model for K steps with the bridge on while an inference module serves lookups;
    once the consumer catches up, inference equals the trainer on the same inputs."""
    torch.manual_seed(0)
    trainer = EmbeddingBagCollection(tables=TABLES)
    h = _hierarchy(tier_factory, namespace)
    bulk_load(h.tiers[-1:], namespace, trainer, progress=False)
    hps = HPSEmbeddingBagCollection(TABLES, HPSConfig(namespace, CacheConfig(cache_ratio=0.2, min_cache_rows=1,
                                                                             hit_rate_threshold=1.0)), storage=h)
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], modules=[hps], group_id=f"{namespace}-node5").start()
    bridge = EBCDeltaPublisher(trainer, DeltaPublisher(kafka, namespace, ["t1", "t2"]))
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)

    def batch():
        return KeyedJaggedTensor.from_lengths_sync(
            keys=["f1", "f2"], values=torch.cat([torch.randint(0, 500, (24,), generator=gen),
                                                 torch.randint(0, 100, (24,), generator=gen)]),
            lengths=torch.full((16,), 3))

    for _ in range(12):
        kjt = batch()
        loss = trainer(kjt).values().pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bridge.record(kjt)
        bridge.step_done()
        with torch.no_grad():
            hps(batch())  # serving goes on the whole time
    deadline = time.monotonic() + 60
    while consumer.stats.applied_rows < bridge.publisher.stats.rows and time.monotonic() < deadline:
        time.sleep(0.1)
    assert consumer.stats.applied_rows == bridge.publisher.stats.rows > 0
    probe = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2"], values=torch.cat([torch.arange(500), torch.arange(100)]),
                                                lengths=torch.tensor([1] * 500 + [0] * 100 + [1] * 100 + [0] * 500))
    with torch.no_grad():
        torch.testing.assert_close(hps(probe).values(), trainer(probe).values(), rtol=0, atol=0)
    consumer.stop()
    hps.close()


def test_new_node_starts_from_the_snapshot_offsets(kafka, tier_factory, namespace):
    from torchrec_hps.train_bridge import snapshot_offsets

    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    pub.publish("t2", torch.arange(40), torch.full((40, 4), 1.0))  # already inside the snapshot
    pub.flush()
    offsets = snapshot_offsets(kafka, namespace, ["t1", "t2"])  # taken with the snapshot
    h = _hierarchy(tier_factory, namespace)
    h.put(f"{namespace}.t2", torch.arange(40), torch.full((40, 4), 1.0))  # the snapshot itself
    pub.publish("t2", torch.arange(10, 25), torch.full((15, 4), 2.0))  # between snapshot and subscription
    pub.flush()
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-new", start_offsets=offsets)
    assert _drain(consumer, 15) == 15
    for _ in range(3):
        consumer.poll_once(timeout=0.3)
    assert consumer.stats.applied_rows == 15  # nothing before the snapshot replayed, nothing after it lost
    rows = h.get(f"{namespace}.t2", torch.arange(40)).rows[:, 0]
    assert rows[10:25].eq(2.0).all() and rows[:10].eq(1.0).all() and rows[25:].eq(1.0).all()
    consumer.stop()


def test_rejected_messages_go_to_the_dead_letter_topic_with_their_source(kafka, tier_factory, namespace):
    import dataclasses

    from confluent_kafka import Consumer, Producer

    cfg = dataclasses.replace(kafka, dead_letter_topic=f"{namespace}.dead-letter")
    h = _hierarchy(tier_factory, namespace)
    consumer = UpdateConsumer(cfg, namespace, h, ["t1", "t2"], group_id=f"{namespace}-dlq")
    raw = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    topic = kafka.topic(namespace, "t2")
    poison = encode(np.array([-1, 105]), np.ones((2, 4), np.float32))
    raw.produce(topic, value=poison, partition=1)
    raw.produce(topic, value=b"not a message", partition=1)
    for i in range(5):
        raw.produce(topic, value=encode(np.array([i]), np.full((1, 4), 2.0, np.float32)), partition=1)
    raw.flush(30)
    assert _drain(consumer, 5, timeout=20) == 5
    assert consumer.stats.rejected_messages == 2 and consumer.stats.dead_lettered == 2
    assert h.get(f"{namespace}.t2", torch.arange(5)).rows.eq(2.0).all()
    consumer.stop()
    reader = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": f"{namespace}-dlq-reader",
                       "auto.offset.reset": "earliest"})
    reader.subscribe([cfg.dead_letter_topic])
    got, deadline = [], time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append((msg.value(), dict((k, v.decode()) for k, v in msg.headers())))
    reader.close()
    assert [v for v, _ in got] == [poison, b"not a message"]
    first = got[0][1]
    assert first["hps-source-topic"] == topic and first["hps-source-partition"] == "1"
    assert "out of range" in first["hps-reason"] and first["hps-source-offset"].isdigit()


def test_wait_caught_up_returns_once_everything_published_is_applied(kafka, tier_factory, namespace):
    """What a version loaded from Kafka-updated tiers waits on: False while the consumer is not running
    (nothing applied), True once it has applied and committed everything published before the call."""
    h = _hierarchy(tier_factory, namespace)
    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    ids = torch.arange(0, 500, 2)
    new = torch.randn(len(ids), 8)
    pub.publish("t1", ids, new)
    pub.flush()
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"], group_id=f"{namespace}-catch-up")
    t0 = time.monotonic()
    assert not consumer.wait_caught_up(0.5)
    assert time.monotonic() - t0 >= 0.5 and consumer.stats.applied_rows == 0
    consumer.start()
    assert consumer.wait_caught_up(60)
    assert consumer.stats.applied_rows == len(ids)  # every row, read back exactly
    torch.testing.assert_close(h.get(f"{namespace}.t1", ids).rows, new, rtol=0, atol=0)
    consumer.stop()
    h.close()
