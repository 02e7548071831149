"""Benchmarks: each prints ratios measured side by side in one run, and writes JSON."""
from __future__ import annotations

import json
import os
from typing import Any


def save_json(path: str, payload: Any) -> None:
    """Write a benchmark's results (creating the folder)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
