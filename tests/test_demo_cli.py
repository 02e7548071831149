"""`torchrec-hps demo` (what `make demo` runs): no server, HPS lookups, hit rates, equality."""
from __future__ import annotations

import pytest

from apps import cli
from torchrec_hps.demo import run_demo


def test_demo_serves_a_swapped_dlrm_exactly(tmp_path):
    lines = []
    result = run_demo(batches=4, batch_size=64, max_rows=5000, train_steps=5, path=str(tmp_path / "db"),
                      log=lines.append)
    assert result["ok"] and result["max_abs_diff"] == 0.0
    assert 0.0 < result["hit_rate"] < 1.0
    assert result["served_by"]["rocksdb"] > 0
    assert any("hit rate" in line for line in lines) and any("-> OK" in line for line in lines)


def test_demo_with_kafka_trains_with_the_bridge_on(tmp_path, namespace, redis_url, kafka_bootstrap):
    from torchrec_hps.config_file import load_config

    cfg = tmp_path / "demo.yaml"
    cfg.write_text(f"model: {namespace}\nstorage:\n  redis: {{url: '{redis_url}'}}\n"
                   f"  rocksdb: {{path: {tmp_path}/db}}\nkafka: {{bootstrap_servers: '{kafka_bootstrap}'}}\n")
    lines = []
    result = run_demo(batches=3, batch_size=32, max_rows=2000, train_steps=6, serving=load_config(cfg),
                      log=lines.append)
    assert result["ok"], lines
    assert any("with the train bridge on" in line for line in lines)
    from torchrec_hps.config import RedisTierConfig, TableSpec
    from torchrec_hps.demo import CRITEO_ROWS
    from torchrec_hps.storage import RedisTier

    red = RedisTier(RedisTierConfig(url=redis_url))  # clean up the demo's rows
    for i, n in enumerate(CRITEO_ROWS):
        red.add_table(TableSpec(namespace, f"t{i}", min(n, 2000), 16))
        red.drop_table(f"{namespace}.t{i}")
    red.close()


def test_cli_errors_are_one_line_with_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
    # bad values used to give tracebacks (a ValueError deep in the config, ZeroDivisionError)
    for argv, message in [(["demo", "--cache-ratio", "7"], "argument --cache-ratio: 7 is out of range"),
                          (["demo", "--batches", "-3"], "argument --batches: -3 is out of range"),
                          (["demo", "--batch-size", "many"], "argument --batch-size: 'many' is not a whole number")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert cli.main(["stats", "--url", "notaurl"]) == 2
    err = capsys.readouterr().err
    assert "cannot read notaurl" in err and len(err.strip().splitlines()) == 1, err


def _ebc_checkpoint(tmp_path):
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=1000, feature_names=["f1"])])
    model = torch.nn.Module()
    model.sparse = ebc
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return ebc, path


def _config_file(tmp_path, model="cli_model"):
    path = tmp_path / "hps.yaml"
    path.write_text(f"model: {model}\nstorage:\n  memory: {{capacity: 100}}\n  rocksdb: {{path: {tmp_path}/db}}\n")
    return path


def _rocks_rows(tmp_path, model, table, n):
    import torch

    from torchrec_hps.config import RocksDBTierConfig, TableSpec
    from torchrec_hps.storage import RocksDBTier

    tier = RocksDBTier(RocksDBTierConfig(path=str(tmp_path / "db")))
    tier.add_table(TableSpec(model, table, n, 4))
    rows, found = tier.get(f"{model}.{table}", torch.arange(n))
    tier.close()
    return rows, found


def test_cli_load_checkpoint_and_resume(tmp_path, capsys):
    import torch

    ebc, ckpt = _ebc_checkpoint(tmp_path)
    cfg = _config_file(tmp_path)
    assert cli.main(["load", "--config", str(cfg), "--checkpoint", str(ckpt), "--quiet", "--chunk-rows", "300"]) == 0
    assert "cli_model.t1: 1,000 rows" in capsys.readouterr().out
    rows, found = _rocks_rows(tmp_path, "cli_model", "t1", 1000)
    assert found.all() and torch.equal(rows, ebc.embedding_bags["t1"].weight.detach())
    # a load that stopped after 600 rows resumes there
    (tmp_path / "model.pt.other.load-progress.json").write_text('{"t1": 600}')
    cfg2 = _config_file(tmp_path, model="other")
    assert cli.main(["load", "--config", str(cfg2), "--checkpoint", str(ckpt), "--quiet"]) == 0
    rows, found = _rocks_rows(tmp_path, "other", "t1", 1000)
    assert not found[:600].any() and found[600:].all()
    assert not (tmp_path / "model.pt.other.load-progress.json").exists()


def test_cli_errors_name_the_problem_with_a_hint(tmp_path, capsys):
    cfg = _config_file(tmp_path)
    assert cli.main(["load", "--config", str(cfg), "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: no checkpoint at" in err[0] and "hint:" in err[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ncache: {eviction: fifo}\n")
    assert cli.main(["load", "--config", str(bad), "--checkpoint", "x"]) == 2
    assert "cache.eviction='fifo' is not allowed" in capsys.readouterr().err
    assert cli.main(["stats", "--url", "http://127.0.0.1:1/metrics"]) == 2
    assert "cannot read http://127.0.0.1:1/metrics" in capsys.readouterr().err


def test_every_subcommand_has_help_with_an_example(capsys):
    for cmd in ("demo", "load", "stats", "bench"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out
