"""The processes of a deployment, as functions the TorchX components (apps/components.py) launch:
a trainer that publishes its updates, and an inference node that serves and consumes them."""
from __future__ import annotations

import json
import time
from typing import Callable, Dict, Optional

import torch

from torchrec_hps.workload import ZipfKeys, zipf_kjt
from torchrec_hps.config_file import ServingConfig


def _require_tables(cfg: ServingConfig) -> None:
    if not cfg.tables:
        raise ValueError("the config has no `tables`: the trainer and the inference node need them")


def run_trainer(cfg: ServingConfig, steps: int, checkpoint: Optional[str] = None, save: Optional[str] = None,
                batch_size: int = 64, lr: float = 0.1, seed: int = 0, log: Callable[[str], None] = print) -> Dict:
    """Train the config's tables (an EBC under a linear head) on Zipf ids for `steps` steps, publishing the
    changed rows through Kafka; start from `checkpoint` and write the final state dict to `save`."""
    from torchrec import EmbeddingBagCollection

    from torchrec_hps.loader import read_checkpoint
    from torchrec_hps.train_bridge import DeltaPublisher, EBCDeltaPublisher

    _require_tables(cfg)
    if cfg.kafka is None:
        raise ValueError("the config has no `kafka` section: the trainer publishes updates through it")
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=cfg.tables)
    if checkpoint:
        state = read_checkpoint(checkpoint)
        state = state.state_dict() if isinstance(state, torch.nn.Module) else state
        # keys like "<prefix>.embedding_bags.<table>.weight" -> "embedding_bags.<table>.weight"
        ebc.load_state_dict({"embedding_bags." + k.split("embedding_bags.", 1)[1]: v
                             for k, v in state.items() if "embedding_bags." in k})
    head = torch.nn.Linear(sum(t.embedding_dim * len(t.feature_names) for t in cfg.tables), 1)
    opt = torch.optim.SGD(list(ebc.parameters()) + list(head.parameters()), lr=lr)
    bridge = EBCDeltaPublisher(ebc, DeltaPublisher(cfg.kafka, cfg.hps.model, [t.name for t in cfg.tables]))
    features = [f for t in cfg.tables for f in t.feature_names]
    samplers = [ZipfKeys(t.num_embeddings, seed=seed + i) for t in cfg.tables for i, _ in enumerate(t.feature_names)]
    for step in range(steps):
        kjt = zipf_kjt(samplers, features, batch_size)
        loss = head(ebc(kjt).values()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bridge.record(kjt)
        bridge.step_done()
    bridge.publish_pending()
    if save:
        torch.save(ebc.state_dict(), save)
    result = {"steps": steps, "rows_published": bridge.publisher.stats.rows,
              "messages": bridge.publisher.stats.messages}
    log(json.dumps({"trainer": result}))
    return result


def run_inference_node(cfg: ServingConfig, duration_s: float, batch_size: int = 256, group_id: Optional[str] = None,
                       metrics_port: Optional[int] = None, drain_timeout_s: float = 60.0,
                       stop_file: Optional[str] = None, log: Callable[[str], None] = print) -> Dict:
    """Serve Zipf lookups through an HPSEmbeddingBagCollection for `duration_s` (or until `stop_file`
    exists) while applying updates from Kafka; then wait until the consumer has no lag (or
    `drain_timeout_s`) and report stats."""
    import os

    from torchrec_hps.metrics import start_metrics_server
    from torchrec_hps.modules import HPSEmbeddingBagCollection
    from torchrec_hps.storage import StorageHierarchy
    from torchrec_hps.train_bridge import UpdateConsumer

    _require_tables(cfg)
    storage = StorageHierarchy.from_config(cfg.hps.storage)
    hps = HPSEmbeddingBagCollection(cfg.tables, cfg.hps, storage=storage)
    consumer = None
    if cfg.kafka is not None:
        consumer = UpdateConsumer(cfg.kafka, cfg.hps.model, storage, [t.name for t in cfg.tables], modules=[hps],
                                  group_id=group_id).start()
    server = start_metrics_server(metrics_port, [hps], [storage], [consumer] if consumer else [])[0] \
        if metrics_port else None
    features = [f for t in cfg.tables for f in t.feature_names]
    samplers = [ZipfKeys(t.num_embeddings, seed=100 + i) for t in cfg.tables for i, _ in enumerate(t.feature_names)]
    end, lookups = time.monotonic() + duration_s, 0
    try:
        while time.monotonic() < end and not (stop_file and os.path.exists(stop_file)):
            with torch.no_grad():
                hps(zipf_kjt(samplers, features, batch_size))
            lookups += 1
        deadline = time.monotonic() + drain_timeout_s
        while consumer is not None and consumer.lag() > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = hps.stats()
        result = {"lookups": lookups, "lag": consumer.lag() if consumer else 0,
                  "applied_rows": consumer.stats.applied_rows if consumer else 0,
                  "hit_rate": {t.name: round(stats[t.name]["hit_rate"], 4) for t in cfg.tables},
                  "p99_ms": stats["_module"].get("p99_ms")}
    finally:
        if consumer is not None:
            consumer.stop()
        if server is not None:
            server.shutdown()
        hps.close()
        storage.close()
    log(json.dumps({"inference_node": result}))
    return result
