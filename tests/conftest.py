"""Fixtures giving tests the real servers (started by `make test`, or here if they are not running).

A server that cannot be reached is a test error with a clear message, never a skip."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import torchrec_hps  # noqa: F401  (loads fbgemm quietly before torchrec)
from tests.servers import SERVERS, Servers, ServerError
from torchrec_hps.config import MemoryTierConfig, RedisTierConfig, RocksDBTierConfig
from torchrec_hps.storage import MemoryTier, RedisTier, RocksDBTier


def pytest_collection_modifyitems(config, items):
    # GPU tests are collected only where CUDA is available (the CPU path is what CI runs).
    import torch

    if torch.cuda.is_available():
        return
    items[:] = [i for i in items if "gpu" not in i.keywords]


@pytest.fixture(scope="session")
def servers() -> Servers:
    try:
        SERVERS.up(take_over=False)  # no-op when `make test` (or another checkout) already started them
    except ServerError as e:
        pytest.fail(f"test servers unavailable: {e}", pytrace=False)
    return SERVERS


@pytest.fixture
def redis_url(servers: Servers) -> str:
    if not servers.redis.is_up():
        servers.redis.start(fresh=False)
    return servers.redis_url


@pytest.fixture
def secured_redis(servers: Servers):
    """(url, user, password) of the Redis that lets in one ACL user only."""
    from tests.servers import SECURED_REDIS_ACL

    if not servers.secured_redis.is_up():
        servers.secured_redis.start(fresh=False)
    return (f"redis://127.0.0.1:{servers.secured_redis.port}",) + SECURED_REDIS_ACL


@pytest.fixture
def tls_redis(servers: Servers):
    """(rediss:// url, the test CA's file) of the Redis that speaks TLS only."""
    if not servers.tls_redis.is_up():
        servers.tls_redis.start(fresh=False)
    return f"rediss://127.0.0.1:{servers.tls_redis.port}", str(servers.tls_redis.ca_file)


@pytest.fixture
def mtls_redis(servers: Servers):
    """(rediss:// url, CA file, client certificate, client key) of the Redis that demands a client certificate."""
    server = servers.mtls_redis
    if not server.is_up():
        server.start(fresh=False)
    return (f"rediss://127.0.0.1:{server.port}", str(server.ca_file), str(server.dir / "client.crt"),
            str(server.dir / "client.key"))


@pytest.fixture
def cluster_nodes(servers: Servers):
    for node in servers.cluster.nodes:
        if not node.is_up():
            node.start(fresh=False)
    servers.cluster.wait_ok()
    return servers.cluster_nodes


@pytest.fixture
def replica_cluster_nodes(servers: Servers):
    """The Cluster with a replica per primary, every node up and replicating (after any failover test)."""
    for node in servers.replica_cluster.nodes:
        if not node.is_up():
            node.start(fresh=False)
    servers.replica_cluster.wait_ok(timeout=60)
    return servers.replica_cluster_nodes


@pytest.fixture
def kafka_bootstrap(servers: Servers) -> str:
    if not servers.kafka.is_up():
        servers.kafka.start(fresh=False)
    return servers.kafka.bootstrap


@pytest.fixture
def kafka_secured(servers: Servers):
    """(SASL_SSL bootstrap, user, password, the test CA's file) of the broker's SCRAM-over-TLS listener."""
    from tests.servers import KAFKA_SASL_USER

    if not servers.kafka.is_up():
        servers.kafka.start(fresh=False)
    return (servers.kafka.secure_bootstrap,) + KAFKA_SASL_USER + (str(servers.kafka.ca_file),)


@pytest.fixture
def rocksdb_path(tmp_path: Path) -> Path:
    return tmp_path / "rocksdb"


@pytest.fixture
def namespace() -> str:
    """A model name unique to the test, so tests sharing a server never see each other's keys."""
    return f"test_{uuid.uuid4().hex[:10]}"


TIER_KINDS = ["memory", "redis", "redis_cluster", "rocksdb"]


def make_tier(kind: str, request, tmp_path, **overrides):
    if kind == "memory":
        return MemoryTier(MemoryTierConfig(**overrides))
    if kind == "redis":
        return RedisTier(RedisTierConfig(url=request.getfixturevalue("redis_url"), **overrides))
    if kind == "redis_cluster":
        return RedisTier(RedisTierConfig(cluster_nodes=request.getfixturevalue("cluster_nodes"), **overrides))
    if kind == "rocksdb":
        return RocksDBTier(RocksDBTierConfig(path=str(tmp_path / f"rocksdb-{len(list(tmp_path.iterdir()))}"), **overrides))
    raise AssertionError(kind)


@pytest.fixture
def tier_factory(request, tmp_path):
    made = []

    def factory(kind: str, **overrides):
        tier = make_tier(kind, request, tmp_path, **overrides)
        made.append(tier)
        return tier

    yield factory
    for tier in made:
        if isinstance(tier, RedisTier):
            for table in tier.tables():
                tier.drop_table(table)
        tier.close()


