"""The update stream over the broker's SASL/SCRAM-over-TLS listener (real broker, SCRAM user made by the
harness, certificate from a test CA made with openssl): the right credentials publish and apply; a wrong
password, a missing CA or a plaintext client fail at once with a clear error, and nothing is written."""
from __future__ import annotations

import pytest
import torch
from confluent_kafka.admin import AdminClient

from torchrec_hps.config import KafkaConfig
from torchrec_hps.train_bridge import BrokerError, DeltaPublisher, UpdateConsumer
from tests.bridge.test_bridge import _drain, _hierarchy


def _secure(kafka_secured, **over) -> KafkaConfig:
    bootstrap, user, password, ca = kafka_secured
    kw = dict(bootstrap_servers=bootstrap, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256",
              sasl_username=user, sasl_password=password, ssl_ca_location=ca, max_message_bytes=4096,
              poll_timeout=0.5, retry_backoff=0.2)
    kw.update(over)
    return KafkaConfig(**kw)


def test_updates_flow_over_sasl_scram_and_tls(kafka_secured, tier_factory, namespace, monkeypatch):
    monkeypatch.setenv("HPS_TEST_KAFKA_PASSWORD", kafka_secured[2])
    kafka = _secure(kafka_secured, sasl_password="env:HPS_TEST_KAFKA_PASSWORD")
    assert kafka_secured[2] not in repr(kafka)
    h = _hierarchy(tier_factory, namespace)
    pub = DeltaPublisher(kafka, namespace, ["t1", "t2"])
    consumer = UpdateConsumer(kafka, namespace, h, ["t1", "t2"])
    rows = torch.randn(20, 4)
    pub.publish("t2", torch.arange(20), rows)
    pub.flush()
    try:
        assert _drain(consumer, 20) == 20
        torch.testing.assert_close(h.get(f"{namespace}.t2", torch.arange(20)).rows, rows, rtol=0, atol=0)
    finally:
        consumer.stop()
        h.close()


@pytest.mark.parametrize("case", ["wrong password", "unknown user", "no CA", "plaintext client"])
def test_refused_clients_fail_clearly_and_write_nothing(kafka_secured, kafka_bootstrap, tier_factory, namespace, case):
    bad = {"wrong password": dict(sasl_password="not-the-secret"), "unknown user": dict(sasl_username="mallory"),
           "no CA": dict(ssl_ca_location=None), "plaintext client": dict(security_protocol="PLAINTEXT")}[case]
    kafka = _secure(kafka_secured, connect_timeout=3.0, **bad)  # a plaintext client waits for it, then fails
    h = _hierarchy(tier_factory, namespace)
    try:
        for make in (lambda: DeltaPublisher(kafka, namespace, ["t1"]),
                     lambda: UpdateConsumer(kafka, namespace, h, ["t1"])):
            with pytest.raises(BrokerError) as err:
                make()
            text = str(err.value)
            assert kafka_secured[0] in text and kafka_secured[2] not in text and "not-the-secret" not in text
            if case in ("wrong password", "unknown user"):
                assert "authentication failed for user" in text and "kafka.sasl_password" in text
        # nothing reached the broker: no topic was made for this model (seen over the plaintext listener)
        topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
        assert not [t for t in topics if namespace in t]
        assert h.get(f"{namespace}.t1", torch.arange(10)).found.sum() == 0
    finally:
        h.close()


def test_sasl_config_is_checked_and_the_secret_never_printed():
    with pytest.raises(ValueError, match="sasl_username and kafka.sasl_password"):
        KafkaConfig(security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="security_protocol"):
        KafkaConfig(security_protocol="KERBEROS_PLEASE")
    cfg = KafkaConfig(security_protocol="SASL_SSL", sasl_username="u", sasl_password="s3cr3t-value")
    assert "s3cr3t-value" not in repr(cfg) and "s3cr3t-value" not in str(cfg)
    assert cfg.client_settings()["sasl.password"] == "s3cr3t-value"  # handed to librdkafka alone
