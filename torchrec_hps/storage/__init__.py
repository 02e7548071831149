"""The tiers below the module's cache, behind one interface, and the hierarchy that chains them."""
from torchrec_hps.storage.bulk_load import bulk_load, table_weights
from torchrec_hps.storage.hierarchy import MISSING, LookupResult, StorageHierarchy
from torchrec_hps.storage.interface import StorageTier, TierError, TierStats, TierWriteError
from torchrec_hps.storage.memory import MemoryTier
from torchrec_hps.storage.redis_tier import RedisTier
from torchrec_hps.storage.rocksdb_tier import RocksDBTier

__all__ = [
    "MISSING", "LookupResult", "MemoryTier", "RedisTier", "RocksDBTier", "StorageHierarchy", "StorageTier",
    "TierError", "TierStats", "TierWriteError", "bulk_load", "table_weights",
]
