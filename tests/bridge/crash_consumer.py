"""Run by test_bridge: a consumer over a RocksDB tier that applies `want` rows, says so on stdout and waits
to be SIGKILLed (commit_interval is an hour, so nothing it applied is committed or flushed)."""
from __future__ import annotations

import sys
import time

from torchrec_hps.config import KafkaConfig, RocksDBTierConfig, StorageConfig, TableSpec
from torchrec_hps.storage import StorageHierarchy
from torchrec_hps.train_bridge import UpdateConsumer


def main(bootstrap: str, path: str, namespace: str, group: str, want: int) -> None:
    storage = StorageHierarchy.from_config(StorageConfig(rocksdb=RocksDBTierConfig(path=path)))
    storage.add_tables([TableSpec(namespace, "t2", 100, 4)])
    # a short session: the group gives the dead consumer's partitions to the next one within seconds
    kafka = KafkaConfig(bootstrap_servers=bootstrap, poll_timeout=0.5, commit_interval=3600.0,
                        consumer={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    consumer = UpdateConsumer(kafka, namespace, storage, ["t2"], group_id=group)
    deadline = time.monotonic() + 60
    while consumer.stats.applied_rows < want and time.monotonic() < deadline:
        consumer.poll_once()
    print(f"applied {consumer.stats.applied_rows}", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
