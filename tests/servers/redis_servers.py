"""Redis for the tests: a standalone server (plain, ACL, TLS or mutual TLS) and Clusters built from them
(``redis-server`` and ``redis-cli`` from Debian's package)."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from tests.servers.process import (CLUSTER_PORTS, HOST, STATE, LocalServer, ServerError, _port_open, _wait,
                                   make_test_certificates)


@dataclass
class RedisServer(LocalServer):
    port: int
    cluster: bool = False
    acl: Optional[Tuple[str, str]] = None  # (user, password): the default user off, only this one let in
    tls: bool = False  # TLS only (no plain port), a test CA made with openssl in the server's folder
    mutual_tls: bool = False  # with tls: clients must present a certificate signed by the test CA

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    def _client_kwargs(self) -> dict:
        user, password = self.acl or (None, None)
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.tls else {}
        if self.mutual_tls:
            tls.update(ssl_certfile=str(self.dir / "client.crt"), ssl_keyfile=str(self.dir / "client.key"))
        return {"username": user, "password": password, **tls}

    def _make_certificates(self) -> None:
        make_test_certificates(self.dir, client=self.mutual_tls)

    @property
    def name(self) -> str:
        return f"redis-{'cluster-' if self.cluster else ''}{self.port}"

    @property
    def dir(self) -> Path:
        return STATE / self.name

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    def is_up(self) -> bool:
        return _port_open(self.port) and self._ping()

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, **self._client_kwargs()).ping())
        except Exception:
            return False

    def start(self, fresh: bool = True, take_over: bool = True) -> None:
        if self._keep_running(fresh, take_over):
            return
        if shutil.which("redis-server") is None:
            raise ServerError("redis-server is not installed: run `make tools` (Debian package redis-server)")
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.tls and not (self.dir / "server.crt").exists():
            self._make_certificates()
        listen = [f"port {self.port}"] if not self.tls else [
            "port 0", f"tls-port {self.port}", f"tls-cert-file {self.dir / 'server.crt'}",
            f"tls-key-file {self.dir / 'server.key'}", f"tls-ca-cert-file {self.ca_file}",
            f"tls-auth-clients {'yes' if self.mutual_tls else 'no'}"]
        conf = [
            *listen,
            f"bind {HOST}",
            "protected-mode no",
            "daemonize yes",
            f"pidfile {self.pidfile}",
            f"dir {self.dir}",
            "logfile redis.log",
            'save ""',
            "appendonly no",
        ]
        if self.acl:
            user, password = self.acl
            conf += ["user default off", f"user {user} on >{password} ~* &* +@all"]
        if self.cluster:
            conf += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                "cluster-node-timeout 2000",
                "cluster-require-full-coverage no",
            ]
        (self.dir / "redis.conf").write_text("\n".join(conf) + "\n")
        subprocess.run(["redis-server", str(self.dir / "redis.conf")], check=True, stdin=subprocess.DEVNULL, timeout=30)
        _wait(self.is_up, self.name, 20)

    def stop(self) -> None:
        """Graceful shutdown (no save)."""
        pid = self.pid()
        if pid is None:
            return
        try:
            import redis

            redis.Redis(host=HOST, port=self.port, socket_timeout=1, **self._client_kwargs()).shutdown(nosave=True)
        except Exception:
            pass
        self._wait_gone(pid)


class RedisCluster:
    def __init__(self, ports=CLUSTER_PORTS, replicas: int = 0) -> None:
        self.nodes = [RedisServer(p, cluster=True) for p in ports]
        self.replicas = replicas

    def _cluster_ok(self) -> bool:
        """Every node up and agreeing, every slot served; with replicas, each primary has its replicas and
        their replication links are up (also after a failover, whichever node is primary now)."""
        import redis

        try:
            for node in self.nodes:
                client = redis.Redis(host=HOST, port=node.port, socket_timeout=0.5)
                info = client.execute_command("CLUSTER INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes) \
                        or int(info.get("cluster_size", 0)) != len(self.nodes) // (self.replicas + 1):
                    return False
                if any("fail" in n["flags"] or not n["connected"] for n in client.execute_command("CLUSTER NODES").values()):
                    return False  # a node still flagged failed (one restarting after a failover test)
                if any(len(r) < 3 + self.replicas for r in client.execute_command("CLUSTER SLOTS")):
                    return False  # this node does not know every range's replicas yet
                repl = client.info("replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
                if repl.get("role") == "master" and self.replicas and int(repl.get("connected_slaves", 0)) < self.replicas:
                    return False
            return True
        except Exception:
            return False

    def start(self, take_over: bool = True) -> None:
        for node in self.nodes:
            node.start(fresh=True, take_over=take_over)
        if self._cluster_ok():
            return
        import redis

        for node in self.nodes:  # a half-formed cluster from an earlier run: start over
            r = redis.Redis(host=HOST, port=node.port)
            if r.info("replication").get("role") == "slave":
                r.execute_command("CLUSTER RESET HARD")  # a replica turns into an empty primary first
            r.flushall()
            r.execute_command("CLUSTER RESET HARD")
        cmd = ["redis-cli", "--cluster", "create", *[f"{HOST}:{n.port}" for n in self.nodes],
               "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:  # redis-cli waits for the nodes to agree, forever if one is gone: bound it
            out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"redis-cli --cluster create did not finish in 60s: {e.stdout}") from None
        if out.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed: {out.stdout}\n{out.stderr}")
        _wait(self._cluster_ok, "redis cluster state ok", 30)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def wait_ok(self, timeout: float = 30) -> None:
        _wait(self._cluster_ok, "redis cluster state ok", timeout)
