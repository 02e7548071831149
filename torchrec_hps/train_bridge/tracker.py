"""Training side under DistributedModelParallel: the rows each step changed come from TorchRec's
ModelDeltaTracker (`dmp.init_torchrec_delta_tracker(DeltaTrackerConfig(tracking_mode=ID_ONLY))`), and their
values are read from this rank's shards after the optimizer step. The tracker reports shard-local ids; the
shard's row offset turns them into global ids (row-wise sharding), so every rank publishes its own rows."""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import torch

from torchrec_hps.train_bridge.producer import DeltaPublisher


def _local_shard(weight) -> Tuple[torch.Tensor, int]:
    """(rows of this rank's shard, its first global row) for a table's weight in the DMP state dict."""
    if hasattr(weight, "local_shards"):
        shards = weight.local_shards()
        if len(shards) != 1:
            raise NotImplementedError(f"{len(shards)} local shards of one table on this rank: only one is supported")
        shard = shards[0]
        if shard.metadata.shard_offsets[1] != 0:
            raise NotImplementedError("column-wise sharded tables are not supported by the update publisher")
        return shard.tensor, int(shard.metadata.shard_offsets[0])
    return weight, 0


class TrackerDeltaPublisher:
    """Publishes, per step (call after optimizer.step()), the rows the DMP's delta tracker saw changed."""

    def __init__(self, dmp, publisher: DeltaPublisher, consumer: Optional[str] = None) -> None:
        self.dmp = dmp
        self.publisher = publisher
        self.consumer = consumer
        self._steps = 0
        self._last_publish = time.monotonic()
        tracker = dmp.get_delta_tracker()
        if tracker is None:
            raise ValueError("the model has no delta tracker: call dmp.init_torchrec_delta_tracker("
                             "DeltaTrackerConfig(tracking_mode=TrackingMode.ID_ONLY)) first")
        self.tracker = tracker

    def step_done(self) -> bool:
        """Call after each optimizer step: publishes every `publish_every_steps` steps or
        `publish_every_seconds` (the publisher's KafkaConfig); returns True when it published."""
        cfg = self.publisher.config
        self._steps += 1
        due = self._steps % cfg.publish_every_steps == 0
        if cfg.publish_every_seconds > 0:
            due = due or time.monotonic() - self._last_publish >= cfg.publish_every_seconds
        if due:
            self.publish_step()
            self._last_publish = time.monotonic()
        return due

    def _weights(self) -> Dict[str, object]:
        return self.dmp.state_dict()

    def publish_step(self) -> int:
        """Publish the changed rows since the last call and wait for delivery; returns rows published."""
        # torchrec 1.6's get_unique() fails (torch.cat of nothing) when no lookup happened since the last
        # read: check the tracker's batch counters first
        consumer = self.consumer or getattr(self.tracker, "DEFAULT_CONSUMER", "default")
        read_up_to = getattr(self.tracker, "per_consumer_batch_idx", {}).get(consumer, -1)
        if getattr(self.tracker, "curr_batch_idx", read_up_to + 1) + 1 <= read_up_to:
            return 0
        changed = self.tracker.get_unique(self.consumer)
        if not changed:
            return 0
        state = self._weights()
        sent = 0
        for fqn, unique in changed.items():
            table = fqn.rsplit(".", 1)[-1]
            if table not in self.publisher.tables or unique.ids.numel() == 0:
                continue
            rows, first_row = _local_shard(state[f"{fqn}.weight"])
            ids = unique.ids.to(torch.int64)
            self.publisher.publish(table, ids + first_row, rows.detach()[ids])
            sent += ids.numel()
        self.publisher.flush()
        return sent
