"""Tier fixtures for the storage tests (`tier_factory` itself lives in tests/conftest.py)."""
from __future__ import annotations

import pytest

from torchrec_hps.config import TableSpec
from tests.conftest import TIER_KINDS  # noqa: F401  (re-exported for the tier tests)


@pytest.fixture(params=TIER_KINDS)
def tier(request, tier_factory):
    return tier_factory(request.param)


@pytest.fixture
def spec(namespace) -> TableSpec:
    return TableSpec(namespace, "t1", num_rows=10_000, dim=16)
