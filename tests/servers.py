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

import argparse
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".servers"
HOST = "127.0.0.1"
REDIS_PORT = 16379
CLUSTER_PORTS = (17001, 17002, 17003)
REPLICA_CLUSTER_PORTS = (17011, 17012, 17013, 17014, 17015, 17016)
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093
KAFKA_SECURE_PORT = 19094  # the broker's SASL_SSL listener
KAFKA_SASL_USER = ("hps-bridge", "kafka-secret-7d2b")
KAFKA_KEYSTORE_PASSWORD = "keystore-pass-31a8"
KAFKA_LIB = ROOT / "deploy" / "kafka" / "lib"


class ServerError(RuntimeError):
    pass


def make_test_certificates(d: Path, pkcs12_password: Optional[str] = None, client: bool = False) -> None:
    """In `d`: a test CA (ca.crt) and a server certificate for 127.0.0.1 signed by it (server.crt/.key),
    made with openssl, valid for a few days; with `pkcs12_password` also server.p12 (a Java keystore); with
    `client` a client certificate signed by the same CA (client.crt/.key, for mutual TLS)."""
    if shutil.which("openssl") is None:
        raise ServerError("openssl is not installed: it makes the TLS test certificates (apt-get install openssl)")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
        "-subj", "/CN=torchrec-hps test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={HOST}")
    (d / "ext.cnf").write_text(f"subjectAltName=IP:{HOST}\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "7", "-extfile", "ext.cnf")
    if client:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj",
            "/CN=torchrec-hps test client")
        run("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.crt", "-days", "7")
    if pkcs12_password:
        run("pkcs12", "-export", "-in", "server.crt", "-inkey", "server.key", "-certfile", "ca.crt", "-name", "kafka",
            "-out", "server.p12", "-passout", f"pass:{pkcs12_password}")


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise ServerError(f"{what} did not come up within {timeout:.0f}s")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pid_listening_on(port: int) -> Optional[int]:
    """The pid of the process listening on 127.0.0.1:`port` (a server another checkout started has no
    pidfile here), found through /proc without extra tools."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(proc.name)
        except OSError:
            continue
    return None


def _owned(pidfile: Path, port: int) -> bool:
    """Whether the server on `port` was started from this checkout (its pidfile names the listener)."""
    try:
        return int(pidfile.read_text().strip()) == _pid_listening_on(port)
    except (OSError, ValueError):
        return False


def _read_pid(pidfile: Path, port: int) -> Optional[int]:
    try:
        pid = int(pidfile.read_text().strip())
        if _pid_alive(pid):
            return pid
    except (OSError, ValueError):
        pass
    return _pid_listening_on(port)


@dataclass
class RedisServer:
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

    def pid(self) -> Optional[int]:
        return _read_pid(self.pidfile, self.port)

    def is_up(self) -> bool:
        return _port_open(self.port) and self._ping()

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, **self._client_kwargs()).ping())
        except Exception:
            return False

    def start(self, fresh: bool = True, take_over: bool = True) -> None:
        if self.is_up():
            if not fresh or not take_over or _owned(self.pidfile, self.port):
                return
            self.kill()  # left over from another checkout or an aborted run: its state is not ours
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

    def kill(self) -> None:
        """SIGKILL: the node vanishes mid-request, as in a crash."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid)

    def restart(self) -> None:
        self.stop()
        self.start(fresh=False)

    def _wait_gone(self, pid: int) -> None:
        _wait(lambda: not _pid_alive(pid) and not _port_open(self.port), f"{self.name} stop", 20)


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


class KafkaBroker:
    """A single KRaft node (broker + controller)."""

    def __init__(self, port: int = KAFKA_PORT, controller_port: int = KAFKA_CONTROLLER_PORT,
                 secure_port: int = KAFKA_SECURE_PORT) -> None:
        self.port = port
        self.controller_port = controller_port
        self.secure_port = secure_port
        self.dir = STATE / f"kafka-{port}"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        return f"{HOST}:{self.secure_port}"

    @property
    def ca_file(self) -> Path:
        return self.dir / "tls" / "ca.crt"

    @property
    def pidfile(self) -> Path:
        return self.dir / "kafka.pid"

    def pid(self) -> Optional[int]:
        return _read_pid(self.pidfile, self.port)

    def is_up(self) -> bool:
        if not _port_open(self.port):
            return False
        from confluent_kafka.admin import AdminClient

        try:
            md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
            return len(md.brokers) > 0
        except Exception:
            return False

    def _java(self) -> List[str]:
        java = shutil.which("java")
        if java is None:
            raise ServerError("java (17+) is needed for the test Kafka broker")
        if not KAFKA_LIB.exists():
            raise ServerError(f"Kafka jars missing in {KAFKA_LIB}: run `make tools`")
        return [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "-cp", f"{KAFKA_LIB}/*"]

    def _write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            # a second listener for the security tests: SASL/SCRAM over TLS (its user is made at format time)
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port},"
                         f"SASL_SSL://{HOST}:{self.secure_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port},SASL_SSL://{HOST}:{self.secure_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-256",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.dir / "tls" / "server.p12"),
            "ssl.keystore.password": KAFKA_KEYSTORE_PASSWORD,
            "ssl.key.password": KAFKA_KEYSTORE_PASSWORD,
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            "num.partitions": "4",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "message.max.bytes": str(1024 * 1024),
        }
        if not (self.dir / "tls" / "server.p12").exists():
            (self.dir / "tls").mkdir(exist_ok=True)
            make_test_certificates(self.dir / "tls", KAFKA_KEYSTORE_PASSWORD)
        path = self.dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.dir / "log4j2.properties").write_text(
            "status = error\n"
            "appender.file.type = File\nappender.file.name = FILE\n"
            f"appender.file.fileName = {self.dir / 'server.log'}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\nrootLogger.appenderRef.file.ref = FILE\n"
        )
        return path

    def start(self, fresh: bool = True, take_over: bool = True) -> None:
        if self.is_up():
            if not fresh or not take_over or _owned(self.pidfile, self.port):
                return
            self.kill()  # left over from another checkout or an aborted run
        if self.pid() is not None:  # still starting (or stuck): give it a chance first
            try:
                _wait(self.is_up, "kafka broker", 60)
                return
            except ServerError:
                self.kill()
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        config = self._write_config()
        if fresh or not (self.dir / "data" / "meta.properties").exists():
            # A base64url id may start with '-', which argparse reads as an option: pass it as
            # --cluster-id=<id> (CI once drew such an id and failed to format).
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            out = subprocess.run(
                self._java() + ["kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                                f"--config={config}",
                                f"--add-scram=SCRAM-SHA-256=[name={KAFKA_SASL_USER[0]},password={KAFKA_SASL_USER[1]}]"],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
            if out.returncode != 0:
                raise ServerError(f"kafka storage format failed:\n{out.stdout}\n{out.stderr}")
        log = open(self.dir / "stdout.log", "ab")
        proc = subprocess.Popen(self._java() + ["kafka.Kafka", str(config)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.pidfile.write_text(str(proc.pid))
        try:
            _wait(self.is_up, "kafka broker", 90)
        except ServerError as e:
            tail = (self.dir / "stdout.log").read_text(errors="replace")[-3000:]
            raise ServerError(f"{e}\n--- kafka stdout.log tail ---\n{tail}") from None

    def _signal(self, sig: int, timeout: float) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, sig)
        _wait(lambda: not _pid_alive(pid), "kafka stop", timeout)
        _wait(lambda: not _port_open(self.port), "kafka port release", 10)

    def stop(self) -> None:
        try:
            self._signal(signal.SIGTERM, 60)
        except ServerError:
            self.kill()

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 20)

    def restart(self) -> None:
        self.stop()
        self.start(fresh=False)


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


SECURED_REDIS_PORT = REDIS_PORT + 1
SECURED_REDIS_ACL = ("hps", "test-secret-4f1c")
TLS_REDIS_PORT = REDIS_PORT + 2
MTLS_REDIS_PORT = REDIS_PORT + 3
SERVERS = Servers(RedisServer(REDIS_PORT), RedisCluster(), KafkaBroker(), RedisCluster(REPLICA_CLUSTER_PORTS, replicas=1),
                  RedisServer(SECURED_REDIS_PORT, acl=SECURED_REDIS_ACL), RedisServer(TLS_REDIS_PORT, tls=True),
                  RedisServer(MTLS_REDIS_PORT, tls=True, mutual_tls=True))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    if args.action == "up":
        SERVERS.up()
        print(f"servers up in {time.monotonic() - t0:.1f}s: redis {SERVERS.redis_url}, "
              f"cluster {','.join(SERVERS.cluster_nodes)}, kafka {SERVERS.kafka.bootstrap}")
    elif args.action == "down":
        SERVERS.down()
        print("servers down")
    else:  # exit 1 if any is down (make bench-storage leaves running servers it did not start)
        status = SERVERS.status()
        for name, ok in status.items():
            print(f"{name}: {'up' if ok else 'DOWN'}")
        return 0 if all(status.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
