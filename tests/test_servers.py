"""The fault-test helpers really stop and restart servers."""
from __future__ import annotations

import redis
import pytest


@pytest.mark.slow
def test_kill_and_restart_one_cluster_node(servers, cluster_nodes):
    node = servers.cluster.nodes[1]
    node.kill()
    assert not node.is_up()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=0.5).ping()
    node.start(fresh=False)
    servers.cluster.wait_ok()
    assert node.is_up()


@pytest.mark.slow
def test_restart_standalone_redis(servers, redis_url):
    servers.redis.restart()
    assert redis.Redis.from_url(redis_url).ping()
