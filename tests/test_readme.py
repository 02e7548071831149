"""The README's usage example runs as written (against the test servers, RocksDB in a temp folder)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_storage_example_runs(servers, tmp_path, namespace):
    code = re.search(r"## Usage: the storage tiers\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("/var/lib/hps/rocksdb", str(tmp_path / "rocksdb")).replace("ctr_model", namespace)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    h = scope["hierarchy"]
    assert scope["res"].found.all()
    assert h.stats()[f"{namespace}.t1"]["served_by"]["redis"] == 4
    h.tier("redis").drop_table(f"{namespace}.t1")
    h.close()


def test_readme_swap_in_example_runs(tmp_path, namespace):
    code = re.search(r"## Usage: swap a trained TorchRec model onto the parameter server\n\n```python\n(.*?)```",
                     README.read_text(), re.S).group(1)
    code = code.replace("/var/lib/hps/rocksdb", str(tmp_path / "rocksdb")).replace("ctr_v1", namespace)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["scores"].shape == (2, 1)
    hps = scope["model"].sparse_arch.embedding_bag_collection
    assert hps.stats()["t0"]["ids"] == 2
    hps.close()
    scope["storage"].close()
