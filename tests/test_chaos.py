"""60 s of chaos in make test (tests/chaos.py): Redis nodes, the broker and the consumer fail on a seeded
schedule while lookups and training run; nothing fails, nothing wrong or too stale is served, nothing is
lost."""
from __future__ import annotations

import pytest

from tests.chaos import FAULTS, run_soak


@pytest.mark.slow
def test_sixty_seconds_of_chaos(servers, tmp_path, namespace):
    report = run_soak(60.0, seed=3, staleness_s=30.0, servers=servers, namespace=namespace.replace("-", "_"),
                      workdir=str(tmp_path))
    print(report.table())
    assert not report.errors, report.errors[:5]
    assert report.lookups > 100 and report.published_versions > 100
    assert sum(report.injected.values()) >= 3 and report.injected == report.survived
    assert len([f for f in FAULTS if report.injected[f]]) >= 2  # the seeded schedule mixes kinds
    assert report.failed_lookups == 0
    assert report.wrong_rows == 0
    assert report.stale_rows == 0
    assert report.lost_updates == 0
