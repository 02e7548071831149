"""Training deltas to Kafka and back: the wire format, the publisher (training side) and the consumer
(inference side)."""
from torchrec_hps.train_bridge.consumer import ConsumerStats, UpdateConsumer
from torchrec_hps.train_bridge.producer import (BrokerError, DeltaPublisher, EBCDeltaPublisher, PublishError,
                                                PublisherStats, ensure_topics, snapshot_offsets)
from torchrec_hps.train_bridge.tracker import TrackerDeltaPublisher
from torchrec_hps.train_bridge.wire import WireFormatError, decode, encode, encode_chunks

__all__ = ["BrokerError", "ConsumerStats", "DeltaPublisher", "EBCDeltaPublisher", "PublishError", "PublisherStats",
           "TrackerDeltaPublisher", "UpdateConsumer", "WireFormatError", "decode", "encode", "encode_chunks",
           "ensure_topics", "snapshot_offsets"]
