"""Model lifecycle on a running server over real tiers (memory, Redis, RocksDB) and a real Kafka broker:
a version switch under load loses no request and serves v2 after it; unloading frees the version's
namespace in every tier; Kafka updates reach served scores; two models share the tiers side by side."""
from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import redis
import torch

from tests.serving.conftest import (ARCH, DENSE, TABLES, expected_scores, http_inputs, make_dlrm, random_query,
                                    start_server)
from torchrec_hps.serving import ServedModelConfig


def _load_loop(url: str, name: str, stop: threading.Event, out: list, seed: int) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    gen = np.random.default_rng(seed)
    while not stop.is_set():
        q = random_query(int(gen.integers(1, 24)), gen)
        sent = time.monotonic()
        try:
            r = client.infer(name, http_inputs(q))
            out.append((sent, q, r.get_response()["model_version"], r.as_numpy("scores"), None))
        except Exception as e:  # recorded: the test asserts there are none
            out.append((sent, q, None, None, e))


def test_version_switch_under_load_loses_no_request_and_frees_v1(tmp_path, namespace, redis_url):
    s = start_server(tmp_path, namespace, redis_url=redis_url)
    try:
        name = s.server.repository.names()[0]
        v1 = s.model
        v2 = make_dlrm(seed=1)
        ckpt2 = str(tmp_path / "v2.pt")
        torch.save(v2.state_dict(), ckpt2)
        results: list = []
        stop = threading.Event()
        loops = [threading.Thread(target=_load_loop, args=(s.http_url, name, stop, results, i)) for i in range(3)]
        for t in loops:
            t.start()
        time.sleep(1.0)
        redis_tier, rocks = s.storage.tier("redis"), s.storage.tier("rocksdb")
        v1_hashes = [h for t in TABLES for h in redis_tier.hash_names(s.storage.spec(f"{name}_v1.{t.name}"))]
        client = redis.Redis.from_url(redis_url)
        assert client.exists(*v1_hashes) > 0  # v1's rows are in Redis (bulk-loaded) before the switch
        r = httpx.post(f"http://{s.http_url}/v2/repository/models/{name}/load",
                       json={"parameters": {"version": 2, "path": ckpt2}}, timeout=120)
        switched = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2"
        time.sleep(1.0)
        stop.set()
        for t in loops:
            t.join(30)
        errors = [e for *_, e in results if e is not None]
        assert not errors, errors[:3]
        assert len(results) > 50
        seen = {v for _, _, v, _, _ in results}
        assert seen == {"1", "2"}, seen
        for sent, q, version, scores, _ in results:
            np.testing.assert_allclose(scores, expected_scores(v1 if version == "1" else v2, q), rtol=1e-5,
                                       atol=1e-6)
            if sent > switched:
                assert version == "2"
        # v1 unloaded: its namespace is gone from every tier
        assert s.server.repository.versions(name) == ["2"]
        assert client.exists(*v1_hashes) == 0
        cfs = rocks.column_families()
        assert not [c for c in cfs if c.startswith(f"{name}_v1.")] and [c for c in cfs if c.startswith(f"{name}_v2.")]
        for tier in s.storage.tiers:
            assert not [t for t in tier.tables() if t.startswith(f"{name}_v1.")]
        # v2's cache was warmed from the live traffic's hottest ids before it took traffic
        assert sum(len(m.cached_keys(t.name)) for m in s.server.repository.get(name).hps_modules for t in TABLES) > 0
    finally:
        s.server.stop()
        s.storage.close()


def test_kafka_updates_reach_served_scores(tmp_path, namespace, kafka_bootstrap):
    import tritonclient.grpc as grpcclient

    from tests.serving.conftest import grpc_inputs
    from torchrec_hps.config import KafkaConfig
    from torchrec_hps.train_bridge import DeltaPublisher

    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, poll_timeout=0.2, num_partitions=1)
    s = start_server(tmp_path, namespace, kafka=kafka)
    try:
        name = s.server.repository.names()[0]
        client = grpcclient.InferenceServerClient(s.grpc_url)
        q = random_query(4, np.random.default_rng(5))
        q.lengths[:] = 1
        q.values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], dtype=np.int64)
        before = client.infer(name, grpc_inputs(q)).as_numpy("scores")
        np.testing.assert_allclose(before, expected_scores(s.model, q), rtol=1e-5, atol=1e-6)
        new_rows = torch.randn(4, 8)
        DeltaPublisher(kafka, name, ["t0"]).publish("t0", torch.tensor([1, 2, 3, 4]), new_rows)
        with torch.no_grad():
            s.model.sparse_arch.embedding_bag_collection.embedding_bags["t0"].weight[1:5] = new_rows
        want = expected_scores(s.model, q)
        deadline = time.monotonic() + 60
        got = before
        while time.monotonic() < deadline:
            got = client.infer(name, grpc_inputs(q)).as_numpy("scores")
            if np.allclose(got, want, rtol=1e-5, atol=1e-6):
                break
            time.sleep(0.2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(before, want)
    finally:
        s.server.stop()
        s.storage.close()


def test_a_version_loaded_from_kafka_updated_tiers_serves_the_published_rows(tmp_path, namespace, kafka_bootstrap):
    """v2 with bulk_load false: nothing is bulk-loaded, its consumer fills its namespace from the model's topics
    (the trainer published every row of v2's tables), and the load returns only once that consumer caught up,
    so v2's first answers are already v2's scores."""
    import tritonclient.http as httpclient

    from torchrec_hps.config import KafkaConfig
    from torchrec_hps.train_bridge import DeltaPublisher

    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, poll_timeout=0.2, num_partitions=1)
    s = start_server(tmp_path, namespace, kafka=kafka)
    try:
        name = s.server.repository.names()[0]
        v2 = make_dlrm(seed=1)
        ckpt2 = str(tmp_path / "v2.pt")
        torch.save(v2.state_dict(), ckpt2)
        publisher = DeltaPublisher(kafka, name, [t.name for t in TABLES])
        bags = v2.sparse_arch.embedding_bag_collection.embedding_bags
        for t in TABLES:
            publisher.publish(t.name, torch.arange(t.num_embeddings), bags[t.name].weight.detach())
        publisher.flush()
        load = {"parameters": {"version": 2, "path": ckpt2, "bulk_load": False}}
        r = httpx.post(f"http://{s.http_url}/v2/repository/models/{name}/load", json=load, timeout=300)
        assert r.status_code == 200, r.text
        served = s.server.repository.get(name)
        assert served.version == "2"
        assert served.consumer.stats.applied_rows >= sum(t.num_embeddings for t in TABLES)
        client = httpclient.InferenceServerClient(s.http_url)
        gen = np.random.default_rng(11)
        for _ in range(5):
            q = random_query(8, gen)
            res = client.infer(name, http_inputs(q))
            assert res.get_response()["model_version"] == "2"
            np.testing.assert_allclose(res.as_numpy("scores"), expected_scores(v2, q), rtol=1e-5, atol=1e-6)
    finally:
        s.server.stop()
        s.storage.close()


def test_two_models_are_served_side_by_side_over_shared_tiers(tmp_path, namespace):
    import tritonclient.http as httpclient

    s = start_server(tmp_path, namespace)
    try:
        other = make_dlrm(seed=3)
        ckpt = str(tmp_path / "other.pt")
        torch.save(other.state_dict(), ckpt)
        s.server.tables["other"] = TABLES
        s.server.repository.load(ServedModelConfig(name="other", path=ckpt, dense_in_features=DENSE, **ARCH), TABLES)
        client = httpclient.InferenceServerClient(s.http_url)
        gen = np.random.default_rng(6)
        for _ in range(5):
            q = random_query(9, gen)
            np.testing.assert_allclose(client.infer(namespace, http_inputs(q)).as_numpy("scores"),
                                       expected_scores(s.model, q), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(client.infer("other", http_inputs(q)).as_numpy("scores"),
                                       expected_scores(other, q), rtol=1e-5, atol=1e-6)
        assert sorted(s.server.repository.names()) == sorted([namespace, "other"])
        removed = s.server.repository.unload("other", "1")
        assert sorted(removed) == sorted(f"other_v1.{t.name}" for t in TABLES)
        assert client.infer(namespace, http_inputs(q)).as_numpy("scores").shape == (9,)
    finally:
        s.server.stop()
        s.storage.close()
