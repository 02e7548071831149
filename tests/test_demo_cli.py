"""`torchrec-hps demo` (what `make demo` runs): no server, HPS lookups, hit rates, equality."""
from __future__ import annotations

import pytest

from apps import cli
from torchrec_hps.demo import run_demo


def test_demo_serves_a_swapped_dlrm_exactly(tmp_path):
    lines = []
    result = run_demo(batches=4, batch_size=64, max_rows=5000, path=str(tmp_path / "db"), log=lines.append)
    assert result["ok"] and result["max_abs_diff"] == 0.0
    assert 0.0 < result["hit_rate"] < 1.0
    assert result["served_by"]["rocksdb"] > 0
    assert any("hit rate" in line for line in lines) and any("-> OK" in line for line in lines)


def test_cli_errors_are_one_line_with_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
