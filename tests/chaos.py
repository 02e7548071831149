"""Chaos soak: serving and training run while the real servers of the test harness fail, on a seeded schedule.

A trainer thread publishes new versions of random rows through the Kafka bridge (row k at version v reads
[v, k, 0, ...]); an update consumer applies them to the tiers (memory -> Redis Cluster with replicas ->
RocksDB) and to the module's cache; the main thread looks up Zipf batches through an
HPSEmbeddingBagCollection. Meanwhile a driver, one fault at a time, SIGKILLs a random Redis node (primary
or replica) and restarts it, SIGKILLs the broker and restarts it, or stops the consumer and starts a new one
in its group. Checked as it goes: every lookup answers, every row is the row of its id at a version that
was current no longer than `staleness_s` before the lookup; at the end (every server back): the tiers and the
module hold the trainer's last version of every row (no update lost).

`python -m apps.chaos_soak --seconds 600` runs it as a command; tests/test_chaos.py for 60 s in make test.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from tests.servers import SERVERS, Servers
from torchrec_hps.config import (CacheConfig, HPSConfig, KafkaConfig, MemoryTierConfig, RedisTierConfig,
                                 RocksDBTierConfig, TableSpec)
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import MemoryTier, RedisTier, RocksDBTier, StorageHierarchy
from torchrec_hps.train_bridge import DeltaPublisher, UpdateConsumer

ROWS, DIM, TABLE, FEATURE = 2000, 8, "t", "f"
FAULTS = ("redis_node", "broker", "consumer")


@dataclass
class SoakReport:
    seconds: float
    lookups: int = 0
    rows_checked: int = 0
    failed_lookups: int = 0
    wrong_rows: int = 0  # another id's row, or a version never published
    stale_rows: int = 0  # a version superseded longer than the staleness bound before the lookup
    max_staleness_s: float = 0.0
    published_versions: int = 0
    lost_updates: int = 0  # rows whose final value is not the trainer's last
    injected: Counter = field(default_factory=Counter)
    survived: Counter = field(default_factory=Counter)  # the fault's server came back and serving went on
    errors: List[str] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| fault | injected | survived |", "|---|---|---|"]
        lines += [f"| {f} | {self.injected[f]} | {self.survived[f]} |" for f in FAULTS]
        lines += ["", f"{self.lookups} lookups ({self.rows_checked} rows) in {self.seconds:.0f} s, "
                  f"{self.published_versions} row versions published: {self.failed_lookups} failed lookups, "
                  f"{self.wrong_rows} wrong rows, {self.stale_rows} rows staler than the bound "
                  f"(max staleness {self.max_staleness_s:.1f} s), {self.lost_updates} lost updates"]
        return "\n".join(lines)


class _Truth:
    """Per id, the versions published and when (monotonic clock, taken before publishing)."""

    def __init__(self) -> None:
        self.versions: Dict[int, List[int]] = {}
        self.times: Dict[int, List[float]] = {}
        self.lock = threading.Lock()

    def record(self, ids: np.ndarray, version: int, at: float) -> None:
        with self.lock:
            for k in ids.tolist():
                self.versions.setdefault(k, [0]).append(version)
                self.times.setdefault(k, [0.0]).append(at)

    def staleness(self, k: int, version: int, looked_up_at: float) -> Optional[float]:
        """How long before `looked_up_at` the served version was superseded (0: still current), None if it
        was never published for k."""
        with self.lock:
            versions, times = self.versions.get(k, [0]), self.times.get(k, [0.0])
            i = bisect.bisect_left(versions, version)
            if i == len(versions) or versions[i] != version:
                return None
            return 0.0 if i + 1 == len(versions) else max(0.0, looked_up_at - times[i + 1])

    def last(self) -> Dict[int, int]:
        with self.lock:
            return {k: v[-1] for k, v in self.versions.items()}


def _row(ids: np.ndarray, version: int) -> torch.Tensor:
    rows = torch.zeros(len(ids), DIM)
    rows[:, 0] = float(version)
    rows[:, 1] = torch.from_numpy(ids.astype(np.float32))
    return rows


def _zipf_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.zipf(1.2, n) - 1) % ROWS


def run_soak(seconds: float, seed: int = 0, staleness_s: float = 30.0, servers: Servers = SERVERS,
             namespace: Optional[str] = None, workdir: Optional[str] = None,
             log: Callable[[str], None] = print) -> SoakReport:
    import tempfile

    rng = np.random.default_rng(seed)
    namespace = namespace or f"chaos_{seed}_{int(time.time())}"
    workdir = workdir or tempfile.mkdtemp(prefix="hps-chaos-")
    report = SoakReport(seconds=seconds)
    servers.replica_cluster.wait_ok(timeout=60)
    kafka = KafkaConfig(bootstrap_servers=servers.kafka.bootstrap, poll_timeout=0.2, retry_backoff=0.3,
                        num_partitions=2)
    redis_tier = RedisTier(RedisTierConfig(cluster_nodes=servers.replica_cluster_nodes, retry_interval=0.3,
                                           topology_refresh_interval=0.5, socket_timeout=1.0))
    storage = StorageHierarchy([MemoryTier(MemoryTierConfig(capacity=500)), redis_tier,
                                RocksDBTier(RocksDBTierConfig(path=f"{workdir}/rocksdb"))])
    spec = TableSpec(namespace, TABLE, ROWS, DIM)
    storage.add_tables([spec])
    all_ids = np.arange(ROWS)
    storage.put(spec.key, torch.from_numpy(all_ids), _row(all_ids, 0))
    tables = [EmbeddingBagConfig(name=TABLE, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[FEATURE])]
    hps = HPSEmbeddingBagCollection(tables, HPSConfig(namespace, CacheConfig(cache_ratio=0.1, min_cache_rows=1,
                                                                             hit_rate_threshold=1.0)), storage=storage)
    truth = _Truth()
    group = f"{namespace}-node"
    consumers = [UpdateConsumer(kafka, namespace, storage, [TABLE], modules=[hps], group_id=group).start()]
    publisher = DeltaPublisher(kafka, namespace, [TABLE])
    stop = threading.Event()

    def train() -> None:
        version, trng = 0, np.random.default_rng(seed + 1)
        while not stop.is_set():
            version += 1
            ids = np.unique(_zipf_ids(trng, 40))
            truth.record(ids, version, time.monotonic())
            publisher.publish(TABLE, torch.from_numpy(ids), _row(ids, version))
            try:
                publisher.flush(timeout=60)
            except Exception as e:  # noqa: BLE001 - reported, and the final check says what it cost
                report.errors.append(f"publish: {type(e).__name__}: {e}")
            report.published_versions += len(ids)
            time.sleep(0.05)

    def restart_consumer() -> None:
        consumers[-1].stop()
        consumers.append(UpdateConsumer(kafka, namespace, storage, [TABLE], modules=[hps], group_id=group).start())

    def inject(kind: str) -> None:
        report.injected[kind] += 1
        hold = float(rng.uniform(1.0, 3.0))
        if kind == "redis_node":
            node = servers.replica_cluster.nodes[int(rng.integers(len(servers.replica_cluster.nodes)))]
            log(f"chaos: SIGKILL redis {node.port} for {hold:.1f}s")
            node.kill()
            time.sleep(hold)
            node.start(fresh=False)
            servers.replica_cluster.wait_ok(timeout=90)
        elif kind == "broker":
            log(f"chaos: SIGKILL the broker for {hold:.1f}s")
            servers.kafka.kill()
            time.sleep(hold)
            servers.kafka.start(fresh=False)
        else:
            log("chaos: consumer stopped, a new one started in its group")
            restart_consumer()
        report.survived[kind] += 1

    def drive() -> None:
        deadline = time.monotonic() + seconds
        time.sleep(2.0)
        while time.monotonic() < deadline - 8 and not stop.is_set():
            kind = FAULTS[int(rng.integers(len(FAULTS)))]
            try:
                inject(kind)
            except Exception as e:  # noqa: BLE001 - a server that does not come back fails the soak
                report.errors.append(f"{kind}: {type(e).__name__}: {e}")
                return
            time.sleep(float(rng.uniform(1.0, 3.0)))

    trainer = threading.Thread(target=train, name="chaos-trainer", daemon=True)
    driver = threading.Thread(target=drive, name="chaos-driver", daemon=True)
    trainer.start()
    driver.start()
    lrng = np.random.default_rng(seed + 2)
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            ids = _zipf_ids(lrng, 64)
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=torch.from_numpy(ids),
                                                      lengths=torch.ones(len(ids), dtype=torch.int64))
            t0 = time.monotonic()
            try:
                out = hps(kjt).values()
            except Exception as e:  # noqa: BLE001 - counted: the soak's first promise is no failed lookup
                report.failed_lookups += 1
                report.errors.append(f"lookup: {type(e).__name__}: {e}")
                continue
            report.lookups += 1
            _check(report, truth, ids, out, t0, staleness_s)
    finally:
        stop.set()
        driver.join(timeout=180)
        trainer.join(timeout=120)
    # every server back: the tiers and the module converge on the trainer's last versions
    _converge(report, servers, truth, storage, spec, hps, log)
    consumers[-1].stop()  # the earlier ones were stopped by their faults
    hps.close()
    redis_tier.drop_table(spec.key)
    storage.close()
    return report


def _check(report: SoakReport, truth: _Truth, ids: np.ndarray, out: torch.Tensor, at: float, bound: float) -> None:
    report.rows_checked += len(ids)
    served_ids = out[:, 1].round().long().numpy()
    versions = out[:, 0].round().long().numpy()
    for k, served_k, v in zip(ids.tolist(), served_ids.tolist(), versions.tolist()):
        age = truth.staleness(k, v, at) if served_k == k else None
        if age is None:
            report.wrong_rows += 1
        else:
            report.max_staleness_s = max(report.max_staleness_s, age)
            report.stale_rows += age > bound


def _converge(report: SoakReport, servers: Servers, truth: _Truth, storage: StorageHierarchy, spec: TableSpec,
              hps: HPSEmbeddingBagCollection, log, timeout: float = 120.0) -> None:
    servers.replica_cluster.wait_ok(timeout=90)
    if not servers.kafka.is_up():
        servers.kafka.start(fresh=False)
    last = truth.last()
    ids = np.array(sorted(last), dtype=np.int64)
    want = np.array([last[k] for k in ids.tolist()])
    deadline = time.monotonic() + timeout
    while True:
        got_tiers = storage.get(spec.key, torch.from_numpy(ids)).rows[:, 0].round().long().numpy()
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=torch.from_numpy(ids),
                                                  lengths=torch.ones(len(ids), dtype=torch.int64))
        got_module = hps(kjt).values()[:, 0].round().long().numpy()
        lost = int(((got_tiers != want) | (got_module != want)).sum())
        if lost == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    report.lost_updates = lost
    log(f"chaos: converged with {lost} rows off the trainer's last versions")
