"""What the test servers share: where they live, their ports, the test certificates, and a base class for
a server process of ours on one port (its pidfile, and the kill/restart that fault tests use)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".servers"
HOST = "127.0.0.1"
REDIS_PORT = 16379
SECURED_REDIS_PORT = REDIS_PORT + 1
SECURED_REDIS_ACL = ("hps", "test-secret-4f1c")
TLS_REDIS_PORT = REDIS_PORT + 2
MTLS_REDIS_PORT = REDIS_PORT + 3
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




class LocalServer:
    """A server process this harness starts on `port`, found by its pidfile (or by who listens on the port).
    Subclasses give `name`, `pidfile`, `start(fresh, take_over)`, `stop()` and `is_up()`."""

    port: int
    name: str

    @property
    def pidfile(self) -> Path:
        raise NotImplementedError

    def pid(self) -> Optional[int]:
        return _read_pid(self.pidfile, self.port)

    def _keep_running(self, fresh: bool, take_over: bool) -> bool:
        """At start: whether a server already answering on the port stays as it is. One that another
        checkout or an aborted run left is killed first when a fresh server of ours is wanted."""
        if not self.is_up():
            return False
        if not fresh or not take_over or _owned(self.pidfile, self.port):
            return True
        self.kill()
        return False

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as in a crash."""
        self._signal(signal.SIGKILL, 20)

    def restart(self) -> None:
        self.stop()
        self.start(fresh=False)

    def _signal(self, sig: int, timeout: float) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, sig)
        self._wait_gone(pid, timeout)

    def _wait_gone(self, pid: int, timeout: float = 20) -> None:
        _wait(lambda: not _pid_alive(pid), f"{self.name} stop", timeout)
        _wait(lambda: not _port_open(self.port), f"{self.name} port release", 10)
