"""Apache Kafka for the tests: one KRaft node (broker + controller), jars resolved from Maven Central by
``deploy/kafka/pom.xml`` and run with the machine's Java 17; a plaintext listener and a SASL/SCRAM over
TLS one."""
from __future__ import annotations

import base64
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import List

from tests.servers.process import (HOST, KAFKA_CONTROLLER_PORT, KAFKA_KEYSTORE_PASSWORD, KAFKA_LIB, KAFKA_PORT,
                                   KAFKA_SASL_USER, KAFKA_SECURE_PORT, STATE, LocalServer, ServerError, _port_open,
                                   _wait, make_test_certificates)


class KafkaBroker(LocalServer):
    """A single KRaft node (broker + controller)."""

    def __init__(self, port: int = KAFKA_PORT, controller_port: int = KAFKA_CONTROLLER_PORT,
                 secure_port: int = KAFKA_SECURE_PORT) -> None:
        self.port = port
        self.controller_port = controller_port
        self.secure_port = secure_port
        self.dir = STATE / f"kafka-{port}"
        self.name = f"kafka-{port}"

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
        if self._keep_running(fresh, take_over):
            return
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

    def stop(self) -> None:
        try:
            self._signal(signal.SIGTERM, 60)
        except ServerError:
            self.kill()
