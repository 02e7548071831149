"""The module's embedding cache: interface and the two-level fbgemm-TBE implementation (host or GPU)."""
from torchrec_hps.modules.cache.cache_group import TBECacheGroup
from torchrec_hps.modules.cache.interface import EmbeddingCacheGroup
from torchrec_hps.modules.cache.miss_path import AsyncInserter

__all__ = ["AsyncInserter", "EmbeddingCacheGroup", "TBECacheGroup"]
