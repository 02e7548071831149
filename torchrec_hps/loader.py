"""`torchrec-hps load`: a TorchRec checkpoint (state dict, or a whole module saved with torch.save) into
the tiers that keep full copies, chunk by chunk, resumable from a progress file next to the checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from torchrec_hps.config import HPSConfig
from torchrec_hps.storage import StorageHierarchy, bulk_load


def read_checkpoint(path: Union[str, Path]):
    p = Path(path)
    if not p.exists():
        raise ValueError(f"no checkpoint at {p}")
    try:
        obj = torch.load(p, map_location="cpu", mmap=True, weights_only=True)  # mmap: tables stay on disk
    except Exception:
        obj = torch.load(p, map_location="cpu", weights_only=False)  # a pickled nn.Module
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, (dict, torch.nn.Module)):
        raise ValueError(f"{p}: expected a state dict or an nn.Module, got {type(obj).__name__}")
    return obj


def load_checkpoint(checkpoint: Union[str, Path], config: HPSConfig, chunk_rows: int = 65536,
                    resume: bool = True, progress: bool = True,
                    storage: Optional[StorageHierarchy] = None) -> Dict[str, int]:
    """Load every table of `checkpoint` under namespace config.model; returns {table: rows loaded}."""
    source = read_checkpoint(checkpoint)
    progress_file = Path(f"{checkpoint}.{config.model}.load-progress.json")
    done: Dict[str, int] = json.loads(progress_file.read_text()) if resume and progress_file.exists() else {}
    own = storage is None
    storage = storage or StorageHierarchy.from_config(config.storage)

    def record(table: str, rows_done: int) -> None:
        done[table] = rows_done
        progress_file.write_text(json.dumps(done))

    try:
        specs = bulk_load(storage.full_copy_tiers(), config.model, source, chunk_rows=chunk_rows, start_rows=done,
                          progress=progress, on_chunk=record)
    finally:
        if own:
            storage.close()
    progress_file.unlink(missing_ok=True)  # complete: a later load starts over
    return {s.name: s.num_rows for s in specs}
