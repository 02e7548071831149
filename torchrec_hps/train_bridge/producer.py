"""Training side: publish changed embedding rows to Kafka (one topic per model and table).

Rows of id k always go to partition k % num_partitions, so the updates of one id stay in order. The
producer is idempotent (acks=all); a message whose delivery finally fails is produced again at `flush()`
(up to `max_redeliveries` times) and, if it still fails, `flush()` raises: nothing is dropped silently.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.config import KafkaConfig
from torchrec_hps.train_bridge.wire import encode_chunks

logger = logging.getLogger(__name__)


class PublishError(RuntimeError):
    pass


class BrokerError(RuntimeError):
    """The brokers cannot be reached, or refuse the client's credentials."""


def broker_error(config: KafkaConfig, error: Exception) -> BrokerError:
    """A one-line reason naming the brokers, the protocol and the user (never the password)."""
    where = f"kafka at {config.bootstrap_servers} ({config.security_protocol})"
    if "authentication" in str(error).lower() or "sasl" in str(error).lower():
        return BrokerError(f"{where}: authentication failed for user {config.sasl_username!r} "
                           f"({config.sasl_mechanism}): check kafka.sasl_username / kafka.sasl_password ({error})")
    hint = " (no broker answered: down, or not a listener for this security_protocol?)" \
        if "brokers are down" in str(error) else ""
    return BrokerError(f"{where}: {error}{hint}")


def ensure_topics(config: KafkaConfig, topics: Sequence[str], timeout: Optional[float] = None) -> Dict[str, int]:
    """Create missing topics (config.num_partitions each); returns {topic: partition count}. Waits up to
    `timeout` (config.connect_timeout) for the brokers; a refused login or TLS handshake fails at once."""
    timeout = config.connect_timeout if timeout is None else timeout
    from confluent_kafka.admin import AdminClient, NewTopic

    from confluent_kafka import KafkaException

    errors: List[str] = []  # librdkafka reports a refused login through the error callback, served by poll
    admin = AdminClient({**config.client_settings(), "error_cb": lambda e: errors.append(str(e)), "logger": logger})
    deadline = time.monotonic() + timeout
    while True:  # in short waits, so a refused login fails at once instead of after the whole timeout
        try:
            existing = admin.list_topics(timeout=min(1.0, timeout)).topics
            break
        except KafkaException as e:
            admin.poll(0)
            refused = [m for m in errors if "authentication" in m.lower() or "ssl" in m.lower()]
            if refused or time.monotonic() > deadline:
                raise broker_error(config, RuntimeError("; ".join(dict.fromkeys(refused or errors or [str(e)])))
                                   ) from None
    missing = [t for t in topics if t not in existing]
    if missing:
        futures = admin.create_topics([NewTopic(t, num_partitions=config.num_partitions,
                                                replication_factor=config.replication_factor) for t in missing])
        for topic, fut in futures.items():
            try:
                fut.result(timeout)
            except Exception as e:  # created concurrently by another process is fine
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise PublishError(f"cannot create topic {topic}: {e}") from e
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=timeout).topics
        counts = {t: len(md[t].partitions) for t in topics if t in md and md[t].partitions}
        if len(counts) == len(topics) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if len(counts) != len(topics):
        raise PublishError(f"topics not ready after {timeout}s: {sorted(set(topics) - set(counts))}")
    return counts


def snapshot_offsets(config: KafkaConfig, model: str, tables: Sequence[str], timeout: float = 30.0
                     ) -> Dict[Tuple[str, int], int]:
    """The end offset of every partition of the model's update topics: record it when a snapshot (bulk
    load) is taken, and start new nodes there (UpdateConsumer(start_offsets=...))."""
    from confluent_kafka import Consumer, TopicPartition

    topics = [config.topic(model, t) for t in tables]
    counts = ensure_topics(config, topics, timeout)
    probe = Consumer({**config.client_settings(), "group.id": f"hps-offsets-{model}",
                      "enable.auto.commit": False})
    try:
        return {(t, p): probe.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)[1]
                for t in topics for p in range(counts[t])}
    finally:
        probe.close()


@dataclass
class PublisherStats:
    """What one publisher has sent (metrics.py exports the counters)."""

    messages: int = 0
    rows: int = 0
    delivered: int = 0  # messages the broker acknowledged
    delivery_failures: int = 0  # delivery reports with an error (each produced again at flush)
    redelivered: int = 0

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


class DeltaPublisher:
    """Publishes (ids, rows) per table of one model."""

    def __init__(self, config: KafkaConfig, model: str, tables: Sequence[str], max_redeliveries: int = 3) -> None:
        from confluent_kafka import Producer

        self.config = config
        self.model = model
        self.tables = list(tables)
        self._partitions = ensure_topics(config, [config.topic(model, t) for t in self.tables])
        self._producer = Producer({
            **config.client_settings(), "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, "message.max.bytes": config.max_message_bytes + 4096, **config.producer})
        self._lock = threading.Lock()
        self._failed: List[Tuple[str, int, bytes]] = []
        self.max_redeliveries = max_redeliveries
        self.stats = PublisherStats()

    def _on_delivery(self, err, msg) -> None:
        if err is None:
            self.stats.delivered += 1
            return
        self.stats.delivery_failures += 1
        logger.warning("delivery to %s[%s] failed: %s (will produce it again at flush)", msg.topic(), msg.partition(), err)
        with self._lock:
            self._failed.append((msg.topic(), msg.partition(), msg.value()))

    def _produce(self, topic: str, partition: int, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, partition=partition, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then try again
                self._producer.poll(0.1)
        self._producer.poll(0)

    def publish(self, table: str, ids: torch.Tensor, rows: torch.Tensor) -> int:
        """Queue the rows of `ids` of `table`; returns the number of messages. Call flush() to wait."""
        if table not in self.tables:
            raise ValueError(f"table {table!r} is not published by this publisher; tables: {self.tables}")
        ids_np = ids.detach().cpu().numpy().astype(np.int64)
        rows_np = rows.detach().cpu().float().numpy()
        if rows_np.ndim != 2 or rows_np.shape[0] != len(ids_np):
            raise ValueError(f"table {table!r}: rows must be [{len(ids_np)}, dim], got {list(rows_np.shape)}")
        topic = self.config.topic(self.model, table)
        n_part = self._partitions[topic]
        part = ids_np % n_part
        n = 0
        for p in np.unique(part):
            sel = part == p
            for value in encode_chunks(ids_np[sel], rows_np[sel], self.config.max_message_bytes):
                self._produce(topic, int(p), value)
                n += 1
        self.stats.messages += n
        self.stats.rows += len(ids_np)
        return n

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued message; produce failed ones again; raise PublishError if any is still
        undelivered."""
        for attempt in range(self.max_redeliveries + 1):
            left = self._producer.flush(timeout)
            with self._lock:
                failed, self._failed = self._failed, []
            if not failed and left == 0:
                return
            if attempt == self.max_redeliveries:
                raise PublishError(f"{len(failed)} messages failed delivery and {left} are still queued after "
                                   f"{self.max_redeliveries} redeliveries")
            for topic, partition, value in failed:
                self.stats.redelivered += 1
                self._produce(topic, partition, value)

    def close(self) -> None:
        self.flush()


class EBCDeltaPublisher:
    """For a plain (unsharded) TorchRec EmbeddingBagCollection: records the ids each training step looks
    up and, every `publish_every_steps` steps or `publish_every_seconds`, publishes their rows as they are
    after the optimizer step, then flushes (at a step boundary)."""

    def __init__(self, ebc, publisher: DeltaPublisher, config: Optional[KafkaConfig] = None) -> None:
        self.ebc = ebc
        self.publisher = publisher
        self.config = config or publisher.config
        self._feature_table = {f: t.name for t in ebc.embedding_bag_configs() for f in t.feature_names}
        self._pending: Dict[str, List[np.ndarray]] = {}
        self._steps = 0
        self._last_publish = time.monotonic()

    def record(self, features) -> None:
        """Call with each training batch's KeyedJaggedTensor (before or after backward)."""
        for f, jt in features.to_dict().items():
            table = self._feature_table.get(f)
            if table is not None and jt.values().numel():
                self._pending.setdefault(table, []).append(jt.values().detach().cpu().numpy())

    def step_done(self) -> bool:
        """Call after optimizer.step(); returns True when it published."""
        self._steps += 1
        due = self._steps % self.config.publish_every_steps == 0
        if self.config.publish_every_seconds > 0:
            due = due or time.monotonic() - self._last_publish >= self.config.publish_every_seconds
        if due:
            self.publish_pending()
        return due

    def publish_pending(self) -> int:
        rows_sent = 0
        for table, chunks in self._pending.items():
            ids = np.unique(np.concatenate(chunks))
            weight = self.ebc.embedding_bags[table].weight
            self.publisher.publish(table, torch.from_numpy(ids), weight.detach()[torch.from_numpy(ids)])
            rows_sent += len(ids)
        self._pending = {}
        self.publisher.flush()
        self._last_publish = time.monotonic()
        return rows_sent
