"""Fixtures giving tests the real servers (started by `make test`, or here if they are not running).

A server that cannot be reached is a test error with a clear message, never a skip."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import torchrec_hps  # noqa: F401  (loads fbgemm quietly before torchrec)
from tests.servers import SERVERS, Servers, ServerError


def pytest_collection_modifyitems(config, items):
    # GPU tests are collected only where CUDA is available (the CPU path is what CI runs).
    import torch

    if torch.cuda.is_available():
        return
    items[:] = [i for i in items if "gpu" not in i.keywords]


@pytest.fixture(scope="session")
def servers() -> Servers:
    try:
        SERVERS.up()  # idempotent: no-op when `make test` already started them
    except ServerError as e:
        pytest.fail(f"test servers unavailable: {e}", pytrace=False)
    return SERVERS


@pytest.fixture
def redis_url(servers: Servers) -> str:
    if not servers.redis.is_up():
        servers.redis.start(fresh=False)
    return servers.redis_url


@pytest.fixture
def cluster_nodes(servers: Servers):
    for node in servers.cluster.nodes:
        if not node.is_up():
            node.start(fresh=False)
    servers.cluster.wait_ok()
    return servers.cluster_nodes


@pytest.fixture
def kafka_bootstrap(servers: Servers) -> str:
    if not servers.kafka.is_up():
        servers.kafka.start(fresh=False)
    return servers.kafka.bootstrap


@pytest.fixture
def rocksdb_path(tmp_path: Path) -> Path:
    return tmp_path / "rocksdb"


@pytest.fixture
def namespace() -> str:
    """A model name unique to the test, so tests sharing a server never see each other's keys."""
    return f"test_{uuid.uuid4().hex[:10]}"
