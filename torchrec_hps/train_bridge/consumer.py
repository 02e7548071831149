"""Inference side: apply published rows to the storage hierarchy and to every HPSEmbeddingBagCollection
cache that holds them, then commit offsets (at-least-once; applying a row twice is harmless).

Per poll: decode and check each message (malformed or foreign ones, and well-formed ones whose ids are out
of the table's range or whose rows are not finite, are rejected one message at a time: skipped, counted
and logged with topic/partition/offset once the batch is applied), apply each table's rows in one
hierarchy put and one cache update. Only a failure to apply (a tier down) holds offsets back: the
partitions are rewound to the first unapplied message and the batch is tried again after `retry_backoff`
(its rejected messages are then counted once, when it applies).

Commits: every `commit_interval` seconds (and on stop, and when `wait_caught_up` asks), the tiers start
persisting (RocksDB flushes the rows it took without its write-ahead log) and the loop goes on; the offsets
applied before are committed once the flush has ended. A crash between two commits loses only rows that Kafka sends again to the group's next
consumer. With `commit_interval=0` every batch is committed after logged writes.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.config import KafkaConfig, table_key
from torchrec_hps.storage.hierarchy import StorageHierarchy
from torchrec_hps.storage.interface import last_occurrence
from torchrec_hps.train_bridge.wire import WireFormatError, decode_arrays
from torchrec_hps.warnings_log import limited

logger = logging.getLogger(__name__)
_warnings = limited(logger)
_ROWS_BUFFER_MAX = 64 << 20  # float32 values (256 MB) the joined-rows buffer may keep; larger polls allocate


@dataclass
class ConsumerStats:
    """What one consumer has done (metrics.py exports the counters)."""

    applied_messages: int = 0
    applied_rows: int = 0  # rows of applied messages (one superseded within its batch counts too)
    rejected_messages: int = 0  # corrupt, or rows no tier may take: skipped, counted once
    apply_failures: int = 0  # batches whose tier writes failed (rewound, retried)
    dead_lettered: int = 0  # rejected messages copied to the dead-letter topic
    last_applied_time: float = 0.0  # wall clock of the last applied batch

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


class UpdateConsumer:
    def __init__(self, config: KafkaConfig, model: str, storage: StorageHierarchy, tables: Sequence[str],
                 modules: Sequence = (), group_id: Optional[str] = None,
                 start_offsets: Optional[Dict[Tuple[str, int], int]] = None, namespace: Optional[str] = None) -> None:
        """Topics are the model's (`config.topic(model, table)`); rows land under `namespace` in the tiers
        (default: the model's name; a served model version has its own). `start_offsets` ({(topic, partition): offset}, from `snapshot_offsets` at bulk-load time) is where
        a group with no committed offsets starts, so a node restored from a snapshot misses nothing
        published after it."""
        from confluent_kafka import Consumer

        from torchrec_hps.train_bridge.producer import ensure_topics

        self.config = config
        self.model = model
        self.namespace = namespace or model
        self.storage = storage
        self.modules = list(modules)
        self._table_of_topic = {config.topic(model, t): t for t in tables}
        self._dims = {t: storage.spec(table_key(self.namespace, t)).dim for t in tables}
        self._rows = {t: storage.spec(table_key(self.namespace, t)).num_rows for t in tables}
        self._rows_buffer = np.empty(0, dtype=np.float32)  # _joined_rows
        ensure_topics(config, list(self._table_of_topic))
        group = group_id or config.group_id or f"hps-{model}"
        self._consumer = Consumer({
            **config.client_settings(), "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False,
            # bigger fetches (fewer round trips when catching up), short broker waits (low latency on a trickle)
            "max.partition.fetch.bytes": 8 * 1024 * 1024, "fetch.wait.max.ms": 10, **config.consumer})
        self._start_offsets = dict(start_offsets or {})
        self._consumer.subscribe(list(self._table_of_topic), on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.stats = ConsumerStats()
        self._dlq = None  # the dead-letter producer, made on the first rejected message
        self._applied: Dict[Tuple[str, int], int] = {}  # next offset per partition, applied, not committed
        self._flushing: Dict[Tuple[str, int], int] = {}  # applied, durable once the flush in flight ends
        self._last_commit = time.monotonic()
        self._commit_soon = False  # wait_caught_up asks for the next commit without waiting for the interval

    def _on_assign(self, consumer, partitions) -> None:
        if self._start_offsets:
            committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=10)}
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if committed.get(key, -1) < 0 and key in self._start_offsets:
                    tp.offset = self._start_offsets[key]
        consumer.assign(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        # the partitions go to another member: make what this one applied durable and commit it first
        # (called inside poll, on the loop's thread)
        self._commit_due(force=True)

    # ---- one poll ----
    def poll_once(self, max_messages: int = 500, timeout: Optional[float] = None) -> int:
        """Consume up to `max_messages`, apply them, commit; returns the number of messages applied."""
        # wait for the first message only, then take what is already there: low latency on a trickle,
        # big batches under load
        first = self._consumer.poll(self.config.poll_timeout if timeout is None else timeout)
        if first is None:
            self._commit_due()
            return 0
        msgs = [first] + (self._consumer.consume(max_messages - 1, 0) if max_messages > 1 else [])
        per_table: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {}
        first_offset: Dict[Tuple[str, int], int] = {}
        next_offset: Dict[Tuple[str, int], int] = {}
        applied = 0
        rejected: List[Tuple[str, int, int, str]] = []
        for msg in msgs:
            if msg.error() is not None:
                _warnings.warn(("consumer.kafka", self.model, str(msg.error().code())), "kafka: %s", msg.error())
                continue
            tp = (msg.topic(), msg.partition())
            first_offset.setdefault(tp, msg.offset())
            next_offset[tp] = msg.offset() + 1
            table = self._table_of_topic.get(msg.topic())
            try:
                if table is None:
                    raise WireFormatError("topic not subscribed by this consumer")
                ids, rows = decode_arrays(msg.value(), expected_dim=self._dims[table])  # views: no copy yet
                self._check_rows(table, ids, rows)
                per_table.setdefault(table, []).append((ids, rows))
                applied += 1
            except WireFormatError as e:
                rejected.append((msg.topic(), msg.partition(), msg.offset(), str(e), msg.value()))
        try:
            rows = self._apply(per_table)
            self._dead_letter(rejected)  # before the commit: a rejected message is never lost
        except Exception as e:  # a tier (or the dead-letter topic) is down: rewind, commit nothing, retry later
            self.stats.apply_failures += 1
            _warnings.warn(("consumer.apply", self.model, type(e).__name__),
                           "applying %d update messages failed (%s); retrying in %.1fs", applied, e,
                           self.config.retry_backoff)
            from confluent_kafka import TopicPartition

            for (topic, partition), offset in first_offset.items():
                self._consumer.seek(TopicPartition(topic, partition, offset))
            time.sleep(self.config.retry_backoff)
            return 0
        self._applied.update(next_offset)
        self._commit_due()
        for topic, partition, offset, reason, _ in rejected:  # counted once, with the batch that applies them
            logger.warning("skipping update %s[%d]@%d: %s", topic, partition, offset, reason)
        self.stats.rejected_messages += len(rejected)
        self.stats.applied_messages += applied
        self.stats.applied_rows += rows
        self.stats.last_applied_time = time.time()
        return applied

    def commit(self) -> None:
        """Persist the tiers and commit every applied offset now (the loop does so every commit_interval)."""
        with self._lock:
            self._commit_due(force=True)

    def _commit_due(self, force: bool = False) -> None:
        """Commit applied offsets once their rows are durable. Logged writes (commit_interval 0): at once.
        Else every commit_interval (or when forced or asked) a flush starts without waiting, and its
        offsets are committed at a later call that finds it finished (the loop goes on applying meanwhile);
        `force` waits for the flush. A failed persist commits nothing: the offsets wait for the next try."""
        if self.config.commit_interval <= 0:
            self._commit(self._applied)
            self._applied = {}
            return
        tables = [table_key(self.namespace, t) for t in self._table_of_topic.values()]
        try:
            if self._flushing and (force or self.storage.persisted(tables)):
                if force:
                    self.storage.persist(tables)
                self._commit(self._flushing)
                self._flushing = {}
            now = time.monotonic()
            if not self._applied or self._flushing and not force:
                return  # one flush in flight at a time
            if force or self._commit_soon or now - self._last_commit >= self.config.commit_interval:
                self.storage.persist(tables, wait=force)
                self._last_commit, self._commit_soon = now, False
                if force:
                    self._commit(self._applied)
                else:
                    self._flushing = self._applied
                self._applied = {}
        except Exception as e:
            _warnings.warn(("consumer.persist", self.model, type(e).__name__),
                           "persisting or committing applied updates failed (%s); their offsets stay uncommitted", e)
            try:  # offsets of partitions no longer ours are the new owner's to commit: never retried
                owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
            except Exception:
                return
            self._applied = {k: v for k, v in self._applied.items() if k in owned}
            self._flushing = {k: v for k, v in self._flushing.items() if k in owned}

    def _commit(self, offsets: Dict[Tuple[str, int], int]) -> None:
        if offsets:
            from confluent_kafka import TopicPartition

            self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                  asynchronous=False)

    def _dead_letter(self, rejected: List[Tuple[str, int, int, str, bytes]]) -> None:
        """Copy rejected messages to the dead-letter topic (delivered before this returns), if configured."""
        topic = self.config.dead_letter_topic
        if not topic or not rejected:
            return
        if self._dlq is None:
            from confluent_kafka import Producer

            from torchrec_hps.train_bridge.producer import ensure_topics

            ensure_topics(self.config, [topic])
            self._dlq = Producer({**self.config.client_settings(), "enable.idempotence": True,
                                  "acks": "all", "message.max.bytes": self.config.max_message_bytes + 4096,
                                  **self.config.producer})
        failed: List[str] = []

        def delivered(err, msg) -> None:
            if err is not None:
                failed.append(str(err))

        for source, partition, offset, reason, value in rejected:
            # keyed by source partition: one partition's rejects stay in their order
            self._dlq.produce(topic, value=value, key=f"{source}[{partition}]", on_delivery=delivered,
                              headers={"hps-source-topic": source, "hps-source-partition": str(partition),
                                       "hps-source-offset": str(offset), "hps-reason": reason[:1000]})
        left = self._dlq.flush(30)
        if left or failed:
            raise RuntimeError(f"dead-letter topic {topic!r}: {left} messages undelivered, errors {failed[:3]}")
        self.stats.dead_lettered += len(rejected)

    def _check_rows(self, table: str, ids: np.ndarray, rows: np.ndarray) -> None:
        """A well-formed message can still carry rows no tier may take: reject it alone, not the batch."""
        n = self._rows[table]
        if len(ids) and (ids.min() < 0 or ids.max() >= n):  # two reductions; the details only on failure
            bad = (ids < 0) | (ids >= n)
            raise WireFormatError(f"table {table!r}: id {int(ids[bad][0])} is out of range [0, {n}) "
                                  f"({int(bad.sum())} of {len(ids)} ids)")
        # a row sum is finite unless a value is NaN/inf (or finite values overflow: then the exact check)
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(rows.sum(1)).all() and not np.isfinite(rows).all():
                raise WireFormatError(f"table {table!r}: rows hold NaN or infinite values")

    def _joined_rows(self, parts: List[np.ndarray]) -> np.ndarray:
        """The messages' rows as one float32 array, in a buffer kept from poll to poll (the tiers and caches
        copy what they take): a fresh array of a poll's size (tens of MB) is mapped anew by the allocator
        each time, and its first-touch page faults cost several times the copy (113 vs 14 ms for 51 MB)."""
        n, dim = sum(len(p) for p in parts), parts[0].shape[1]
        if n * dim > _ROWS_BUFFER_MAX:
            return np.concatenate(parts).astype(np.float32, copy=False)
        if self._rows_buffer.size < n * dim:
            self._rows_buffer = np.empty(min(max(n * dim, 2 * self._rows_buffer.size), _ROWS_BUFFER_MAX),
                                         dtype=np.float32)
        out = self._rows_buffer[:n * dim].reshape(n, dim)
        np.concatenate(parts, out=out)
        return out

    def _apply(self, per_table: Dict[str, List[Tuple[np.ndarray, np.ndarray]]]) -> int:
        rows_applied = 0
        for table, parts in per_table.items():
            ids = np.concatenate([p[0] for p in parts])  # the one copy out of the messages' buffers
            if len(ids) == 0:
                continue
            rows = self._joined_rows([p[1] for p in parts])
            received = len(ids)  # counted as received: a row superseded in the same batch was applied too
            if len(np.unique(ids)) != len(ids):  # repeated ids: the last (newest) row wins, deduped once here
                idx = last_occurrence(ids)
                ids, rows = ids[idx], rows[idx]
            ids_t, rows_t = torch.from_numpy(ids), torch.from_numpy(rows)
            # ids are checked (per message) and distinct: the hierarchy and the caches skip both
            self.storage.put(table_key(self.namespace, table), ids_t, rows_t, logged=self.config.commit_interval <= 0,
                             unique=True)
            for module in self.modules:
                if table in {c.name for c in module.embedding_bag_configs()}:
                    module.update(table, ids_t, rows_t, unique=True)
            rows_applied += received
        return rows_applied

    # ---- background loop ----
    def start(self) -> "UpdateConsumer":
        self._thread = threading.Thread(target=self._run, name=f"hps-consumer-{self.model}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.poll_once()
            except Exception:
                logger.exception("update consumer loop")
                time.sleep(self.config.retry_backoff)

    def lag(self) -> int:
        """Messages published but not yet applied, over the assigned partitions."""
        from confluent_kafka import TopicPartition

        total = 0
        with self._lock:
            assignment = self._consumer.assignment()
            if not assignment:
                return 0
            committed = self._consumer.committed(assignment, timeout=10)
            for tp in committed:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
                key = (tp.topic, tp.partition)  # applied, maybe not committed yet
                done = self._applied.get(key, self._flushing.get(key, tp.offset))
                total += high - max(done, 0)
        return total

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until everything published to this consumer's topics before the call is applied: its group's
        committed offsets (committed after the tiers took the rows) reach the high watermarks read now.
        Needs the consumer running (start()); False if `timeout` seconds pass first."""
        from confluent_kafka import TopicPartition

        deadline = time.monotonic() + timeout
        targets: List[Tuple[TopicPartition, int]] = []
        with self._lock:
            for topic in self._table_of_topic:
                meta = self._consumer.list_topics(topic, timeout=self.config.connect_timeout).topics[topic]
                for p in meta.partitions:
                    _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                   timeout=self.config.connect_timeout)
                    if high > 0:
                        targets.append((TopicPartition(topic, p), high))
        while targets:
            self._commit_soon = True  # the running loop commits at its next poll, not at the interval
            with self._lock:
                done = self._consumer.committed([tp for tp, _ in targets], timeout=self.config.connect_timeout)
            targets = [(tp, high) for (tp, high), c in zip(targets, done) if c.offset < high]
            if targets and time.monotonic() > deadline:
                return False
            if targets:
                time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Stop the loop, persist and commit what was applied, leave the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            try:
                self._commit_due(force=True)
            finally:
                self._consumer.close()
