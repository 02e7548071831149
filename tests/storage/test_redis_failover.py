"""The Redis tier on a Cluster with replicas (3 primaries + 3 replicas, real servers): a primary SIGKILLed
mid-serving fails over to its replica and lookups are served from Redis again (not from RocksDB for good);
reads from replicas never return a row older than the last write; ASK during a slot migration."""
from __future__ import annotations

import time

import pytest
import redis
import torch

from torchrec_hps.config import RedisTierConfig, TableSpec
from torchrec_hps.storage import StorageHierarchy
from torchrec_hps.storage.redis_tier import RedisTier


def _tier(nodes, **kw) -> RedisTier:
    return RedisTier(RedisTierConfig(cluster_nodes=nodes, retry_interval=0.3, topology_refresh_interval=0.5, **kw))


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


@pytest.mark.slow
def test_a_killed_primary_fails_over_and_lookups_come_back_to_redis(servers, replica_cluster_nodes, tier_factory,
                                                                     namespace):
    red = _tier(replica_cluster_nodes)
    rocks = tier_factory("rocksdb")
    h = StorageHierarchy([red, rocks])
    spec = TableSpec(namespace, "t", 4000, 16)
    h.add_tables([spec])
    truth = torch.randn(spec.num_rows, spec.dim)
    keys = torch.arange(spec.num_rows)
    h.put(spec.key, keys, truth)
    owner = red._owner(red.hash_names(spec)[0])
    victim = next(n for n in servers.replica_cluster.nodes if n.port == _port(owner))
    assert h.get(spec.key, keys).source.eq(0).all()  # every row from Redis
    try:
        victim.kill()
        t0 = time.monotonic()
        from_rocksdb = 0
        while True:
            res = h.get(spec.key, keys)  # never an exception, never a wrong row
            assert res.found.all()
            torch.testing.assert_close(res.rows, truth[keys], rtol=0, atol=0)
            from_rocksdb += int(res.source.eq(1).sum())
            if res.source.eq(0).all():
                break
            assert time.monotonic() - t0 < 30, "lookups did not come back to Redis within 30 s of the kill"
            time.sleep(0.1)
        failover_s = time.monotonic() - t0
        assert from_rocksdb > 0  # the dead primary's keys fell through while the cluster failed over
        assert red._owner(red.hash_names(spec)[0]) != owner  # routed to the promoted replica
        print(f"served from Redis again {failover_s:.1f}s after the primary died")
        # writes reach the new primary too
        new = torch.randn(10, spec.dim)
        h.put(spec.key, keys[:10], new)
        res = h.get(spec.key, keys[:10])
        assert res.source.eq(0).all()
        torch.testing.assert_close(res.rows, new, rtol=0, atol=0)
    finally:
        victim.start(fresh=False)  # rejoins as a replica of the new primary
        servers.replica_cluster.wait_ok(timeout=60)
        red.drop_table(spec.key)
        h.close()


def test_reads_from_replicas_are_never_older_than_the_last_write(replica_cluster_nodes, namespace):
    red = _tier(replica_cluster_nodes, read_from_replicas=True)
    spec = TableSpec(namespace, "r", 2000, 8)
    red.add_table(spec)
    keys = torch.arange(spec.num_rows)
    replicas = [a for rs in red._topology.replicas.values() for a in rs]
    assert len(replicas) == 3

    def replica_hmgets() -> int:
        return sum(redis.Redis(host="127.0.0.1", port=_port(a)).info("commandstats").get("cmdstat_hmget", {})
                   .get("calls", 0) for a in replicas)

    before = replica_hmgets()
    try:
        for step in range(30):  # write, then read at once: a replica that lagged would show the old value
            rows = torch.full((spec.num_rows, spec.dim), float(step))
            red.put(spec.key, keys, rows)
            got, found = red.get(spec.key, keys)
            assert found.all()
            assert torch.equal(got, rows), f"step {step}: a replica served a row older than the last write"
        assert replica_hmgets() > before  # the gets went to the replicas
    finally:
        red.drop_table(spec.key)
        red.close()


def test_a_slot_migrating_answers_ask_and_the_tier_follows_it(replica_cluster_nodes, namespace):
    """Mid-migration the source node answers ASK for a key already moved; the tier asks the importing node."""
    red = _tier(replica_cluster_nodes)
    spec = TableSpec(namespace, "m", 1000, 4)
    red.add_table(spec)
    keys = torch.arange(spec.num_rows)
    rows = torch.randn(spec.num_rows, spec.dim)
    red.put(spec.key, keys, rows)
    name = red.hash_names(spec)[0]
    slot = redis.Redis(host="127.0.0.1", port=_port(red._owner(name))).cluster("keyslot", name)
    src_addr = red._owner(name)
    primaries = sorted(red._topology.replicas)
    dst_addr = next(a for a in primaries if a != src_addr)
    src, dst = (redis.Redis(host="127.0.0.1", port=_port(a)) for a in (src_addr, dst_addr))
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    try:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        src.execute_command("MIGRATE", "127.0.0.1", _port(dst_addr), name, 0, 5000)
        with pytest.raises(redis.exceptions.AskError):
            src.execute_command("HLEN", name)  # the source now sends clients on
        got, found = red.get(spec.key, keys)
        assert found.all()
        torch.testing.assert_close(got, rows, rtol=0, atol=0)
    finally:  # finish the migration: every key of the slot to dst, which then owns it
        for key in src.execute_command("CLUSTER GETKEYSINSLOT", slot, 10000):
            src.execute_command("MIGRATE", "127.0.0.1", _port(dst_addr), key, 0, 5000)
        for node in (dst, src):
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        red._topology.refresh()
        red.drop_table(spec.key)
        red.close()


def test_moved_is_followed_even_when_the_reread_slot_map_still_lags(replica_cluster_nodes, namespace):
    """Right after a SETSLOT the node a map is re-read from may not have heard of the new owner (gossip lags,
    as in a CI run where DEL went to the old owner after a refresh): the tier goes where MOVED says, for rows
    and for the per-hash commands (row count, drop)."""
    from redis.crc import key_slot

    red = _tier(replica_cluster_nodes)
    spec = TableSpec(namespace, "lag", 500, 4)
    red.add_table(spec)
    keys, rows = torch.arange(spec.num_rows), torch.randn(spec.num_rows, spec.dim)
    red.put(spec.key, keys, rows)
    topo = red._topology
    slots = [key_slot(n.encode()) for n in red.hash_names(spec)]
    true_owner = {s: topo.owner[s] for s in slots}
    wrong = {s: next(a for a in sorted(topo.replicas) if a != true_owner[s]) for s in slots}

    def lagging_refresh(prefer_last=()):  # a re-read that returns the old view: each slot on a wrong primary
        for s in slots:
            topo.owner[s] = wrong[s]

    topo.refresh = lagging_refresh
    lagging_refresh()
    got, found = red.get(spec.key, keys)
    assert found.all()
    torch.testing.assert_close(got, rows, rtol=0, atol=0)
    assert all(topo.owner[s] == true_owner[s] for s in slots)  # learnt from the redirection itself
    lagging_refresh()
    assert red.num_rows(spec.key) == spec.num_rows
    lagging_refresh()
    red.drop_table(spec.key)
    del topo.refresh
    topo.refresh()
    assert red.num_rows(spec.key) == 0
