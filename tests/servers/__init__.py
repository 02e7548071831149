"""Real servers for the test suite, all on 127.0.0.1 on fixed high ports.

- one standalone Redis (``redis-server`` from Debian's package),
- a 3-node Redis Cluster (3 primaries, no replicas, ``cluster-require-full-coverage no`` so that the
  surviving nodes keep serving while one is down),
- a 6-node Redis Cluster (3 primaries + 3 replicas: a dead primary's replica takes over, failover tests),
- one Apache Kafka broker in KRaft mode (combined broker + controller), jars resolved from Maven
  Central by ``deploy/kafka/pom.xml`` and run with the machine's Java 17.

``python -m tests.servers up|down|status`` is what ``make test`` calls; tests use ``SERVERS`` to stop,
kill and restart one server in fault tests. Starting is idempotent: a server that already answers is
left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from tests.servers.kafka_broker import KafkaBroker
from tests.servers.process import (HOST, KAFKA_SASL_USER, MTLS_REDIS_PORT, REDIS_PORT, REPLICA_CLUSTER_PORTS,
                                   SECURED_REDIS_ACL, SECURED_REDIS_PORT, STATE, TLS_REDIS_PORT, ServerError)
from tests.servers.redis_servers import RedisCluster, RedisServer

__all__ = ["SERVERS", "Servers", "ServerError", "RedisServer", "RedisCluster", "KafkaBroker", "KAFKA_SASL_USER",
           "SECURED_REDIS_ACL"]


@dataclass
class Servers:
    redis: RedisServer
    cluster: RedisCluster
    kafka: KafkaBroker
    replica_cluster: RedisCluster  # 3 primaries + 3 replicas
    secured_redis: RedisServer  # ACL: one user with a password, the default user disabled
    tls_redis: RedisServer  # TLS only, certificates from a test CA
    mtls_redis: RedisServer  # mutual TLS: the client's certificate too

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis.port}"

    @property
    def cluster_nodes(self) -> List[str]:
        return [f"{HOST}:{n.port}" for n in self.cluster.nodes]

    @property
    def replica_cluster_nodes(self) -> List[str]:
        return [f"{HOST}:{n.port}" for n in self.replica_cluster.nodes]

    def up(self, take_over: bool = True) -> None:
        """Start what is not running. `take_over`: servers on our ports that another checkout or an
        aborted run left are restarted fresh (what `make test` wants); without it they are used as they are
        (what a pytest session wants: it must never kill servers another run is using)."""
        STATE.mkdir(parents=True, exist_ok=True)
        self.redis.start(take_over=take_over)
        self.secured_redis.start(take_over=take_over)
        self.tls_redis.start(take_over=take_over)
        self.mtls_redis.start(take_over=take_over)
        self.cluster.start(take_over=take_over)
        self.replica_cluster.start(take_over=take_over)
        self.kafka.start(take_over=take_over)

    def down(self) -> None:
        errors = []
        for stop in (self.kafka.stop, self.replica_cluster.stop, self.cluster.stop, self.mtls_redis.stop,
                     self.tls_redis.stop, self.secured_redis.stop, self.redis.stop):
            try:
                stop()
            except Exception as e:  # stop the rest regardless
                errors.append(str(e))
        if errors:
            raise ServerError("; ".join(errors))

    def status(self) -> Dict[str, bool]:
        out = {s.name: s.is_up() for s in (self.redis, self.secured_redis, self.tls_redis, self.mtls_redis)}
        out.update({n.name: n.is_up() for n in self.cluster.nodes + self.replica_cluster.nodes})
        out[f"kafka-{self.kafka.port}"] = self.kafka.is_up()
        return out


SERVERS = Servers(RedisServer(REDIS_PORT), RedisCluster(), KafkaBroker(), RedisCluster(REPLICA_CLUSTER_PORTS, replicas=1),
                  RedisServer(SECURED_REDIS_PORT, acl=SECURED_REDIS_ACL), RedisServer(TLS_REDIS_PORT, tls=True),
                  RedisServer(MTLS_REDIS_PORT, tls=True, mutual_tls=True))
